"""``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` and
``Qwen3VLForConditionalGeneration``: one grid per image whose size follows the image.

The processor resizes the whole image (``smart_resize``: each side to a multiple of patch x merge, the pixel
count kept within ``[min_pixels, max_pixels]``) and cuts it into patches; the vision tower merges 2x2 patches
into one token, so the image's tokens are the ``<|image_pad|>`` run between ``<|vision_start|>`` and
``<|vision_end|>``, row-major over ``image_grid_thw[1] // 2 x image_grid_thw[2] // 2``, covering the whole
image. The reference (``qwen2_5vl.py``) runs Qwen2.5-VL with ``max_pixels = 1008 * 1008``; the adapter uses
that cap for every Qwen-VL generation (option ``max_pixels``). M-RoPE is applied to queries and keys before
the attention call, so the capture needs nothing special; Qwen3-VL's deepstack features are added to the
hidden states, not to the attention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from grounding.hf.base import HFGroundable, PromptFormat, load_pretrained, read_model_type, run_lengths
from grounding.layout import Block, ImageLayout, full_box

__all__ = ["HFQwenVL", "MAX_PIXELS", "load_qwen2_vl", "load_qwen2_5_vl", "load_qwen3_vl"]

#: The reference's ``AutoProcessor.from_pretrained(..., max_pixels=1008*1008)``.
MAX_PIXELS = 1008 * 1008


class HFQwenVL(HFGroundable):
    """A Qwen-VL model (see the module docstring). ``max_pixels`` caps the resized image's pixel count."""

    model_classes = (
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen3VLForConditionalGeneration",
    )

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        prompt_format: PromptFormat | None = None,
        max_pixels: int = MAX_PIXELS,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        image_processor = processor.image_processor
        min_pixels = int(image_processor.size["shortest_edge"])
        if max_pixels < min_pixels:
            raise ValueError(f"max_pixels {max_pixels} is below the processor's min_pixels {min_pixels}")
        super().__init__(
            model,
            processor,
            prompt_format=prompt_format,
            settings={"max_pixels": max_pixels, **(settings or {})},
        )
        self.size = {"shortest_edge": min_pixels, "longest_edge": int(max_pixels)}
        self.merge = int(image_processor.merge_size)

    def _processor_kwargs(self) -> dict[str, Any]:
        return {"size": dict(self.size)}

    def _layouts(self, inputs: Mapping[str, Tensor], images: Sequence[Image.Image]) -> list[ImageLayout]:
        layouts = []
        for row, thw, image in zip(
            inputs["input_ids"], inputs["image_grid_thw"].tolist(), images, strict=True
        ):
            t, h, w = thw
            if t != 1:
                raise ValueError(f"an image came out as {t} temporal patches; expected 1")
            grid = (h // self.merge, w // self.merge)
            runs = run_lengths(row, self.image_token_id)
            if len(runs) != 1 or runs[0][1] - runs[0][0] != grid[0] * grid[1]:
                raise ValueError(f"a prompt's image tokens {runs} are not one run of {grid[0]}x{grid[1]}")
            size = (image.height, image.width)
            block = Block("image", torch.arange(*runs[0]), grid, full_box(*size))
            layouts.append(ImageLayout(size, (block,), read="image"))
        return layouts


def _load(
    class_name: str, model_type: str, name: str, weights: Path, max_pixels: int, **common: Any
) -> HFQwenVL:
    weights = Path(weights)
    read_model_type(weights, [model_type])
    if int(max_pixels) <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    prompt_format = common.pop("prompt_format")
    model, processor = load_pretrained(class_name, weights, **common)
    return HFQwenVL(
        model, processor, prompt_format=prompt_format, max_pixels=max_pixels, settings={"model": name}
    )


def load_qwen2_vl(
    weights: Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prompt_format: PromptFormat | None = None,
    attn_implementation: str = "sdpa",
    max_pixels: int = MAX_PIXELS,
) -> HFQwenVL:
    """A Qwen2-VL folder. Options: ``max_pixels`` (default 1008 * 1008)."""
    return _load(
        "Qwen2VLForConditionalGeneration",
        "qwen2_vl",
        "hf-qwen2-vl",
        weights,
        max_pixels,
        device=device,
        dtype=dtype,
        prompt_format=prompt_format,
        attn_implementation=attn_implementation,
    )


def load_qwen2_5_vl(
    weights: Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prompt_format: PromptFormat | None = None,
    attn_implementation: str = "sdpa",
    max_pixels: int = MAX_PIXELS,
) -> HFQwenVL:
    """A Qwen2.5-VL folder. Options: ``max_pixels`` (default 1008 * 1008, the reference's)."""
    return _load(
        "Qwen2_5_VLForConditionalGeneration",
        "qwen2_5_vl",
        "hf-qwen2.5-vl",
        weights,
        max_pixels,
        device=device,
        dtype=dtype,
        prompt_format=prompt_format,
        attn_implementation=attn_implementation,
    )


def load_qwen3_vl(
    weights: Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prompt_format: PromptFormat | None = None,
    attn_implementation: str = "sdpa",
    max_pixels: int = MAX_PIXELS,
) -> HFQwenVL:
    """A Qwen3-VL folder. Options: ``max_pixels`` (default 1008 * 1008)."""
    return _load(
        "Qwen3VLForConditionalGeneration",
        "qwen3_vl",
        "hf-qwen3-vl",
        weights,
        max_pixels,
        device=device,
        dtype=dtype,
        prompt_format=prompt_format,
        attn_implementation=attn_implementation,
    )
