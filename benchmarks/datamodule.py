"""Throughput of the training datamodule against a bare WebDataset read-and-decode loop, and of the converter.

Builds a fake LLaVA-1.5 data set in a temporary folder (photo-like JPEGs of COCO size, 665K-style
multi-turn conversations, one in six text-only), converts it with ``datamodules.convert`` (entries/s),
then reads the same shards three ways, each in the same number of dataloader workers, alternating rounds
so that load drifts on a shared machine hit both alike:

- bare: ``webdataset.WebDataset(urls).decode("pil")``, touching every decoded image (read + decode only);
- stream decode-only: the datamodule's own reading and decoding (simplejpeg for JPEGs, into uint8 arrays)
  with an identity sample encoder, which separates its decoding speed from the text work;
- datamodule: ``ShardDataModule`` batches for one epoch (read, decode to uint8, vicuna_v1 template,
  tokenise, label mask, 576 image tokens, collate into batches of 16 with the images packed).

The CLIP-336 "pad" resize and normalisation run after the batch reaches the accelerator
(``LMM.encoder_pixels`` in the training step), not in the datamodule; the table also shows what that step
costs when it runs on this machine's CPU, per batch, measured on the first batches of the epoch.

Prints one table; goal: datamodule >= 0.9 x bare.

    python benchmarks/datamodule.py [--samples 480] [--workers 0] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from datamodules.convert import convert  # noqa: E402
from datamodules.shards import ShardDataModule, ShardIndex  # noqa: E402
from datamodules.templates import get_template  # noqa: E402
from datamodules.word_tokenizer import build_word_tokenizer  # noqa: E402
from encoders.transform import CLIP_MEAN, CLIP_STD, ImageTransform  # noqa: E402
from lmm.batch import TrainBatch, collate  # noqa: E402
from lmm.preprocess import SampleEncoder  # noqa: E402

WORDS = "the a red blue green small large circle square triangle left right top bottom of in is what color where how many shapes image picture there are".split()


def photos() -> list[np.ndarray]:
    try:
        from skimage import data

        return [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    except Exception:  # scikit-image is a dev dependency: fall back to smooth random images
        rng = np.random.default_rng(0)
        return [np.clip(rng.normal(128, 40, (480, 640, 3)), 0, 255).astype(np.uint8) for _ in range(4)]


def make_dataset(root: Path, n: int) -> tuple[Path, Path]:
    """A 665K-style JSON plus COCO-sized JPEGs (640 x 480-ish crops of photos, quality 90)."""
    rng = np.random.default_rng(0)
    base = photos()
    images = root / "images"
    entries = []
    for i in range(n):
        turns = []
        for _ in range(int(rng.integers(1, 4))):
            question = " ".join(rng.choice(WORDS, int(rng.integers(6, 20))))
            answer = " ".join(rng.choice(WORDS, int(rng.integers(10, 60))))
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer + "."}]
        entry = {"id": str(i), "conversations": turns}
        if i % 6:
            photo = Image.fromarray(base[i % len(base)])
            w, h = int(rng.integers(480, 641)), int(rng.integers(360, 481))
            photo = photo.resize((max(w, photo.width), max(h, photo.height))).crop((0, 0, w, h))
            rel = f"coco/train2017/{i:012d}.jpg"
            (images / rel).parent.mkdir(parents=True, exist_ok=True)
            photo.save(images / rel, format="JPEG", quality=90)
            entry["image"] = rel
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
        entries.append(entry)
    path = root / "mix.json"
    path.write_text(json.dumps(entries))
    return path, images


def bare_loop(shards: Path, workers: int) -> tuple[int, float]:
    index = ShardIndex.load(shards)
    dataset = wds.WebDataset(list(index.urls), shardshuffle=False, nodesplitter=wds.split_by_node)
    dataset = dataset.decode("pil")
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    start, n = time.perf_counter(), 0
    for sample in loader:
        image = sample.get("jpg")
        if image is not None:
            image.getpixel((0, 0))
        n += 1
    return n, time.perf_counter() - start


def decoded_only(record: dict, image: Image.Image | None) -> dict:
    return {"image": image}


def count_only(samples: list[dict]) -> TrainBatch:
    zeros = torch.zeros(len(samples), 1)
    return TrainBatch(zeros, zeros, zeros)


def datamodule_loop(
    shards: Path, workers: int, full: bool = True, batch_size: int = 16, keep: int = 0
) -> tuple[int, float, list[TrainBatch]]:
    if full:
        tok = build_word_tokenizer([" ".join(WORDS) + "."])
        encode = SampleEncoder(tok, get_template("vicuna_v1"), 576, 2048)
        batcher = partial(collate, pad_token_id=tok.pad_token_id)
    else:
        encode, batcher = decoded_only, count_only
    dm = ShardDataModule(shards, encode, batcher, batch_size, num_workers=workers)
    loader = dm.train_dataloader()
    kept: list[dict] = []
    start, n = time.perf_counter(), 0
    for i, streamed in enumerate(loader):
        batch = streamed.batch
        n += len(batch)
        if len(kept) < keep:
            kept.append(batch)
        if i + 1 == dm.batches_per_epoch:
            break
    seconds = time.perf_counter() - start
    del loader
    return n, seconds, kept


def device_transform_ms(batches: list[TrainBatch]) -> float:
    """Milliseconds per batch of unpacking + CLIP-336 pad transform, as the LightningModule runs it."""
    transform = ImageTransform(336, CLIP_MEAN, CLIP_STD, "pad")
    images = [b.images for b in batches if b.images is not None]
    images[0].to_pixels(transform)  # warm-up
    start = time.perf_counter()
    for packed in images:
        packed.to_pixels(transform)
    return (time.perf_counter() - start) / len(images) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=480)
    parser.add_argument("--workers", type=int, default=0, help="dataloader workers for both loops")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    # Dataloader workers run torch with one thread; do the same in-process (more threads only spin-wait
    # on these small per-image ops, badly so on shared cores).
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        json_path, images = make_dataset(root, args.samples)
        start = time.perf_counter()
        index = convert(json_path, [images], root / "shards", samples_per_shard=100, workers=0)
        convert_rate = args.samples / (time.perf_counter() - start)
        bare, stream, dm, transform_ms = [], [], [], []
        for _ in range(args.rounds):
            n, s = bare_loop(root / "shards", args.workers)
            bare.append(n / s)
            n, s, _ = datamodule_loop(root / "shards", args.workers, full=False)
            stream.append(n / s)
            n, s, kept = datamodule_loop(root / "shards", args.workers, keep=4)
            dm.append(n / s)
            transform_ms.append(device_transform_ms(kept))
        b, st, d = statistics.median(bare), statistics.median(stream), statistics.median(dm)
        print(
            f"{args.samples} samples ({index['text_only']} text-only), {args.workers} worker(s), "
            f"median of {args.rounds} rounds, {os.cpu_count()} CPUs"
        )
        print(f"| {'what':<58} | {'samples/s':>10} |")
        print(f"|{'-' * 60}|{'-' * 12}|")
        print(f"| {'converter (JSON + JPEG check -> shards, 1 process)':<58} | {convert_rate:>10.1f} |")
        print(f"| {'bare WebDataset loop (read + PIL decode)':<58} | {b:>10.1f} |")
        print(f"| {'datamodule stream, read + decode only (identity encode)':<58} | {st:>10.1f} |")
        print(f"| {'datamodule (decode, template, tokenise, pack batch)':<58} | {d:>10.1f} |")
        print(f"| {'ratio stream decode-only / bare':<58} | {st / b:>10.2f} |")
        print(f"| {'ratio datamodule / bare (goal >= 0.9)':<58} | {d / b:>10.2f} |")
        print(f"| {'ratio datamodule / its own decode-only stream':<58} | {d / st:>10.2f} |")
        ms = statistics.median(transform_ms)
        print(f"| {'device-side pad transform on this CPU, ms per batch of 16':<58} | {ms:>10.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
