"""The shard stream: batches mix image and text-only samples; bad data is skipped, counted, never unpickled."""

import dataclasses
import io
import json
import pickle
import tarfile
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.config import ShapesWorldConfig
from datamodules.shapes import lexicon_texts
from datamodules.shards import ShardDataModule, ShardIndex, SkipSample, decode_image, decode_sample
from datamodules.templates import get_template
from datamodules.word_tokenizer import build_word_tokenizer
from lmm.batch import collate
from lmm.preprocess import SampleEncoder


def _png(color=(255, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), color).save(buf, format="PNG")
    return buf.getvalue()


def _record(i, image=True):
    first = ("<image>\n" if image else "") + "What color is it?"
    return {
        "id": str(i),
        "conversations": [{"from": "human", "value": first}, {"from": "gpt", "value": "Red."}],
    }


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


class _Exploit:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


@pytest.fixture
def shard_dir(tmp_path):
    good = []
    for i in range(6):
        good += [(f"{i:03d}.json", json.dumps(_record(i, image=i % 3 != 0)).encode())]
        if i % 3 != 0:
            good += [(f"{i:03d}.png", _png())]
    bad = [
        ("100.json", json.dumps(_record(100)).encode()),
        ("100.png", b"\x89PNG not really"),  # corrupt image
        ("101.json", b"{not json"),  # malformed JSON
        ("102.json", json.dumps({"id": "102", "conversations": [{"from": "human", "value": "hi"}]}).encode()),
        ("103.json", json.dumps(_record(103, image=False)).encode()),
        ("103.pyd", pickle.dumps(_Exploit())),
    ]
    _write_tar(tmp_path / "shard-000000.tar", good + bad)
    _write_tar(tmp_path / "shard-000001.tar", good)
    truncated = (tmp_path / "shard-000001.tar").read_bytes()
    (tmp_path / "shard-000002.tar").write_bytes(truncated[:3000])  # cut inside a member
    index = {
        "num_samples": 22,
        "shards": [{"url": f"shard-00000{i}.tar", "num_samples": n} for i, n in enumerate((10, 6, 6))],
    }
    (tmp_path / "index.json").write_text(json.dumps(index))
    return tmp_path


def _module(shard_dir, batch_size=4):
    tok = build_word_tokenizer(["What color is it?", "Red.", "hi"])
    encode = SampleEncoder(tok, get_template("vicuna_v1"), 4, 128)
    return ShardDataModule(
        shard_dir,
        encode,
        partial(collate, pad_token_id=tok.pad_token_id),
        batch_size,
        num_workers=0,
        seed=1,
        shuffle_buffer=8,
    ), tok


def test_stream_skips_and_counts_bad_samples_and_never_unpickles(shard_dir, monkeypatch):
    monkeypatch.chdir(shard_dir)
    dm, tok = _module(shard_dir)
    batches = []
    for batch in dm.train_dataloader():
        batches.append(batch)
        if len(batches) == 12:  # a few epochs over the three shards
            break
    skipped = {}
    for b in batches:
        for kind, n in b.skipped.items():
            skipped[kind] = skipped.get(kind, 0) + n
    assert skipped.get("corrupt_image", 0) >= 1 and skipped.get("bad_json", 0) >= 1
    assert skipped.get("bad_conversation", 0) >= 1 and skipped.get("corrupt_shard", 0) >= 1
    assert not (shard_dir / "PWNED").exists(), "a pickle member in a shard must never be loaded"
    image_id = tok.convert_tokens_to_ids("<image>")
    rows = [b.batch for b in batches]
    mixed = [b for b in rows if b.images is not None and (b.input_ids == image_id).sum(1).eq(0).any()]
    assert mixed, "image and text-only samples share batches"
    for b in rows:
        n_images = 0 if b.images is None else len(b.images)
        assert int((b.input_ids == image_id).sum()) == 4 * n_images


def test_decode_sample_reports_the_bad_member():
    with pytest.raises(SkipSample) as err:
        decode_sample({"__key__": "k", "json": b"[1, 2", "png": _png()})
    assert err.value.kind == "bad_json"
    with pytest.raises(SkipSample) as err:
        decode_sample({"__key__": "k", "json": json.dumps(_record(1)).encode(), "png": b"garbage"})
    assert err.value.kind == "corrupt_image"
    record, image = decode_sample({"__key__": "k", "json": json.dumps(_record(1)).encode(), "png": _png()})
    assert image.shape == (10, 12, 3) and image.dtype == torch.uint8 and record["id"] == "1"


@pytest.mark.parametrize("kind", ["jpeg", "progressive", "grey", "cmyk", "png", "gif"])
def test_decode_image_gives_pils_pixels(kind):
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((96, 64))
    image, fmt, options = {
        "jpeg": (photo, "JPEG", {}),
        "progressive": (photo, "JPEG", {"progressive": True}),
        "grey": (photo.convert("L"), "JPEG", {}),
        "cmyk": (photo.convert("CMYK"), "JPEG", {}),
        "png": (photo, "PNG", {}),
        "gif": (photo.convert("P"), "GIF", {}),
    }[kind]
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    ours = decode_image(buffer.getvalue())
    reference = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    assert ours.shape == (64, 96, 3) and ours.dtype == torch.uint8
    # libjpeg-turbo decodes identically; only its CMYK -> RGB conversion may round differently from PIL's.
    assert np.abs(ours.numpy().astype(int) - reference.astype(int)).max() <= (1 if kind == "cmyk" else 0)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decode_image_refuses_decompression_bombs(fmt, monkeypatch):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format=fmt)
    assert decode_image(buffer.getvalue()).shape == (64, 64, 3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is now over twice the limit
    with pytest.raises((ValueError, Image.DecompressionBombError)):
        decode_image(buffer.getvalue())


def _photo_jpeg(width, height):
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((width, height)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_large_jpegs_decode_at_a_reduced_scale_that_keeps_min_side():
    jpeg = _photo_jpeg(1001, 777)
    full = decode_image(jpeg)
    assert full.shape == (777, 1001, 3)
    assert decode_image(jpeg, min_side=400).shape == full.shape, "777 // 2 < 400: no reduction"
    assert decode_image(jpeg, min_side=150).shape == (195, 251, 3)  # 1/4: 777 // 4 = 194 >= 150 > 777 // 8
    # The scaled IDCT gives about what averaging 4 x 4 blocks of the full decode gives (whole blocks here).
    even = _photo_jpeg(1000, 776)
    quarter = decode_image(even, min_side=150).numpy().astype(float)
    reference = np.asarray(Image.fromarray(decode_image(even).numpy()).reduce(4), dtype=float)
    assert quarter.shape == reference.shape == (194, 250, 3)
    assert np.abs(quarter - reference).mean() < 1
    png = io.BytesIO()
    Image.fromarray(full.numpy()).save(png, format="PNG")
    assert decode_image(png.getvalue(), min_side=150).shape == full.shape, "only JPEGs are scaled"


def test_the_datamodule_passes_decode_min_side_to_its_workers(tmp_path):
    members = []
    for i in range(4):
        members += [
            (f"{i:03d}.json", json.dumps(_record(i)).encode()),
            (f"{i:03d}.jpg", _photo_jpeg(800, 600)),
        ]
    _write_tar(tmp_path / "shard-000000.tar", members)
    index = {"num_samples": 4, "shards": [{"url": "shard-000000.tar", "num_samples": 4}]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    tok = build_word_tokenizer(["What color is it?", "Red."])
    sizes = {}
    for min_side in (None, 100):
        dm = ShardDataModule(
            tmp_path,
            SampleEncoder(tok, get_template("vicuna_v1"), 4, 128),
            partial(collate, pad_token_id=tok.pad_token_id),
            4,
            num_workers=1,
            decode_min_side=min_side,
        )
        sizes[min_side] = next(iter(dm.train_dataloader())).batch.images.sizes
    assert [tuple(s) for s in sizes[None]] == [(600, 800)] * 4
    assert [tuple(s) for s in sizes[100]] == [(150, 200)] * 4  # 1/4: 600 // 8 = 75 < 100


def test_decode_image_rejects_damaged_files():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="JPEG")
    for damaged in (buffer.getvalue()[: len(buffer.getvalue()) // 2], b"\xff\xd8\xff" + b"x" * 64, b""):
        with pytest.raises((OSError, ValueError)):
            decode_image(damaged)


def test_index_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json does not exist"):
        ShardIndex.load(tmp_path)
    (tmp_path / "index.json").write_text("{}")
    with pytest.raises(ValueError, match="index.json is malformed"):
        ShardIndex.load(tmp_path)


def test_every_bad_data_kind_is_skipped_counted_logged_and_training_goes_on(tiny_args, tiny_world, tmp_path):
    """Through train.main: corrupt JPEG, truncated tar, malformed JSON, no assistant turn, too long."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import train
    from datamodules.shards import read_shard
    from lmm.config import TrainConfig

    source = str(tiny_world / "instruct" / "shard-000000.tar")
    good = list(read_shard(source, 0, 35))
    data = tmp_path / "bad_data"
    data.mkdir()

    def members(samples):
        return [(f"{s['__key__']}.{ext}", s[ext]) for s in samples for ext in ("json", "png") if ext in s]

    image = next(s["png"] for s in good if "png" in s)
    long_question = "<image>\n" + " ".join(["red"] * 400)
    bad = [
        ("bad-0.json", json.dumps(_record("bad-0")).encode()),
        ("bad-0.jpg", b"\xff\xd8\xff\xe0 not a jpeg"),
        ("bad-1.json", b'{"id": "bad-1", "conversations": [}'),
        (
            "bad-2.json",
            json.dumps({"id": "bad-2", "conversations": [{"from": "human", "value": "hi"}]}).encode(),
        ),
        (
            "bad-3.json",
            json.dumps(
                {
                    "id": "bad-3",
                    "image": "x.png",
                    "conversations": [
                        {"from": "human", "value": long_question},
                        {"from": "gpt", "value": "Red."},
                    ],
                }
            ).encode(),
        ),
        ("bad-3.png", image),
    ]
    _write_tar(data / "shard-000000.tar", members(good[:24]))
    _write_tar(data / "shard-000001.tar", bad + members(good[24:27]))
    _write_tar(data / "whole.tar", members(good[27:35]))
    whole = (data / "whole.tar").read_bytes()
    (data / "shard-000002.tar").write_bytes(whole[: len(whole) * 3 // 5])  # truncated inside a member
    counts = (24, 7, 8)
    (data / "index.json").write_text(
        json.dumps(
            {"shards": [{"url": f"shard-00000{i}.tar", "num_samples": n} for i, n in enumerate(counts)]}
        )
    )

    args = tiny_args(steps=(1, 5)) + [
        "run_stages=[instruct]",
        f"stages.instruct.data={data}",
        "stages.instruct.max_length=128",
        "qa_eval.questions=null",
    ]
    if "grounding" in {f.name for f in dataclasses.fields(TrainConfig)}:
        args.append("grounding.enabled=false")
    assert train.main(args) == 0, "bad data never stops a run"
    run_dir = tmp_path / "runs" / "t"
    acc = EventAccumulator(str(run_dir / "tensorboard" / "instruct"))
    acc.Reload()
    assert max(e.value for e in acc.Scalars("data/skipped")) > 0
    log_text = (run_dir / "train.log").read_text()
    for kind in ("corrupt_image", "corrupt_shard", "bad_json", "bad_conversation", "too_long"):
        assert acc.Scalars(f"data/skipped_{kind}")[-1].value >= 1, kind
        assert f" {kind} sample(s)" in log_text, kind


def test_an_index_that_overstates_a_shard_counts_the_missing_samples_as_a_bad_shard(tmp_path):
    """Issue 16, case 5: index.json says a shard holds more samples than it does. The positions past the
    shard's real end are counted as ``corrupt_shard`` skips; a batch made only of such positions falls back to
    the slot's first good sample (it used to end in ``AttributeError: '_Missing' object has no attribute
    'get'`` inside the worker)."""
    good = []
    for i in range(4):
        good += [(f"{i:03d}.json", json.dumps(_record(i)).encode()), (f"{i:03d}.png", _png())]
    _write_tar(tmp_path / "shard-000000.tar", good)
    # 4 samples in the tar, 12 in the index: with batches of 4 the slot's positions 4-11 do not exist.
    index = {"shards": [{"url": "shard-000000.tar", "num_samples": 12}]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    dm, _ = _module(tmp_path, batch_size=4)
    assert dm.batches_per_epoch == 3
    batches = []
    for batch in dm.train_dataloader():
        batches.append(batch)
        if len(batches) == 6:  # two epochs
            break
    skipped = sum(b.skipped.get("corrupt_shard", 0) for b in batches)
    assert skipped == 2 * 8, "every position past the shard's end is one corrupt_shard skip"
    keys = {k for b in batches for k in b.keys}
    assert keys <= {f"{i:03d}" for i in range(4)} and len(keys) == 4
    for b in batches:  # a batch of only missing samples still yields one good sample
        assert len(b.keys) >= 1 and len(b.batch) == len(b.keys)


def _stream_keys(module, n):
    """The first ``n`` batches' sample keys, and the tokens those batches hold with their padding."""
    batches, padded = [], 0
    for batch in module.train_dataloader():
        batches.append(batch.keys)
        padded += batch.batch.input_ids.numel()
        if len(batches) == n:
            break
    return batches, padded


def test_length_grouping_reorders_within_groups_and_pads_less(tiny_world):
    """group_by_length=G cuts each run of G batches from the same samples, sorted by (has image, length):
    the same samples per group as without grouping, one modality per batch where the group allows, and less
    padding (tokens the tokenised batches hold, padding included) over an epoch."""
    folder = tiny_world / "instruct"
    records = {}
    for url in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                entry = records.setdefault(key, {"image": False})
                if ext == "json":
                    entry["json"] = len(tar.extractfile(member).read())
                else:
                    entry["image"] = True
    word_tok = build_word_tokenizer(lexicon_texts(ShapesWorldConfig()))

    def module(group):
        encode = SampleEncoder(word_tok, get_template("vicuna_v1"), 4, 512)
        return ShardDataModule(
            folder,
            encode,
            partial(collate, pad_token_id=word_tok.pad_token_id),
            4,
            num_workers=0,
            seed=5,
            shuffle_buffer=1000,
            group_by_length=group,
        )

    plain, grouped = module(0), module(3)
    n = plain.batches_per_epoch // 3 * 3
    assert n >= 6
    (plain_keys, plain_padded), (grouped_keys, grouped_padded) = (
        _stream_keys(plain, n),
        _stream_keys(grouped, n),
    )
    for g in range(0, n, 3):
        flat = [k for b in grouped_keys[g : g + 3] for k in b]
        assert sorted(flat) == sorted(k for b in plain_keys[g : g + 3] for k in b)
        order = [(records[k]["image"], records[k]["json"]) for k in flat]
        assert order == sorted(order, reverse=True), f"group {g // 3} is not sorted by (image, length)"
    assert {k for b in grouped_keys for k in b} == {k for b in plain_keys for k in b}
    # The same samples tokenised, so any difference is padding.
    assert grouped_padded < plain_padded
    mixed = [len({records[k]["image"] for k in batch}) > 1 for batch in grouped_keys]
    text_only = sum(not records[k]["image"] for b in grouped_keys for k in b)
    assert sum(mixed) <= n // 3 and text_only > 0  # at most one batch per group holds both modalities
