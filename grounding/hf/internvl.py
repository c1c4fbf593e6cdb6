"""``InternVLForConditionalGeneration`` (the transformers port of InternVL 2.5 / 3): tiles plus a thumbnail.

The processor picks a ``cols x rows`` arrangement of tiles whose aspect is closest to the image's
(``get_optimal_tiled_canvas``, between ``min_patches`` and ``max_patches`` tiles), resizes the image to
``cols * tile x rows * tile`` and cuts it into tiles in row-major order, then appends a thumbnail (the whole
image resized to one tile) when there is more than one tile. Each tile becomes ``image_seq_length`` tokens
(16x16 at 448 px, after the pixel shuffle), row-major; the image's tokens are the ``<IMG_CONTEXT>`` run between
``<img>`` and ``</img>``. A tile's box is its share of the image (the canvas is the whole image stretched).

Read by default (``blocks="tile"``): the tiles stitched into one ``(rows * 16, cols * 16)`` grid over the whole
image, thumbnail dropped, as the reference's ``internvl2_5.py``; ``blocks="thumbnail"`` is its
``--use-thumbnail-attention``. The reference's crop range, 3 to 9 tiles, is the default (``min_patches``,
``max_patches``). With a single tile there is no thumbnail and that tile is the whole image either way.
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

__all__ = ["HFInternVL", "load"]

BLOCKS = ("tile", "thumbnail")


def _check_options(blocks: str, min_patches: int, max_patches: int) -> None:
    if blocks not in BLOCKS:
        raise ValueError(f"blocks {blocks!r} is not one of {BLOCKS}")
    if not 1 <= min_patches <= max_patches:
        raise ValueError(f"need 1 <= min_patches <= max_patches, got {min_patches} and {max_patches}")


class HFInternVL(HFGroundable):
    """InternVL (see the module docstring). Options: ``blocks``, ``min_patches``, ``max_patches``."""

    model_classes = ("InternVLForConditionalGeneration",)

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        prompt_format: PromptFormat | None = None,
        blocks: str = "tile",
        min_patches: int = 3,
        max_patches: int = 9,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        _check_options(blocks, min_patches, max_patches)
        super().__init__(
            model,
            processor,
            prompt_format=prompt_format,
            settings={
                "blocks": blocks,
                "min_patches": min_patches,
                "max_patches": max_patches,
                **(settings or {}),
            },
        )
        self.blocks = blocks
        self.min_patches, self.max_patches = min_patches, max_patches
        self.per_tile = int(processor.image_seq_length)
        self.side = math.isqrt(self.per_tile)
        if self.side * self.side != self.per_tile:
            raise ValueError(f"image_seq_length {self.per_tile} is not a square grid of tokens")
        size = processor.image_processor.size
        self.tile_size = (int(size["height"]), int(size["width"]))

    def _processor_kwargs(self) -> dict[str, Any]:
        return {"crop_to_patches": True, "min_patches": self.min_patches, "max_patches": self.max_patches}

    def _layouts(self, inputs: Mapping[str, Tensor], images: Sequence[Image.Image]) -> list[ImageLayout]:
        from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

        layouts = []
        grid = (self.side, self.side)
        for row, image in zip(inputs["input_ids"], images, strict=True):
            height, width = image.height, image.width
            cols, rows = get_optimal_tiled_canvas(
                (height, width), self.tile_size, self.min_patches, self.max_patches
            )
            n_tiles = cols * rows
            expected = self.per_tile * (n_tiles + (1 if n_tiles > 1 else 0))
            runs = run_lengths(row, self.image_token_id)
            if len(runs) != 1 or runs[0][1] - runs[0][0] != expected:
                raise ValueError(
                    f"a prompt's image tokens {runs} are not one run of {expected} ({cols}x{rows} tiles of "
                    f"{self.per_tile}{' and a thumbnail' if n_tiles > 1 else ''})"
                )
            start = runs[0][0]
            blocks = []
            for i in range(n_tiles):
                r, c = divmod(i, cols)
                box = (c * width / cols, r * height / rows, (c + 1) * width / cols, (r + 1) * height / rows)
                positions = torch.arange(start + i * self.per_tile, start + (i + 1) * self.per_tile)
                blocks.append(Block("tile", positions, grid, box, tile=(r, c)))
            if n_tiles > 1:
                positions = torch.arange(start + n_tiles * self.per_tile, start + expected)
                blocks.append(Block("thumbnail", positions, grid, full_box(height, width)))
            read = self.blocks if n_tiles > 1 else "tile"
            layouts.append(ImageLayout((height, width), blocks, read=read))
        return layouts


def load(
    weights: Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prompt_format: PromptFormat | None = None,
    attn_implementation: str = "sdpa",
    blocks: str = "tile",
    min_patches: int = 3,
    max_patches: int = 9,
) -> HFInternVL:
    """An InternVL (``-hf``) folder. Options: ``blocks`` = ``tile`` (default) or ``thumbnail``; ``min_patches``
    and ``max_patches``, the tile count range (default 3 to 9, the reference's)."""
    weights = Path(weights)
    read_model_type(weights, ["internvl"])
    _check_options(blocks, min_patches, max_patches)
    model, processor = load_pretrained(
        "InternVLForConditionalGeneration",
        weights,
        device=device,
        dtype=dtype,
        attn_implementation=attn_implementation,
    )
    return HFInternVL(
        model,
        processor,
        prompt_format=prompt_format,
        blocks=blocks,
        min_patches=min_patches,
        max_patches=max_patches,
        settings={"model": "hf-internvl"},
    )
