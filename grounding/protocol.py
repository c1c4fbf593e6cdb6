"""The small protocol through which attend-and-segment talks to a model, so ``grounding`` never imports ``lmm``.

A groundable model turns images and user questions into a left-padded batch whose image-token positions
are known, generates greedily from it, and exposes the transformers language model whose attention is
captured, its tokenizer, the token grid and the image transform's aspect mode (which the map upsampling
must invert). The project's LMMs implement it in ``lmm.groundable``; transformers' LLaVA models
get their own adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image
from torch import Tensor, nn


@dataclass
class PreparedBatch:
    """What ``generate`` consumes; ``image_spans[b]`` = (start, end) of sample b's image tokens."""

    inputs: Any
    image_spans: list[tuple[int, int]]


class GroundableModel(Protocol):
    tokenizer: Any
    #: (h, w) of the image-token grid the spans cover, row-major.
    grid: tuple[int, int]
    #: "pad", "crop" or "resize": how images were fitted to the encoder's square.
    aspect: str
    #: Token ids that end a response (EOS, or the newline that ends a plain-template caption).
    stop_token_ids: list[int]

    @property
    def language_model(self) -> nn.Module:
        """The module holding the transformers causal LM (what ``AttentionCapture`` wraps)."""

    def prepare(self, images: Sequence[Image.Image], questions: Sequence[str]) -> PreparedBatch:
        """Chat-format the questions with one image each, tokenise, left-pad."""

    def generate(self, batch: PreparedBatch, max_new_tokens: int) -> Tensor:
        """Greedy generation; returns (B, T) new token ids, padded after each sample's EOS."""
