"""Image-caption pairs of a shard folder, in memory, for pretraining visual towers in-world.

Each image sample of a LLaVA-format shard folder (``index.json`` + ``shard-*.tar``, as the shapes world and
``datamodules.convert`` write them) gives one pair: its image and its first assistant reply (the caption of
a caption-pretraining record). Text-only samples are passed over. The images are fitted once by the tower's
``ImageTransform`` (its geometric half, ``squares``) and kept as uint8 squares, so a tower stage's batches cost
no decoding; the tower normalises them on its device. Batches are drawn without replacement, in an order
seeded by ``seed``; with ``distinct_captions`` no caption appears twice in a batch (``DistinctCaptionBatches``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.errors import SkipSample
from datamodules.shards import ShardIndex, decode_sample, read_shard
from encoders.transform import ImageTransform

log = logging.getLogger(__name__)


def first_reply(record: dict) -> str | None:
    """The first assistant (``gpt``) turn of a LLaVA record: the caption of a caption-pretraining sample."""
    for turn in record.get("conversations", []):
        if turn.get("from") == "gpt" and isinstance(turn.get("value"), str):
            return turn["value"].strip()
    return None


def load_pairs(
    folder: str | Path, fit: Callable[[list[Tensor]], Tensor], limit: int | None = None, chunk: int = 256
) -> tuple[Tensor, list[str]]:
    """(uint8 squares ``(N, 3, S, S)`` fitted by ``fit``, captions) of every image sample in ``folder``."""
    index = ShardIndex.load(folder)
    squares: list[Tensor] = []
    captions: list[str] = []
    pending: list[Tensor] = []
    skipped = 0
    for url, count in zip(index.urls, index.counts, strict=True):
        for raw in read_shard(url, 0, count):
            try:
                record, image = decode_sample(raw)
            except SkipSample:
                skipped += 1
                continue
            caption = first_reply(record)
            if image is None or not caption:
                continue
            pending.append(image)
            captions.append(caption)
            if len(pending) == chunk:
                squares.append(fit(pending))
                pending = []
            if limit is not None and len(captions) >= limit:
                break
        if limit is not None and len(captions) >= limit:
            break
    if pending:
        squares.append(fit(pending))
    if not captions:
        raise ValueError(f"{index.path}: no image sample with a caption (an assistant reply)")
    if skipped:
        log.warning("%s: skipped %d unreadable samples", index.path, skipped)
    return torch.cat(squares), captions


class _Pairs(Dataset):
    def __init__(self, squares: Tensor, captions: list[str]) -> None:
        self.squares, self.captions = squares, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> tuple[Tensor, str]:
        return self.squares[i], self.captions[i]


def _collate(items: list[tuple[Tensor, str]]) -> tuple[Tensor, list[str]]:
    return torch.stack([square for square, _ in items]), [caption for _, caption in items]


class DistinctCaptionBatches(Sampler[list[int]]):
    """Batches of indices in which no caption repeats, in a shuffled order fixed by ``seed`` and the epoch.

    A contrastive loss scores every other caption of the batch as a wrong match, so two images with the same
    caption would each be pushed away from their own text. When captions repeat (the shapes world's object
    captions: 48 phrases over thousands of images), each batch instead holds one image per caption it draws;
    with as many captions as the batch size, every batch holds each caption once, and a pair of captions that
    differ in one word (the shape's kind) is always in the batch to be told apart. Samples that cannot
    complete a batch by the end of the epoch wait for the next permutation (as ``drop_last``).
    """

    def __init__(self, captions: Sequence[str], batch_size: int, seed: int = 0) -> None:
        distinct = len(set(captions))
        if batch_size > distinct:
            raise ValueError(
                f"distinct-caption batches of {batch_size} need at least {batch_size} different captions; "
                f"the data has {distinct} (lower the batch size or turn distinct_captions off)"
            )
        self.captions = list(captions)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self._cached: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at each epoch's start: the next epoch gets the next permutation."""
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        order = torch.randperm(len(self.captions), generator=torch.Generator().manual_seed(self.seed + epoch))
        open_batches: list[tuple[list[int], set[str]]] = []
        done: list[list[int]] = []
        for index in order.tolist():
            caption = self.captions[index]
            # The oldest open batch without this caption takes it, so batches fill in order of their start.
            target = next((b for b in open_batches if caption not in b[1]), None)
            if target is None:
                target = ([], set())
                open_batches.append(target)
            target[0].append(index)
            target[1].add(caption)
            if len(target[0]) == self.batch_size:
                open_batches.remove(target)
                done.append(target[0])
        self._cached = (epoch, done)
        return done

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        return len(self.batches(self.epoch))


class ImageCaptionDataModule(L.LightningDataModule):
    """Shuffled batches of ``(uint8 squares (B, 3, S, S), captions)`` from a shard folder's image samples.

    ``transform``: the tower's ``ImageTransform`` (size, aspect and pad colour; normalising is the tower's).
    Incomplete last batches are dropped (a contrastive batch must hold ``batch_size`` pairs).
    ``distinct_captions``: batches never repeat a caption (``DistinctCaptionBatches``).
    """

    def __init__(
        self,
        folder: str | Path,
        transform: ImageTransform,
        batch_size: int,
        seed: int = 0,
        limit: int | None = None,
        distinct_captions: bool = False,
    ) -> None:
        super().__init__()
        self.distinct_captions = distinct_captions
        self.folder = Path(folder)
        self.transform = transform
        self.batch_size = batch_size
        self.seed = seed
        self.limit = limit
        self._pairs: _Pairs | None = None

    @property
    def pairs(self) -> _Pairs:
        if self._pairs is None:
            squares, captions = load_pairs(self.folder, self.transform.squares, self.limit)
            if len(captions) < self.batch_size:
                raise ValueError(
                    f"{self.folder}: {len(captions)} image-caption pairs are fewer than one batch of "
                    f"{self.batch_size}"
                )
            self._pairs = _Pairs(squares, captions)
        return self._pairs

    def train_dataloader(self) -> DataLoader:
        if self.distinct_captions:
            batches = DistinctCaptionBatches(self.pairs.captions, self.batch_size, self.seed)
            return DataLoader(self.pairs, batch_sampler=batches, collate_fn=_collate, num_workers=0)
        # Each epoch draws the next permutation from this generator: the order is a function of the seed.
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.pairs,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=generator,
            collate_fn=_collate,
            num_workers=0,
        )
