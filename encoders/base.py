"""The visual-encoder interface every encoder implements.

An encoder is a LightningModule that turns a batch of preprocessed images into a sequence of visual
tokens laid out on a (h, w) grid: ``forward(images) -> (B, h * w, embed_dim)``. It owns the image
transform it needs (size, normalisation and aspect handling; ``encoders.transform``), so training and
attend-and-segment apply and invert exactly the same geometry. Encoders keep their pretrained parts frozen
and in eval mode whatever Lightning does with ``train()``; parameters an encoder leaves trainable
(DiffLMM's implicit captioner, the fused block) are trained with the projector. Each encoder class declares
its config dataclass (``encoders.config``) as ``Config``; ``encoders.registry`` finds classes by name.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar

import lightning as L
import torch
from torch import Tensor, nn

from encoders.transform import CLIP_MEAN, CLIP_STD, ImageTransform


class VisualEncoder(L.LightningModule, ABC):
    """Base class: images -> (B, h*w, embed_dim) visual tokens on a fixed grid.

    Subclasses set ``Config`` (a dataclass), build their modules in ``__init__(config)``, list the frozen
    submodules in ``frozen_modules()`` and implement the abstract properties and ``forward``.
    """

    Config: ClassVar[type]

    @property
    @abstractmethod
    def embed_dim(self) -> int:
        """Width of each output token."""

    @property
    @abstractmethod
    def grid(self) -> tuple[int, int]:
        """(h, w) of the token grid; tokens are flattened row-major."""

    @property
    @abstractmethod
    def image_size(self) -> int:
        """Side of the square input image in pixels."""

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return CLIP_MEAN

    @property
    def image_std(self) -> tuple[float, float, float]:
        return CLIP_STD

    def image_transform(self, aspect: str = "pad") -> ImageTransform:
        return ImageTransform(self.image_size, self.image_mean, self.image_std, aspect)

    @abstractmethod
    def forward(self, images: Tensor) -> Tensor:
        """images: (B, 3, S, S) as produced by ``image_transform`` -> (B, h*w, embed_dim)."""

    def token_mixing(self, images: Tensor) -> Tensor | None:
        """``(B, n, n)``: how much of each grid cell's features each output token carries, for an encoder that
        mixes its cells (row ``t`` for token ``t``, rows summing to 1); None when every token is its own cell.
        Attend-and-segment attributes a token's attention back to the cells it came from through it."""
        return None

    def frozen_modules(self) -> Iterator[nn.Module]:
        """Submodules holding pretrained weights that never train (kept in eval mode, not checkpointed)."""
        return iter(())

    def freeze_pretrained(self) -> None:
        for module in self.frozen_modules():
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True) -> VisualEncoder:
        # Lightning calls model.train() at the start of every fit loop; frozen towers must keep their
        # eval behaviour (dropout off, norm statistics fixed) or features differ between train and eval.
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Build random-initialised modules reproducibly, without touching the caller's RNG stream.

    Frozen weights never go into checkpoints, so a randomly initialised frozen tower (the tiny default
    models) must come out identical every time the run is rebuilt from its config.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
