"""``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / 1.6) and ``LlavaOnevisionForConditionalGeneration``.

Each image's token run is the **base** grid first (the whole image squashed to the tower's square: a
``side x side`` grid over the whole image), then the **high-resolution** grid: the image resized to keep its
aspect inside the best "any resolution" canvas, centre-padded, cut into tower-sized tiles, the tiles' feature
grids joined and the padding rows or columns removed again (``unpad_image``), with an ``image_newline`` token
after each row. OneVision then shrinks a grid of more than 1.1 times ``anyres_max_N`` tiles' worth of tokens
bilinearly (same region, fewer cells). The high-resolution block is ``rows x (cols + 1)`` with the newline
column dropped, and its box is the unpadded part of the canvas mapped back onto the image (the processor's
own resize and paste offsets), so it covers the image up to a fraction of a cell.

Read by default (``blocks="highres"``): the high-resolution grid, as the reference's ``llava_next.py``;
``blocks="base"`` is its ``--use-base-patches`` (the only mode before this adapter existed). Feature cells are
taken to be evenly spread over their tile (exact for CLIP-336/14; SigLIP-384/14 leaves the last 6 pixels of a
tile unseen).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from grounding.hf.base import HFGroundable, PromptFormat, load_pretrained, read_model_type, run_lengths
from grounding.layout import Block, Box, ImageLayout, full_box

__all__ = ["HFLlavaNext", "highres_geometry", "load_llava_next", "load_llava_onevision"]

BLOCKS = ("highres", "base")


def highres_geometry(
    image_size: tuple[int, int],
    pinpoints: Sequence[Sequence[int]],
    tile: int,
    side: int,
    max_tiles: int | None,
) -> tuple[tuple[int, int], Box]:
    """``(rows, cols)`` of the high-resolution feature grid (newline excluded) and its box on the image.

    ``image_size`` is ``(H, W)``; ``tile`` the tower's input size in pixels, ``side`` its features per tile
    side; ``max_tiles`` OneVision's ``anyres_max_N`` (None for LLaVA-NeXT). Uses transformers' own
    ``select_best_resolution`` and ``get_patch_output_size`` (the processor's resize) and the formula of
    ``unpad_image``.
    """
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.image_utils import ChannelDimension

    height, width = image_size
    best_h, best_w = select_best_resolution((height, width), [list(p) for p in pinpoints])
    rows, cols = best_h // tile * side, best_w // tile * side
    # unpad_image: remove the feature rows (or columns) that only saw the canvas padding.
    if width / height > cols / rows:
        new = int(round(height * (cols / width), 7))
        pad_r, pad_c = (rows - new) // 2, 0
    else:
        new = int(round(width * (rows / height), 7))
        pad_r, pad_c = 0, (cols - new) // 2
    kept_rows, kept_cols = rows - 2 * pad_r, cols - 2 * pad_c
    # The processor's resize-to-fit and centred paste of the image on the best_h x best_w canvas.
    like_image = np.empty((height, width, 1), dtype=np.uint8)  # only its shape is read
    new_h, new_w = get_patch_output_size(like_image, (best_h, best_w), ChannelDimension.LAST)
    paste_y, paste_x = (best_h - new_h) // 2, (best_w - new_w) // 2
    cell = tile / side
    sy, sx = height / new_h, width / new_w
    box = (
        (pad_c * cell - paste_x) * sx,
        (pad_r * cell - paste_y) * sy,
        ((cols - pad_c) * cell - paste_x) * sx,
        ((rows - pad_r) * cell - paste_y) * sy,
    )
    if max_tiles is not None:
        # LlavaOnevisionModel.pack_image_features: shrink a grid of more than 1.1x max_tiles tiles of tokens.
        ratio = math.sqrt(kept_rows * kept_cols / (max_tiles * side**2))
        if ratio > 1.1:
            kept_rows, kept_cols = int(kept_rows // ratio), int(kept_cols // ratio)
    return (kept_rows, kept_cols), box


def _check_blocks(blocks: str) -> None:
    if blocks not in BLOCKS:
        raise ValueError(f"blocks {blocks!r} is not one of {BLOCKS}")


class HFLlavaNext(HFGroundable):
    """LLaVA-NeXT or LLaVA-OneVision at full resolution (see the module docstring).

    Args:
        blocks: ``highres`` (default, the reference) or ``base``.
    """

    model_classes = ("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        prompt_format: PromptFormat | None = None,
        blocks: str = "highres",
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        _check_blocks(blocks)
        super().__init__(
            model, processor, prompt_format=prompt_format, settings={"blocks": blocks, **(settings or {})}
        )
        self.blocks = blocks
        config = model.config
        self.onevision = type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
        vision = config.vision_config
        self.tile = int(vision.image_size)
        self.side = self.tile // int(vision.patch_size)
        self.pinpoints = [list(p) for p in config.image_grid_pinpoints]
        self.max_tiles = (
            int(config.vision_aspect_ratio.removeprefix("anyres_max_")) if self.onevision else None
        )
        if not self.onevision and config.vision_feature_select_strategy != "default":
            # With "full" a CLS-tower NeXT keeps 577 features per tile, which its own packing cannot lay out.
            raise ValueError("LLaVA-NeXT adapters need vision_feature_select_strategy 'default'")

    def _layouts(self, inputs: Mapping[str, Tensor], images: Sequence[Image.Image]) -> list[ImageLayout]:
        layouts = []
        n_base = self.side * self.side
        for row, (height, width) in zip(inputs["input_ids"], inputs["image_sizes"].tolist(), strict=True):
            (rows, cols), box = highres_geometry(
                (height, width), self.pinpoints, self.tile, self.side, self.max_tiles
            )
            runs = run_lengths(row, self.image_token_id)
            expected = n_base + rows * (cols + 1)
            if len(runs) != 1 or runs[0][1] - runs[0][0] != expected:
                raise ValueError(
                    f"a prompt's image tokens {runs} are not one run of {expected} ({self.side}x{self.side} base "
                    f"+ {rows}x({cols}+1) high-resolution grid)"
                )
            start = runs[0][0]
            base = Block(
                "base", torch.arange(start, start + n_base), (self.side, self.side), full_box(height, width)
            )
            high = Block(
                "highres",
                torch.arange(start + n_base, start + expected),
                (rows, cols + 1),
                box,
                drop_columns=(cols,),
            )
            layouts.append(ImageLayout((height, width), (base, high), read=self.blocks))
        return layouts


def load_llava_next(
    weights: Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prompt_format: PromptFormat | None = None,
    attn_implementation: str = "sdpa",
    blocks: str = "highres",
) -> HFLlavaNext:
    """A llava-hf LLaVA-NeXT folder. Options: ``blocks`` = ``highres`` (default) or ``base``."""
    weights = Path(weights)
    read_model_type(weights, ["llava_next"])
    _check_blocks(blocks)
    model, processor = load_pretrained(
        "LlavaNextForConditionalGeneration",
        weights,
        device=device,
        dtype=dtype,
        attn_implementation=attn_implementation,
    )
    return HFLlavaNext(
        model, processor, prompt_format=prompt_format, blocks=blocks, settings={"model": "hf-llava-next"}
    )


def load_llava_onevision(
    weights: Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prompt_format: PromptFormat | None = None,
    attn_implementation: str = "sdpa",
    blocks: str = "highres",
) -> HFLlavaNext:
    """A llava-hf LLaVA-OneVision folder. Options: ``blocks`` = ``highres`` (default) or ``base``."""
    weights = Path(weights)
    read_model_type(weights, ["llava_onevision"])
    _check_blocks(blocks)
    model, processor = load_pretrained(
        "LlavaOnevisionForConditionalGeneration",
        weights,
        device=device,
        dtype=dtype,
        attn_implementation=attn_implementation,
    )
    return HFLlavaNext(
        model, processor, prompt_format=prompt_format, blocks=blocks, settings={"model": "hf-llava-onevision"}
    )
