"""The small protocol through which attend-and-segment talks to a model, so ``grounding`` never imports ``lmm``.

A groundable model turns images and user questions into a left-padded batch together with one
``grounding.layout.ImageLayout`` per sample (where that image's tokens sit in the sequence, which of their
grids is read, and where that grid lies on the image), generates greedily from it, and exposes the
transformers language model whose attention is captured and its tokenizer. The project's LMMs implement it
in ``lmm.groundable``; transformers' models get adapters in ``grounding.hf``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image
from torch import Tensor, nn

from grounding.layout import ImageLayout


@dataclass
class PreparedBatch:
    """What ``generate`` consumes, and per sample the layout of its image's tokens (after left padding)."""

    inputs: Any
    layouts: list[ImageLayout]

    @property
    def image_positions(self) -> list[Tensor]:
        """Per sample, the positions of the grid that is read, row-major over that grid (what is captured)."""
        return [layout.view().positions for layout in self.layouts]

    @property
    def image_spans(self) -> list[tuple[int, int]]:
        """``(start, end)`` per sample, for layouts whose read grid is one contiguous run of positions."""
        spans = []
        for positions in self.image_positions:
            start, end = int(positions[0]), int(positions[-1]) + 1
            if not positions.equal(torch.arange(start, end)):
                raise ValueError("an image's read grid is not one contiguous run: use image_positions")
            spans.append((start, end))
        return spans


class GroundableModel(Protocol):
    tokenizer: Any
    #: Token ids that end a response (EOS, or the newline that ends a plain-template caption).
    stop_token_ids: list[int]

    @property
    def language_model(self) -> nn.Module:
        """The module holding the transformers causal LM (what ``AttentionCapture`` wraps)."""

    def prepare(self, images: Sequence[Image.Image], questions: Sequence[str]) -> PreparedBatch:
        """Chat-format the questions with one image each, tokenise, left-pad; one layout per sample."""

    def generate(self, batch: PreparedBatch, max_new_tokens: int) -> Tensor:
        """Greedy generation; returns (B, T) new token ids, padded after each sample's EOS."""
