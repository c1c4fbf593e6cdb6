"""Streaming LLaVA-format WebDataset shards into training batches, for many ranks, with exact resume.

A shard folder holds ``shard-*.tar`` files and an ``index.json`` with per-shard sample counts (written by
the shapes world and by ``datamodules.convert``). Every batch is a pure function of (seed, epoch, rank,
worker, batch number), so the stream's position is one integer and a resumed run sees exactly the
samples the uninterrupted run would have seen. Epoch ``e``: the shards are put in an order seeded by
``(seed, e)``; their samples, concatenated in that order, form the epoch's sequence of N positions. Each of
the ``world_size x workers`` slots (one per rank and dataloader worker) takes an equal contiguous run of
``batches_per_worker x batch_size`` positions (the < slots x batch_size left over are dropped that epoch,
and differ from epoch to epoch), shuffles it in blocks of ``shuffle_buffer`` with a permutation seeded by
``(seed, e, rank, worker, block)``, and cuts batch ``j`` from block-shuffled positions ``[j*B, (j+1)*B)``
(with ``group_by_length`` G, LLaVA's ``group_by_modality_length``: each run of G batches is cut from its G*B
positions sorted by (has an image, JSON size), so a batch pads less; a run depends only on its positions).
Every rank therefore gets the same known number of batches per epoch and none waits at an epoch's end,
image and text-only samples mix in the same batches (unless grouped), and reading is sequential per shard
(a slot opens only the shards its positions fall in). Samples are decoded safely (JSON and images only,
never pickles) and turned into model inputs by an injected ``encode`` (see ``lmm.preprocess``). Bad
samples (corrupt image, truncated or unreadable shard, malformed JSON, unusable conversation, too long) are
skipped and counted: a batch is what is left of its positions (if nothing is, the slot-epoch's first good sample
stands in), and carries the counts of what was skipped (``StreamBatch``), which ``SkippedSamplesLogger`` logs under
``data/skipped``. ``ShardDataModule`` counts the batches the training loop has consumed and stores that
count (with the layout it depends on) in the Lightning checkpoint; on resume each dataloader worker
starts at the batch it would have produced next, so the round-robin order of the workers is kept too.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import simplejpeg
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.errors import SkipSample
from encoders.transform import to_uint8_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
STATE_VERSION = 1
_META_MEMBER = re.compile(r"__[^/]*__($|/)")


@dataclasses.dataclass(frozen=True)
class ShardIndex:
    """The shards of one folder and their sample counts."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    path: str = "index.json"

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
        if min(counts) < 0:
            raise ValueError(f"{path} has a negative num_samples")
        return cls(urls, counts, str(path))


class SkipCounter:
    """Per-process log of skipped samples: the first few of each kind in full, then every 1000th."""

    def __init__(self) -> None:
        self.total: Counter[str] = Counter()

    def add(self, kind: str, detail: str = "") -> None:
        self.total[kind] += 1
        if self.total[kind] <= 3 or self.total[kind] % 1000 == 0:
            log.warning("skipped sample (%s, %d so far): %s", kind, self.total[kind], detail[:200])


def read_shard(url: str, skip: int, take: int) -> Iterator[dict[str, Any]]:
    """Samples ``[skip, skip + take)`` of one tar shard: members grouped by key, raw bytes, nothing decoded.

    Members of the samples before ``skip`` are passed over without being read. A truncated or corrupt tar
    raises (``tarfile.TarError``, ``OSError``) after the samples that could be read.
    """
    key: str | None = None
    number = -1
    sample: dict[str, Any] | None = None
    with open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            if not info.isreg() or _META_MEMBER.match(info.name):
                continue
            base = info.name.rsplit("/", 1)[-1]
            if "." not in base:
                continue
            prefix = info.name[: len(info.name) - len(base)] + base.split(".", 1)[0]
            suffix = base.split(".", 1)[1].lower()
            if prefix != key:
                if sample is not None:
                    yield sample
                    sample = None
                key, number = prefix, number + 1
                if number >= skip + take:
                    return
                if number >= skip:
                    sample = {"__key__": prefix, "__url__": url}
            if sample is not None:
                if suffix in sample:
                    raise tarfile.TarError(f"{url}: duplicate member {info.name}")
                member = tar.extractfile(info)
                sample[suffix] = member.read() if member is not None else b""
    if sample is not None:
        yield sample


def decode_image(data: bytes, min_side: int | None = None) -> Tensor:
    """Encoded image bytes -> ``(H, W, 3)`` uint8 RGB tensor. Raises ``ValueError`` or ``OSError`` when unreadable.

    ``min_side``: a JPEG whose shorter side is at least twice this is decoded at 1/2, 1/4 or 1/8 scale (the
    largest that keeps the shorter side >= ``min_side``), using libjpeg-turbo's scaled IDCT: several times
    faster for large photos, and less to carry to the device. Other formats and smaller JPEGs decode at full
    size.

    JPEGs (nearly all of LLaVA's data) go through simplejpeg, which decodes with libjpeg-turbo straight
    into a writable array (PIL decodes into its own storage and then copies it out); it runs strictly, so
    a damaged JPEG falls through to PIL, which reads what it can or raises. Other formats go to PIL.
    """
    if data[:3] == b"\xff\xd8\xff":
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            height = width = 0  # no readable header: PIL decides below
        # PIL's decompression-bomb limit, which simplejpeg lacks: one forged header must not take a
        # worker's memory.
        if Image.MAX_IMAGE_PIXELS and height * width > 2 * Image.MAX_IMAGE_PIXELS:
            raise ValueError(f"{width} x {height} pixels is over the decompression-bomb limit")
        factor = next((f for f in (8, 4, 2) if min_side and min(height, width) // f >= min_side), 1)
        scaled = {}
        if factor > 1:  # the library picks the largest reduction that keeps both sides at least this large
            scaled = {"min_height": math.ceil(height / factor), "min_width": math.ceil(width / factor)}
        try:
            return torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB", **scaled))
        except ValueError:
            pass  # PIL decides: it reads what libjpeg-turbo's strict mode declines, or raises
    image = Image.open(io.BytesIO(data))
    image.load()
    return to_uint8_image(image)


def decode_sample(sample: dict[str, Any], min_side: int | None = None) -> tuple[dict, Tensor | None]:
    """A raw tar sample -> (LLaVA record, ``(H, W, 3)`` uint8 image or None). Only JSON and image members
    are decoded (``min_side``: see ``decode_image``).

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
                image = decode_image(sample[ext], min_side)
            except Exception as err:  # PIL raises many types for corrupt files
                raise SkipSample("corrupt_image", f"{ext}: {err}") from None
            break
    return record, image


@dataclasses.dataclass
class _Missing:
    """Stands in for a sample that an unreadable shard did not deliver."""

    url: str
    error: str


class ShardStream(IterableDataset):
    """The endless training stream of one shard folder, for one rank (its workers split it further).

    ``rank`` and ``start`` (micro-batches this rank consumed before, for resume) are set by the
    datamodule before the dataloader starts its workers.
    """

    def __init__(
        self,
        index: ShardIndex,
        encode: Callable[[dict, Image.Image | None], dict],
        collate: Callable[[list[dict]], dict],
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        world_size: int = 1,
        workers: int = 1,
        decode_min_side: int | None = None,
        group_by_length: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1 or world_size < 1 or workers < 1:
            raise ValueError("batch_size, world_size and workers must be >= 1")
        if group_by_length < 0:
            raise ValueError(f"group_by_length must be >= 0 micro-batches, got {group_by_length}")
        self.index = index
        self.encode = encode
        self.collate = collate
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.world_size = world_size
        self.workers = workers
        self.decode_min_side = decode_min_side
        self.group_by_length = group_by_length if group_by_length > 1 else 0
        self.rank = 0
        self.start = 0
        slots = world_size * workers
        self.batches_per_worker = index.num_samples // (slots * batch_size)
        if self.batches_per_worker == 0:
            raise ValueError(
                f"{index.path}: {index.num_samples} samples are too few for {world_size} rank(s) x "
                f"{workers} worker(s) x batch {batch_size}"
            )

    # ---------------------------------------------------------------------------------------- layout
    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches each rank gets per epoch (the same on every rank)."""
        return self.workers * self.batches_per_worker

    @property
    def samples_per_slot(self) -> int:
        return self.batches_per_worker * self.batch_size

    def layout(self) -> dict[str, int]:
        """Everything the sample order depends on besides the data itself."""
        layout = {
            "world_size": self.world_size,
            "workers": self.workers,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "num_samples": self.index.num_samples,
            "num_shards": len(self.index.urls),
        }
        if self.group_by_length:  # only when on, so checkpoints from before the option resume exactly
            layout["group_by_length"] = self.group_by_length
        return layout

    def shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.index.urls)))
        random.Random(f"shards:{self.seed}:{epoch}").shuffle(order)
        return order

    def worker_position(self, consumed: int, worker: int) -> int:
        """Batches logical ``worker`` had produced when the rank had consumed ``consumed`` batches."""
        return max(0, (consumed - worker + self.workers - 1) // self.workers)

    # -------------------------------------------------------------------------------------- reading
    def _positions(self, epoch: int, start: int, stop: int) -> Iterator[dict[str, Any] | _Missing]:
        """Raw samples at positions ``[start, stop)`` of epoch ``epoch``'s sequence, in order."""
        offset = 0
        for shard in self.shard_order(epoch):
            count = self.index.counts[shard]
            lo, hi = max(start, offset), min(stop, offset + count)
            if lo < hi:
                url = self.index.urls[shard]
                got = 0
                try:
                    for sample in read_shard(url, lo - offset, hi - lo):
                        got += 1
                        yield sample
                except (OSError, tarfile.TarError, EOFError) as err:
                    error = f"{type(err).__name__}: {err}"
                else:
                    error = f"{url} has fewer samples than index.json says"
                for _ in range(hi - lo - got):
                    yield _Missing(url, error)
            offset += count
            if offset >= stop:
                return

    def _slot_samples(
        self, epoch: int, rank: int, worker: int, first: int
    ) -> Iterator[dict[str, Any] | _Missing]:
        """The slot's block-shuffled samples of one epoch, from output position ``first`` on."""
        per_slot = self.samples_per_slot
        base = (rank * self.workers + worker) * per_slot
        block = min(self.shuffle_buffer, per_slot)
        first_block = first // block
        raw = self._positions(epoch, base + first_block * block, base + per_slot)
        for b in range(first_block, -(-per_slot // block)):
            n = min(block, per_slot - b * block)
            samples = list(islice(raw, n))
            perm = list(range(n))
            random.Random(f"block:{self.seed}:{epoch}:{rank}:{worker}:{b}").shuffle(perm)
            for i in range(max(0, first - b * block), n):
                yield samples[perm[i]]

    def _encode(self, sample: dict[str, Any] | _Missing) -> dict:
        if isinstance(sample, _Missing):
            raise SkipSample("corrupt_shard", f"{sample.url}: {sample.error}")
        record, image = decode_sample(sample, self.decode_min_side)
        return self.encode(record, image)

    def _first_good(self, epoch: int, rank: int, worker: int) -> tuple[str, dict]:
        for sample in self._slot_samples(epoch, rank, worker, 0):
            try:
                encoded = self._encode(sample)  # first: a sample a bad shard did not deliver has no key
            except SkipSample:
                continue
            return _key(sample), encoded
        raise RuntimeError(
            f"{self.index.path}: no usable sample among rank {rank} worker {worker}'s "
            f"{self.samples_per_slot} samples of epoch {epoch}; check the shards"
        )

    def worker_batches(self, rank: int, worker: int, done: int) -> Iterator[StreamBatch]:
        """Batches of logical ``worker`` of ``rank``, endlessly, from its batch number ``done`` on."""
        counter = SkipCounter()
        per_worker, size = self.batches_per_worker, self.batch_size
        group = self.group_by_length or 1
        epoch, first = divmod(done, per_worker)
        while True:
            log.debug("rank %d worker %d: epoch %d from batch %d", rank, worker, epoch, first)
            # A length group is a pure function of its samples, so a resume re-reads the group it stopped in.
            start = first // group * group
            samples = self._slot_samples(epoch, rank, worker, start * size)
            for g in range(start, per_worker, group):
                n_batches = min(group, per_worker - g)
                drawn = list(islice(samples, n_batches * size))
                if group > 1:
                    drawn.sort(key=_length_key, reverse=True)  # stable: ties keep their shuffled order
                for j in range(max(g, first), g + n_batches):
                    yield self._batch(
                        drawn[(j - g) * size : (j - g + 1) * size], counter, epoch, rank, worker, j
                    )
            epoch, first = epoch + 1, 0

    def _batch(
        self,
        drawn: list[dict[str, Any] | _Missing],
        counter: SkipCounter,
        epoch: int,
        rank: int,
        worker: int,
        j: int,
    ) -> StreamBatch:
        good: list[dict] = []
        keys: list[str] = []
        skipped: Counter[str] = Counter()
        for sample in drawn:
            try:
                good.append(self._encode(sample))
                keys.append(_key(sample))
            except SkipSample as skip:
                skipped[skip.kind] += 1
                where = "" if isinstance(sample, _Missing) else f"{sample['__url__']}:{_key(sample)} "
                counter.add(skip.kind, where + skip.detail)
        if not good:  # every sample of the batch was bad: the slot-epoch's first good one stands in
            key, encoded = self._first_good(epoch, rank, worker)
            good, keys = [encoded], [key]
        return StreamBatch(
            self.collate(good), keys, dict(skipped), {"epoch": epoch, "worker": worker, "worker_batch": j}
        )

    def __iter__(self) -> Iterator[StreamBatch]:
        info = get_worker_info()
        physical = 0 if info is None else info.id
        if (1 if info is None else info.num_workers) != self.workers:
            raise RuntimeError(
                f"ShardStream was laid out for {self.workers} worker(s) but runs in "
                f"{1 if info is None else info.num_workers}"
            )
        # The dataloader polls its workers round-robin from worker 0; after a resume at batch ``start``
        # the next batch is due from logical worker ``start % workers``, so the workers are rotated.
        worker = (physical + self.start) % self.workers
        return self.worker_batches(self.rank, worker, self.worker_position(self.start, worker))


@dataclasses.dataclass
class StreamBatch:
    """What the stream yields: the collated batch plus its bookkeeping, which ``ShardDataModule`` takes off
    before the batch moves to the device (``keys`` of the samples in it, ``skipped`` counts by kind, and its
    ``position`` in the stream)."""

    batch: Any
    keys: list[str]
    skipped: dict[str, int]
    position: dict[str, int]

    def pin_memory(self) -> StreamBatch:
        from torch.utils.data._utils.pin_memory import pin_memory

        return dataclasses.replace(self, batch=pin_memory(self.batch))


def _length_key(sample: dict[str, Any] | _Missing) -> tuple[bool, int]:
    """What length grouping sorts by, read without decoding: (has an image, size of its JSON record)."""
    if isinstance(sample, _Missing):
        return (False, 0)
    return (any(ext in sample for ext in IMAGE_EXTENSIONS), len(sample.get("json", b"")))


def _key(sample: dict[str, Any]) -> str:
    return str(sample.get("__key__", "?"))


class ShardDataModule(L.LightningDataModule):
    """Training batches from one shard folder, for the stage being trained; its position is checkpointed.

    ``world_size`` is the number of ranks the trainer will run (checked when the dataloader is built);
    ``sample_log`` (a folder) makes every rank append the sample keys of each consumed batch to
    ``rank<r>.jsonl`` there (for tests and debugging). ``decode_min_side``: see ``decode_image``.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        encode: Callable[[dict, Image.Image | None], dict],
        collate: Callable[[list[dict]], dict],
        batch_size: int,
        num_workers: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        world_size: int = 1,
        sample_log: str | Path | None = None,
        decode_min_side: int | None = None,
        group_by_length: int = 0,
    ) -> None:
        super().__init__()
        self.index = ShardIndex.load(shard_dir)
        self.num_workers = num_workers
        self.stream = ShardStream(
            self.index,
            encode,
            collate,
            batch_size,
            seed,
            shuffle_buffer,
            world_size,
            max(1, num_workers),
            decode_min_side,
            group_by_length,
        )
        self.consumed = 0  # micro-batches the training loop has taken from this rank's stream
        self.skipped: Counter[str] = (
            Counter()
        )  # skipped in those batches, until SkippedSamplesLogger takes them
        self.sample_log = None if sample_log is None else Path(sample_log)

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per rank per epoch."""
        return self.stream.batches_per_epoch

    @property
    def samples_per_epoch(self) -> int:
        """Samples per epoch over all ranks (the index's count less the < ranks x workers x batch dropped)."""
        return self.stream.batches_per_epoch * self.stream.world_size * self.stream.batch_size

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._rank()
        if world_size != self.stream.world_size:
            raise ValueError(
                f"the data stream was laid out for {self.stream.world_size} rank(s) but the trainer runs "
                f"{world_size}; pass world_size=devices x nodes"
            )
        self.stream.rank = rank
        self.stream.start = self.consumed
        if self.consumed:
            epoch, batch = divmod(self.consumed, self.batches_per_epoch)
            log.info("data stream resumes at epoch %d, batch %d of %d", epoch, batch, self.batches_per_epoch)
        return DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            prefetch_factor=4 if self.num_workers > 0 else None,
            # Page-locked batches make the (non-blocking) copy of the packed images to a GPU asynchronous.
            pin_memory=self._device_type() == "cuda",
        )

    def _device_type(self) -> str:
        trainer = self.trainer
        return "cpu" if trainer is None else trainer.strategy.root_device.type

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, StreamBatch):
            return batch
        if self.sample_log is not None:
            self.sample_log.mkdir(parents=True, exist_ok=True)
            with open(self.sample_log / f"rank{self._rank()[0]}.jsonl", "a") as f:
                f.write(json.dumps({**batch.position, "batch": self.consumed, "keys": batch.keys}) + "\n")
        self.consumed += 1
        self.skipped.update(batch.skipped)
        return batch.batch

    def take_skipped(self) -> Counter[str]:
        """Samples skipped (by kind) in the batches handed to the loop since the last call."""
        taken, self.skipped = self.skipped, Counter()
        return taken

    def state_dict(self) -> dict[str, Any]:
        stream = self.stream
        epoch, batch = divmod(self.consumed, stream.batches_per_epoch)
        workers = []
        for w in range(stream.workers):
            done = stream.worker_position(self.consumed, w)
            w_epoch, w_batch = divmod(done, stream.batches_per_worker)
            workers.append(
                {
                    "worker": w,
                    "epoch": w_epoch,
                    "batch": w_batch,
                    "samples_consumed": w_batch * stream.batch_size,
                }
            )
        return {
            "version": STATE_VERSION,
            "consumed_batches": self.consumed,
            "epoch": epoch,
            "batch_in_epoch": batch,
            "batches_per_epoch": stream.batches_per_epoch,
            "layout": stream.layout(),
            "shard_order": [Path(stream.index.urls[i]).name for i in stream.shard_order(epoch)],
            "workers": workers,
            "rng": "shard order seeded by (seed, epoch); block shuffle by (seed, epoch, rank, worker, block)",
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        consumed = int(state_dict.get("consumed_batches", 0))
        saved = state_dict.get("layout", {})
        if saved == self.stream.layout():
            self.consumed = consumed
            return
        # Another layout (ranks, workers, batch size, data): the order cannot be continued exactly; keep
        # the epoch and the fraction of it that was done.
        per_epoch = max(1, int(state_dict.get("batches_per_epoch", 1)))
        epoch, batch = divmod(consumed, per_epoch)
        self.consumed = epoch * self.batches_per_epoch + batch * self.batches_per_epoch // per_epoch
        changed = sorted(
            k for k in {**saved, **self.stream.layout()} if saved.get(k) != self.stream.layout()[k]
        )
        log.warning(
            "data layout changed since the checkpoint (%s): resuming at epoch %d, batch %d approximately, "
            "not exactly",
            ", ".join(changed),
            epoch,
            self.consumed - epoch * self.batches_per_epoch,
        )


class SkippedSamplesLogger(L.Callback):
    """Logs ``data/skipped`` (running total) and ``data/skipped_<kind>`` from the counts batches carry."""

    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        datamodule = trainer.datamodule
        skipped = datamodule.take_skipped() if isinstance(datamodule, ShardDataModule) else {}
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
