"""``LlavaForConditionalGeneration`` (llava-hf/llava-1.5-*): one 24x24 grid per image.

The processor expands ``<image>`` into one image token per visual feature, so after left padding a sample's
image tokens are the run of ``config.image_token_id`` (its CLS feature first when
``vision_feature_select_strategy`` is ``full``: a 1x1 ``cls`` block, never read). Images are padded to a
square with the processor's mean colour first (LLaVA-1.5's ``pad`` aspect, ``encoders.base.pad_to_square``),
which the llava-hf processor's default short-side resize + centre crop would otherwise lose, so the grid's
box is the ``max(H, W)`` square around the image; ``aspect="crop"`` keeps the processor as it is and maps the
grid onto the whole image, as the reference does for non-pad models. The reference prompts with LLaVA's
``conv_llava_v1``: pass ``prompt_format=vicuna_v1_prompt`` (the default is the processor's chat template).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from datamodules.templates import IMAGE_PLACEHOLDER, get_template
from encoders.transform import pad_to_square
from grounding.hf.base import HFGroundable, PromptFormat, load_pretrained, read_model_type, run_lengths
from grounding.layout import Block, ImageLayout, full_box, pad_box

__all__ = ["HFLlava", "load", "vicuna_v1_prompt"]

ASPECTS = ("pad", "crop")


def vicuna_v1_prompt(question: str, image_token: str = "<image>") -> str:
    """``conv_llava_v1`` with one image: ``<system> USER: <image>\\n<question> ASSISTANT:`` (the project's
    ``vicuna_v1`` template, with the processor's image token)."""
    prompt = get_template("vicuna_v1").prompt(question, has_image=True)
    return prompt.replace(IMAGE_PLACEHOLDER, image_token, 1)


def _check_aspect(aspect: str) -> None:
    if aspect not in ASPECTS:
        raise ValueError(f"aspect {aspect!r} is not one of {ASPECTS}")


class HFLlava(HFGroundable):
    """LLaVA-1.5 through transformers (see the module docstring). ``aspect``: ``pad`` (default) or ``crop``."""

    model_classes = ("LlavaForConditionalGeneration",)

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        prompt_format: PromptFormat | None = None,
        aspect: str = "pad",
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        _check_aspect(aspect)
        super().__init__(
            model, processor, prompt_format=prompt_format, settings={"aspect": aspect, **(settings or {})}
        )
        self.aspect = aspect
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        self.grid = (side, side)
        self.leading = 1 if model.config.vision_feature_select_strategy == "full" else 0

    def _images(self, images: Sequence[Image.Image]) -> list[Any]:
        if self.aspect != "pad":
            return list(images)
        fill = tuple(int(255 * m) for m in self.processor.image_processor.image_mean)
        return [pad_to_square(image, fill) for image in images]

    def _layouts(self, inputs: Mapping[str, Tensor], images: Sequence[Image.Image]) -> list[ImageLayout]:
        layouts = []
        n_grid = self.grid[0] * self.grid[1]
        for row, image in zip(inputs["input_ids"], images, strict=True):
            runs = run_lengths(row, self.image_token_id)
            if len(runs) != 1 or runs[0][1] - runs[0][0] != n_grid + self.leading:
                raise ValueError(
                    f"a prompt's image tokens {runs} are not one run of {n_grid + self.leading} "
                    f"(a {self.grid[0]}x{self.grid[1]} grid{' after the CLS feature' if self.leading else ''})"
                )
            start = runs[0][0]
            size = (image.height, image.width)
            box = pad_box(*size) if self.aspect == "pad" else full_box(*size)
            blocks = [Block("cls", [start], (1, 1), full_box(*size))] if self.leading else []
            grid_start = start + self.leading
            blocks.append(Block("image", torch.arange(grid_start, grid_start + n_grid), self.grid, box))
            layouts.append(ImageLayout(size, blocks, read="image"))
        return layouts


def load(
    weights: Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prompt_format: PromptFormat | None = None,
    attn_implementation: str = "sdpa",
    aspect: str = "pad",
) -> HFLlava:
    """A llava-hf LLaVA-1.5 folder. Options: ``aspect`` = ``pad`` (LLaVA-1.5's, default) or ``crop``."""
    weights = Path(weights)
    config = (
        (weights / "config.json").read_text(encoding="utf-8") if (weights / "config.json").is_file() else ""
    )
    if "mm_vision_tower" in config:
        raise ValueError(
            f"{weights}: this is LLaVA's original layout (mm_vision_tower in config.json); load it as llava-1.5"
        )
    read_model_type(weights, ["llava"])
    _check_aspect(aspect)
    model, processor = load_pretrained(
        "LlavaForConditionalGeneration",
        weights,
        device=device,
        dtype=dtype,
        attn_implementation=attn_implementation,
    )
    return HFLlava(
        model, processor, prompt_format=prompt_format, aspect=aspect, settings={"model": "hf-llava"}
    )
