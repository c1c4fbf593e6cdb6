"""Streaming LLaVA-format WebDataset shards into training batches (the training datamodule).

A shard folder holds ``shard-*.tar`` files and an ``index.json`` with per-shard sample counts (written by
the shapes world and by the LLaVA converter). The stream is endless: epoch after epoch, the shard list is
shuffled with a seed that depends on the epoch, split by rank and then by dataloader worker (open_clip's
recipe), read, decoded safely (images, JSON and text only, never pickles), turned into model inputs by an
injected ``encode`` callable (template, label mask, image transform: see ``lmm.preprocess``), shuffled in a
buffer with a seeded RNG, and batched in the workers. A run is bounded by its number of optimizer steps.
Bad samples (corrupt image or shard, malformed JSON, unusable conversation) are skipped and counted; each
batch carries the counts of what its worker skipped since its previous batch, and ``SkippedSamplesLogger``
logs them under ``data/skipped``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


class SkipSample(Exception):
    """A sample that must not train; ``kind`` names the counter it goes to (``corrupt_image``, ``too_long``)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class ShardIndex:
    """The shards of one folder and their sample counts."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @classmethod
    def load(cls, folder: str | Path) -> ShardIndex:
        folder = Path(folder)
        path = folder / "index.json"
        try:
            index = json.loads(path.read_text())
            shards = index["shards"]
            urls = tuple(str(folder / s["url"]) for s in shards)
            counts = tuple(int(s["num_samples"]) for s in shards)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path} does not exist; expected a shard folder with an index.json"
            ) from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{path} is malformed ({err}); expected {{'shards': [{{'url', 'num_samples'}}]}}"
            ) from None
        if not urls:
            raise ValueError(f"{path} lists no shards")
        return cls(urls, counts)


class SkipCounter:
    """Per-worker counts of skipped samples by kind; ``delta()`` returns what is new since the last call."""

    def __init__(self) -> None:
        self.total: Counter[str] = Counter()
        self._reported: Counter[str] = Counter()

    def add(self, kind: str, detail: str = "") -> None:
        self.total[kind] += 1
        if self.total[kind] <= 3 or self.total[kind] % 1000 == 0:
            log.warning("skipped sample (%s, %d so far): %s", kind, self.total[kind], detail[:200])

    def delta(self) -> dict[str, int]:
        new = self.total - self._reported
        self._reported = self.total.copy()
        return dict(new)


def worker_identity() -> tuple[int, int, int, int]:
    """(rank, world_size, worker, num_workers) of the calling process."""
    rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
    return rank, world_size, worker, num_workers


class ShardStream(IterableDataset):
    """The endless training stream of one shard folder; one instance per dataloader (copied into workers)."""

    def __init__(
        self,
        index: ShardIndex,
        encode: Callable[[dict, Image.Image | None], dict],
        collate: Callable[[list[dict]], dict],
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 1000,
    ) -> None:
        super().__init__()
        self.index = index
        self.encode = encode
        self.collate = collate
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer

    def epoch_shards(self) -> Iterator[dict[str, Any]]:
        epoch = 0
        while True:
            urls = list(self.index.urls)
            random.Random(self.seed * 1_000_003 + epoch).shuffle(urls)
            for url in urls:
                yield {"url": url, "epoch": epoch}
            epoch += 1

    def __iter__(self) -> Iterator[dict]:
        rank, _, worker, _ = worker_identity()
        counter = SkipCounter()

        def on_shard_error(err: Exception) -> bool:
            counter.add("corrupt_shard", repr(err))
            return True  # keep going with the next member/shard

        shards = wds.split_by_worker(wds.split_by_node(self.epoch_shards()))
        samples = wds.tariterators.tarfile_samples(shards, handler=on_shard_error)
        encoded = self._encode(samples, counter)
        rng = random.Random(hash((self.seed, rank, worker)))
        shuffled = wds.filters._shuffle(encoded, self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)
        batch: list[dict] = []
        for sample in shuffled:
            batch.append(sample)
            if len(batch) == self.batch_size:
                out = self.collate(batch)
                out["skipped"] = counter.delta()
                yield out
                batch = []

    def _encode(self, samples: Iterator[dict], counter: SkipCounter) -> Iterator[dict]:
        for sample in samples:
            try:
                record, image = decode_sample(sample)
                yield self.encode(record, image)
            except SkipSample as skip:
                counter.add(
                    skip.kind, f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')} {skip.detail}"
                )


def decode_sample(sample: dict[str, Any]) -> tuple[dict, Image.Image | None]:
    """A raw tar sample -> (LLaVA record, PIL image or None). Only JSON and image members are decoded.

    Raises SkipSample (``bad_json`` or ``corrupt_image``) for a member that cannot be decoded.
    """
    if "json" not in sample:
        raise SkipSample("bad_json", "no json member")
    try:
        record = json.loads(sample["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SkipSample("bad_json", str(err)) from None
    if not isinstance(record, dict):
        raise SkipSample("bad_json", "json is not an object")
    image = None
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            try:
                image = Image.open(io.BytesIO(sample[ext]))
                image.load()
                image = image.convert("RGB")
            except Exception as err:  # PIL raises many types for corrupt files
                raise SkipSample("corrupt_image", f"{ext}: {err}") from None
            break
    return record, image


class ShardDataModule(L.LightningDataModule):
    """Training batches from one shard folder, for the stage being trained."""

    def __init__(
        self,
        shard_dir: str | Path,
        encode: Callable[[dict, Image.Image | None], dict],
        collate: Callable[[list[dict]], dict],
        batch_size: int,
        num_workers: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
    ) -> None:
        super().__init__()
        self.index = ShardIndex.load(shard_dir)
        self.stream = ShardStream(self.index, encode, collate, batch_size, seed, shuffle_buffer)
        self.num_workers = num_workers

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            prefetch_factor=4 if self.num_workers > 0 else None,
        )


class SkippedSamplesLogger(L.Callback):
    """Logs ``data/skipped`` (running total) and ``data/skipped_<kind>`` from the counts batches carry."""

    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        skipped = batch.pop("skipped", None) if isinstance(batch, dict) else None
        if skipped:
            self.totals.update(skipped)
            for kind, n in skipped.items():
                log.info("skipped %d %s sample(s) (total %d)", n, kind, self.totals[kind])
        # Running totals since the stage started; logged every step so the curve is visible from step 0.
        pl_module.log("data/skipped", float(sum(self.totals.values())), batch_size=1)
        for kind, n in self.totals.items():
            pl_module.log(f"data/skipped_{kind}", float(n), batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"totals": dict(self.totals)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.totals = Counter(state_dict.get("totals", {}))
