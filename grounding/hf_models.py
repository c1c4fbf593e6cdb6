"""Attend-and-segment on transformers' own LLaVA models: ``LlavaForConditionalGeneration`` (llava-hf/llava-1.5-*)
and ``LlavaNextForConditionalGeneration`` (llava-hf/llava-v1.6-*), loaded from local folders.

The processor expands ``<image>`` into one image token per visual feature, so after left padding a sample's
image span is the run of ``config.image_token_id`` in its ``input_ids`` (its CLS feature first when
``vision_feature_select_strategy`` is ``full``, skipped). **LLaVA-1.5**: the span is the 24x24 grid. Images are
padded to a square with the processor's mean colour first (LLaVA-1.5's ``pad`` aspect, which the llava-hf
processor's default short-side resize + centre crop would otherwise lose), so the map is inverted with
``aspect="pad"``: upsampled to the ``max(H, W)`` square and centre-cropped. **LLaVA-NeXT**: the model sees its
usual any-resolution input (the base image plus the high-resolution crops, unpadded, with an ``image_newline``
after every row), and attention is read from the **base 24x24 grid** only, which ``pack_image_features``
places first in the image-token run: the reference's ``--use-base-patches`` mode. The processor makes the
base image by resizing the whole picture to the tower's square without keeping its aspect, so the map is
inverted with ``aspect="resize"``: upsampled straight onto ``H x W``. (Attention still normalises over every
key, crops included, exactly as the reference reads it.) The any-resolution grid would change shape with
every image's aspect ratio, which a fixed-grid ``GroundableModel`` cannot carry. Prompts use LLaVA's
``conv_llava_v1`` (the reference's default) or the processor's own chat template.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from grounding.protocol import PreparedBatch

__all__ = ["HFLlavaGrounding", "VICUNA_V1_SYSTEM", "load_hf_llava", "vicuna_v1_prompt"]

#: LLaVA's ``conv_llava_v1`` system line (the same text as the project's ``vicuna_v1`` template).
VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TEMPLATES = ("vicuna_v1", "chat")
KINDS = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}


def vicuna_v1_prompt(question: str, image_token: str = "<image>") -> str:
    """``conv_llava_v1`` with one image: ``<system> USER: <image>\\n<question> ASSISTANT:``."""
    return f"{VICUNA_V1_SYSTEM} USER: {image_token}\n{question.strip()} ASSISTANT:"


def _expand2square(image: Image.Image, mean: Sequence[float]) -> Image.Image:
    """LLaVA's ``expand2square`` with ``int(255 * mean)`` as the fill colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), tuple(int(255 * m) for m in mean))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class HFLlavaGrounding:
    """A transformers LLaVA / LLaVA-NeXT model and its processor as a ``GroundableModel`` (see module docstring).

    Args:
        model: ``LlavaForConditionalGeneration`` or ``LlavaNextForConditionalGeneration``.
        processor: the matching ``LlavaProcessor`` / ``LlavaNextProcessor``.
        template: ``vicuna_v1`` (LLaVA's ``conv_llava_v1``) or ``chat`` (the processor's chat template).
        aspect: LLaVA-1.5 only: ``pad`` (default: pad to a square first) or ``crop`` (the processor as it is;
            the map is then upsampled onto the whole image, as the reference does for non-pad models).
    """

    def __init__(
        self, model: nn.Module, processor: Any, *, template: str = "vicuna_v1", aspect: str | None = None
    ) -> None:
        from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

        if isinstance(model, LlavaNextForConditionalGeneration):
            self.kind = "llava_next"
        elif isinstance(model, LlavaForConditionalGeneration):
            self.kind = "llava"
        else:
            raise TypeError(f"expected a transformers LLaVA or LLaVA-NeXT model, got {type(model).__name__}")
        if template not in TEMPLATES:
            raise ValueError(f"template {template!r} is not one of {TEMPLATES}")
        if template == "chat" and not getattr(processor, "chat_template", None):
            raise ValueError("template 'chat': the processor has no chat template; use vicuna_v1")
        if self.kind == "llava_next":
            if aspect not in (None, "resize"):
                raise ValueError(
                    "LLaVA-NeXT's base grid is the whole image squashed to a square: aspect 'resize'"
                )
            self.aspect = "resize"
        else:
            if aspect not in (None, "pad", "crop"):
                raise ValueError(f"aspect {aspect!r} is not pad or crop")
            self.aspect = aspect or "pad"
        self.model = model.eval()
        self.processor = processor
        self.template = template
        config = model.config
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        self.grid = (side, side)
        self.image_token_id = int(config.image_token_id)
        # With "full" the CLS feature leads each image's features (LLaVA: the whole run; NeXT: the base image).
        self.leading = 1 if config.vision_feature_select_strategy == "full" else 0
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        self.tokenizer = tokenizer
        self.stop_token_ids = [tokenizer.eos_token_id]
        self.image_token = getattr(processor, "image_token", "<image>")

    @property
    def language_model(self) -> nn.Module:
        # The LLaVA model itself generates; AttentionCapture finds its decoder config and skips the vision tower.
        return self.model

    def _prompt(self, question: str) -> str:
        if self.template == "vicuna_v1":
            return vicuna_v1_prompt(question, self.image_token)
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def image_span(self, input_ids: Tensor) -> tuple[int, int]:
        """(start, end) of the base grid's tokens in one row of ``input_ids`` (see the module docstring)."""
        positions = (input_ids == self.image_token_id).nonzero().flatten().tolist()
        if not positions:
            raise ValueError("a prompt has no image token after processing")
        first, last = positions[0], positions[-1]
        if last - first + 1 != len(positions):
            raise ValueError("a prompt's image tokens are not contiguous (more than one image?)")
        n_grid = self.grid[0] * self.grid[1]
        expected = n_grid + self.leading
        if (self.kind == "llava" and len(positions) != expected) or len(positions) < expected:
            raise ValueError(
                f"{len(positions)} image tokens in a prompt, expected {'' if self.kind == 'llava' else 'at least '}"
                f"{expected} for a {self.grid[0]}x{self.grid[1]} grid"
            )
        start = first + self.leading
        return start, start + n_grid

    def prepare(self, images: Sequence[Image.Image], questions: Sequence[str]) -> PreparedBatch:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        pictures = [image.convert("RGB") for image in images]
        if self.kind == "llava" and self.aspect == "pad":
            mean = self.processor.image_processor.image_mean
            pictures = [_expand2square(picture, mean) for picture in pictures]
        prompts = [self._prompt(q) for q in questions]
        inputs = self.processor(images=pictures, text=prompts, return_tensors="pt", padding=True)
        spans = [self.image_span(row) for row in inputs["input_ids"]]
        device = self.model.device
        dtype = self.model.dtype
        moved = {
            key: (value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device))
            for key, value in inputs.items()
            if isinstance(value, Tensor)
        }
        return PreparedBatch(inputs=moved, image_spans=spans)

    @torch.no_grad()
    def generate(self, batch: PreparedBatch, max_new_tokens: int) -> Tensor:
        out = self.model.generate(
            **batch.inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.stop_token_ids,
        )
        return out[:, batch.inputs["input_ids"].shape[1] :]


def load_hf_llava(
    folder: str | Path,
    *,
    kind: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    template: str = "vicuna_v1",
    aspect: str | None = None,
) -> HFLlavaGrounding:
    """A llava-hf style folder (``LlavaForConditionalGeneration`` or ``LlavaNextForConditionalGeneration`` with its
    processor files) as a ``GroundableModel``. ``kind``: ``llava`` or ``llava_next``; default from config.json."""
    import transformers
    from transformers import AutoProcessor

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a transformers LLaVA folder)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "mm_vision_tower" in config:
        raise ValueError(
            f"{folder}: this is LLaVA's original layout (mm_vision_tower in config.json); load it as llava-1.5"
        )
    model_type = kind or config.get("model_type")
    if model_type not in KINDS:
        raise ValueError(f"{folder}: model_type {model_type!r} is not one of {sorted(KINDS)}")
    if kind is not None and config.get("model_type") != kind:
        raise ValueError(f"{folder}: config.json says model_type {config.get('model_type')!r}, not {kind!r}")
    model_class = getattr(transformers, KINDS[model_type])
    model = model_class.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    processor = AutoProcessor.from_pretrained(folder)
    return HFLlavaGrounding(model.to(device).eval(), processor, template=template, aspect=aspect)
