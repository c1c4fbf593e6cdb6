"""The LLaVA JSON -> shards converter on small fake data sets in both LLaVA layouts.

558K-style caption records and 665K-style conversations with images under two roots, a text-only entry,
a missing image, a truncated JPEG, a GIF and a non-record: the good entries become samples the training
stream reads (text-only mixed with image samples), the bad ones are listed by id in skipped.tsv, and an
interrupted conversion finishes on rerun without rewriting its finished shards, byte-identical to an
uninterrupted one.
"""

from __future__ import annotations

import io
import json
from functools import partial
from pathlib import Path

import pytest
from PIL import Image

from datamodules import convert as conv
from datamodules.shards import ShardDataModule, ShardIndex, read_shard
from datamodules.templates import get_template
from datamodules.word_tokenizer import build_word_tokenizer
from lmm.batch import collate
from lmm.preprocess import SampleEncoder


def _image(path: Path, fmt: str = "JPEG", size: tuple[int, int] = (40, 30), color=(200, 30, 30)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _turns(question: str, answer: str, image: bool = True) -> list[dict]:
    first = ("<image>\n" if image else "") + question
    return [{"from": "human", "value": first}, {"from": "gpt", "value": answer}]


@pytest.fixture
def mix665k(tmp_path):
    """A 665K-style file: images under coco/ and gqa/ in two roots, text-only entries and bad entries."""
    root_a, root_b = tmp_path / "images_a", tmp_path / "images_b"
    entries = []
    for i in range(7):
        rel = f"coco/train2017/{i:012d}.jpg"
        _image(root_a / rel, color=(30 * i, 0, 0))
        entries.append(
            {"id": f"{i:012d}", "image": rel, "conversations": _turns("What color is it?", "Red.")}
        )
    _image(root_b / "gqa/images/g1.jpg")
    entries.append({"id": "g1", "image": "gqa/images/g1.jpg", "conversations": _turns("Is it red?", "Yes.")})
    entries.append({"id": "share_0", "conversations": _turns("hi", "Red.", image=False)})  # text-only
    entries.append({"id": "gone", "image": "coco/train2017/missing.jpg", "conversations": _turns("a", "b")})
    good = _image(root_a / "vg/VG_100K/cut.jpg", size=(64, 64))
    (root_a / "vg/VG_100K/cut.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    entries.append({"id": "cut", "image": "vg/VG_100K/cut.jpg", "conversations": _turns("a", "b")})
    _image(root_b / "ocr_vqa/images/o1.gif", fmt="GIF")
    entries.append({"id": "o1", "image": "ocr_vqa/images/o1.gif", "conversations": _turns("Title?", "Red.")})
    entries.append(["not", "a", "record"])
    entries.append({"id": "share_1", "conversations": _turns("What color is it?", "Red.", image=False)})
    path = tmp_path / "llava_v1_5_mix665k.json"
    path.write_text(json.dumps(entries))
    return path, (root_a, root_b), entries


def _samples(out: Path) -> list[dict]:
    index = ShardIndex.load(out)
    samples = []
    for url, count in zip(index.urls, index.counts, strict=True):
        got = list(read_shard(url, 0, count + 5))
        assert len(got) == count
        samples += got
    return samples


def test_mix665k_with_two_roots_text_only_and_bad_entries(mix665k, tmp_path):
    path, roots, entries = mix665k
    out = tmp_path / "shards"
    index = conv.convert(path, roots, out, samples_per_shard=4, workers=2)
    assert index["num_samples"] == 11 and [s["num_samples"] for s in index["shards"]] == [4, 4, 3]
    assert index["text_only"] == 2
    assert index["skipped"] == {"missing_image": 1, "unreadable_image": 1, "bad_record": 1}
    skipped = [line.split("\t") for line in (out / "skipped.tsv").read_text().splitlines()]
    assert [(s[1], s[2]) for s in skipped] == [
        ("gone", "missing_image"),
        ("cut", "unreadable_image"),
        ("", "bad_record"),
    ]
    samples = _samples(out)
    by_id = {json.loads(s["json"])["id"]: s for s in samples}
    assert json.loads(by_id["g1"]["json"]) == entries[7], "records are stored unchanged"
    assert "jpg" in by_id["g1"] and "jpg" in by_id["000000000003"]
    assert "png" in by_id["o1"], "a GIF is re-encoded as PNG"
    assert set(by_id["share_0"]) == {"__key__", "__url__", "json"}, "text-only samples have no image"
    assert by_id["000000000000"]["__key__"] == "000000000"

    # The training stream reads the shards: image and text-only samples share batches.
    tok = build_word_tokenizer(["What color is it?", "Red.", "Is it red?", "Yes.", "hi", "Title?"])
    encode = SampleEncoder(tok, get_template("vicuna_v1"), 4, 256)
    dm = ShardDataModule(out, encode, partial(collate, pad_token_id=tok.pad_token_id), 11, num_workers=0)
    batch = next(iter(dm.train_dataloader()))
    assert len(batch.batch.images) == 9 and len(batch.batch) == 11 and not batch.skipped


def test_blip558k_layout_and_cli(tmp_path, capsys):
    root = tmp_path / "LLaVA-Pretrain" / "images"
    entries = []
    for i in range(5):
        rel = f"{i // 2:05d}/{i:09d}.jpg"
        _image(root / rel)
        human = "Render a clear and concise summary of the photo.\n<image>"
        entries.append(
            {
                "id": f"{i:09d}",
                "image": rel,
                "conversations": [
                    {"from": "human", "value": human},
                    {"from": "gpt", "value": f"a red square number {i}"},
                ],
            }
        )
    path = tmp_path / "blip_laion_cc_sbu_558k.json"
    path.write_text(json.dumps(entries))
    out = tmp_path / "pretrain"
    argv = ["--json", str(path), "--image-root", str(root), "--out", str(out), "--samples-per-shard", "2"]
    assert conv.main([*argv, "--workers", "0", "--no-progress"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["num_samples"] == 5 and len(index["shards"]) == 3 and not index["skipped"]
    assert [json.loads(s["json"])["id"] for s in _samples(out)] == [e["id"] for e in entries]
    assert conv.main([*argv, "--workers", "0", "--no-progress"]) == 0, "a finished conversion is kept"

    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1, "conversations": []}, {"id": 2')
    bad_args = ["--json", str(bad), "--image-root", str(root), "--out", str(tmp_path / "x"), "--no-progress"]
    assert conv.main(bad_args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.json" in err
    assert conv.main([*argv[:-1], "3", "--no-progress"]) == 2, "rerun with other arguments is refused"
    assert "convert_state.json" in capsys.readouterr().err


def test_interrupted_conversion_finishes_without_redoing_shards(mix665k, tmp_path, monkeypatch):
    path, roots, _ = mix665k
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    conv.convert(path, roots, straight, samples_per_shard=3)

    finish = conv.ShardWriter.finish
    calls = []

    def finish_then_die(self, next_entry):  # noqa: ANN001
        finish(self, next_entry)
        calls.append(next_entry)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(conv.ShardWriter, "finish", finish_then_die)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(path, roots, resumed, samples_per_shard=3)
    monkeypatch.setattr(conv.ShardWriter, "finish", finish)
    assert not (resumed / "index.json").exists(), "no index until the conversion is complete"
    first = {p.name: p.stat().st_mtime_ns for p in resumed.glob("shard-*.tar")}
    assert sorted(first) == ["shard-000000.tar", "shard-000001.tar"]
    conv.convert(path, roots, resumed, samples_per_shard=3)
    for name, mtime in first.items():
        assert (resumed / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
    assert json.loads((resumed / "index.json").read_text()) == {
        **json.loads((straight / "index.json").read_text()),
        "source": json.loads((resumed / "index.json").read_text())["source"],
    }
    for shard in straight.glob("shard-*.tar"):
        assert shard.read_bytes() == (resumed / shard.name).read_bytes(), shard.name
    assert (straight / "skipped.tsv").read_text() == (resumed / "skipped.tsv").read_text()
    assert not list(resumed.glob(".*partial"))
