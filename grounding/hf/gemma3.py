"""``Gemma3ForConditionalGeneration``: one 16x16 block per image, attended bidirectionally inside the block.

The processor resizes the whole image to the SigLIP tower's square (896 px; no aspect kept) and the projector
average-pools its 64x64 patches to ``mm_tokens_per_image`` = 256 tokens, row-major over 16x16; the prompt's
``<start_of_image>`` becomes ``\\n\\n<start_of_image>`` + 256 ``<image_soft_token>`` + ``<end_of_image>\\n\\n``.
The grid covers the whole image.

Why Gemma 3 and not SmolVLM: its attention has everything the capture must mirror and it does: the image
block's bidirectional mask and the sliding-window layers arrive in the 4D mask, a sliding layer's dynamic
cache hands over only the last ``sliding_window`` keys (the capture maps them back to positions and gives
the image keys that left the window zero, as eager does), queries are scaled by ``query_pre_attn_scalar``
(passed as ``scaling``), and its attention takes no logit soft-capping. Pan-and-scan would add crops as
further images, which one layout per sample does not describe: it is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from grounding.hf.base import HFGroundable, PromptFormat, load_pretrained, read_model_type, run_lengths
from grounding.layout import Block, ImageLayout, full_box

__all__ = ["HFGemma3", "load"]


class HFGemma3(HFGroundable):
    """Gemma 3 (see the module docstring)."""

    model_classes = ("Gemma3ForConditionalGeneration",)

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        prompt_format: PromptFormat | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        if getattr(processor.image_processor, "do_pan_and_scan", False):
            raise ValueError("Gemma 3 with do_pan_and_scan adds crops as extra images: turn it off to ground")
        super().__init__(model, processor, prompt_format=prompt_format, settings=settings)
        self.n_tokens = int(model.config.mm_tokens_per_image)
        self.side = math.isqrt(self.n_tokens)
        if self.side * self.side != self.n_tokens:
            raise ValueError(f"mm_tokens_per_image {self.n_tokens} is not a square grid")

    def _images(self, images: Sequence[Image.Image]) -> list[Any]:
        return [[image] for image in images]  # one image per sample: a nested list, as the processor batches

    def _processor_kwargs(self) -> dict[str, Any]:
        return {"do_pan_and_scan": False}

    def _layouts(self, inputs: Mapping[str, Tensor], images: Sequence[Image.Image]) -> list[ImageLayout]:
        layouts = []
        for row, image in zip(inputs["input_ids"], images, strict=True):
            runs = run_lengths(row, self.image_token_id)
            if len(runs) != 1 or runs[0][1] - runs[0][0] != self.n_tokens:
                raise ValueError(f"a prompt's image tokens {runs} are not one run of {self.n_tokens}")
            size = (image.height, image.width)
            block = Block("image", torch.arange(*runs[0]), (self.side, self.side), full_box(*size))
            layouts.append(ImageLayout(size, (block,), read="image"))
        return layouts


def load(
    weights: Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prompt_format: PromptFormat | None = None,
    attn_implementation: str = "sdpa",
) -> HFGemma3:
    """A Gemma 3 (vision) folder. No options."""
    weights = Path(weights)
    read_model_type(weights, ["gemma3"])
    model, processor = load_pretrained(
        "Gemma3ForConditionalGeneration",
        weights,
        device=device,
        dtype=dtype,
        attn_implementation=attn_implementation,
    )
    return HFGemma3(model, processor, prompt_format=prompt_format, settings={"model": "hf-gemma3"})
