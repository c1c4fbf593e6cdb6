"""Image-caption pairs of a shard folder, in memory, for pretraining visual towers in-world.

Each image sample of a LLaVA-format shard folder (``index.json`` + ``shard-*.tar``, as the shapes world and
``datamodules.convert`` write them) gives one pair: its image and its first assistant reply (the caption of
a caption-pretraining record). Text-only samples are passed over. The images are fitted once by the tower's
``ImageTransform`` (its geometric half, ``squares``) and kept as uint8 squares, so a tower stage's batches cost
no decoding; the tower normalises them on its device. Batches are drawn without replacement, in an order
seeded by ``seed``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

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


class ImageCaptionDataModule(L.LightningDataModule):
    """Shuffled batches of ``(uint8 squares (B, 3, S, S), captions)`` from a shard folder's image samples.

    ``transform``: the tower's ``ImageTransform`` (size, aspect and pad colour; normalising is the tower's).
    Incomplete last batches are dropped (a contrastive batch must hold ``batch_size`` pairs).
    """

    def __init__(
        self,
        folder: str | Path,
        transform: ImageTransform,
        batch_size: int,
        seed: int = 0,
        limit: int | None = None,
    ) -> None:
        super().__init__()
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
