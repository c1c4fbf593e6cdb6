"""What every transformers adapter shares: loading a local folder with its processor, prompts, left-padded
batches of images of any sizes, the check that each layout covers exactly the image's tokens, and greedy
generation.

A family module subclasses :class:`HFGroundable` and implements ``_layouts`` (the processor's output ->
one ``ImageLayout`` per sample). Prompts come from the processor's chat template unless the caller injects
a ``prompt_format(question, image_token) -> str`` (for example LLaVA-1.5's ``conv_llava_v1``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor, nn

from grounding.layout import ImageLayout
from grounding.protocol import PreparedBatch

__all__ = ["HFGroundable", "PromptFormat", "read_model_type", "load_pretrained"]

#: Attention implementations the capture can wrap (others may drop the mask it needs to mirror).
ATTENTION = ("sdpa", "eager")

#: ``(question, image_token) -> prompt``: the whole prompt text with the image placeholder in it once.
PromptFormat = Callable[[str, str], str]


def read_model_type(folder: Path, expected: Sequence[str]) -> str:
    """``model_type`` of a local transformers folder, checked against the family's (one-line errors)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a local transformers model folder)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type not in expected:
        raise ValueError(f"{folder}: model_type {model_type!r} is not one of {list(expected)}")
    return model_type


def load_pretrained(
    class_name: str,
    folder: Path,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    **processor_kwargs: Any,
) -> tuple[nn.Module, Any]:
    """The model (eval mode, on ``device``) and its processor from a local folder.

    ``attn_implementation``: ``sdpa`` (default; ``AttentionCapture`` wraps it) or ``eager``.
    """
    if attn_implementation not in ATTENTION:
        raise ValueError(f"attn_implementation {attn_implementation!r} is not one of {ATTENTION}")
    import transformers
    from transformers import AutoProcessor

    model_class = getattr(transformers, class_name)
    model = model_class.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    processor = AutoProcessor.from_pretrained(folder, **processor_kwargs)
    return model.to(device).eval(), processor


class HFGroundable:
    """A transformers VLM and its processor as a ``grounding.protocol.GroundableModel`` (one image per sample).

    Subclasses set ``model_classes`` and implement ``_layouts``; they may override ``_images`` (pictures
    before the processor sees them) and ``_processor_kwargs`` (per-call processor options).

    Attributes:
        settings: what a run must record to be reproduced (model name, class, preprocessing options, the
            blocks read, the prompt format); ``settings.json`` material.
    """

    model_classes: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        *,
        prompt_format: PromptFormat | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        if type(model).__name__ not in self.model_classes:
            raise TypeError(
                f"{type(self).__name__} expects one of {list(self.model_classes)}, got {type(model).__name__}"
            )
        if prompt_format is None and not getattr(processor, "chat_template", None):
            raise ValueError(
                f"{type(processor).__name__} has no chat template: pass prompt_format(question, image_token)"
            )
        self.model = model.eval()
        self.processor = processor
        self.prompt_format = prompt_format
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        self.tokenizer = tokenizer
        self.stop_token_ids = self._stop_ids()
        self.image_token = processor.image_token
        # The token the processor repeats once per image feature (every family's config names it so).
        self.image_token_id = int(model.config.image_token_id)
        self.settings: dict[str, Any] = {
            "class": type(model).__name__,
            "prompt": getattr(prompt_format, "__name__", "custom") if prompt_format else "chat_template",
            **dict(settings or {}),
        }

    def _stop_ids(self) -> list[int]:
        # Chat models stop at their end-of-turn token, which generation_config lists beside EOS.
        ids = self.model.generation_config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    @property
    def language_model(self) -> nn.Module:
        # The VLM itself generates; AttentionCapture finds its decoder config and leaves the vision tower alone.
        return self.model

    # -- preparing a batch -------------------------------------------------------------------------------------

    def prompt(self, question: str) -> str:
        if self.prompt_format is not None:
            return self.prompt_format(question, self.image_token)
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def _images(self, images: Sequence[Image.Image]) -> list[Any]:
        return list(images)

    def _processor_kwargs(self) -> dict[str, Any]:
        return {}

    def _layouts(self, inputs: Mapping[str, Tensor], images: Sequence[Image.Image]) -> list[ImageLayout]:
        raise NotImplementedError

    def prepare(self, images: Sequence[Image.Image], questions: Sequence[str]) -> PreparedBatch:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if not images:
            raise ValueError("prepare needs at least one image")
        pictures = [image.convert("RGB") for image in images]
        prompts = [self.prompt(q) for q in questions]
        for prompt in prompts:
            if prompt.count(self.image_token) != 1:
                raise ValueError(f"a prompt must hold the image token {self.image_token!r} once: {prompt!r}")
        inputs = self.processor(
            images=self._images(pictures),
            text=prompts,
            return_tensors="pt",
            padding=True,
            padding_side="left",
            **self._processor_kwargs(),
        )
        layouts = self._layouts(inputs, pictures)
        self._check_cover(inputs["input_ids"], layouts)
        device, dtype = self.model.device, self.model.dtype
        moved = {
            key: (value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device))
            for key, value in inputs.items()
            if isinstance(value, Tensor)
        }
        return PreparedBatch(inputs=moved, layouts=layouts)

    def _check_cover(self, input_ids: Tensor, layouts: Sequence[ImageLayout]) -> None:
        # The layout is derived from the processor's metadata; the token run is what the model will see. If a
        # processor or model version changes how it lays out an image, stop before generating wrong maps.
        image_id = self.image_token_id
        for b, layout in enumerate(layouts):
            expected = (input_ids[b] == image_id).nonzero().flatten()
            if not torch.equal(layout.positions(), expected):
                raise ValueError(
                    f"sample {b}: the layout's {len(layout.positions())} positions are not the "
                    f"{len(expected)} image tokens of the prompt ({type(self).__name__} does not know this layout)"
                )

    # -- generation --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, batch: PreparedBatch, max_new_tokens: int) -> Tensor:
        out = self.model.generate(
            **batch.inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.stop_token_ids,
            # A dynamic cache keeps every key in place (a sliding-window layer keeps the last ones, which
            # AttentionCapture maps back); a rolling static cache would reorder them.
            cache_implementation="dynamic",
        )
        return out[:, batch.inputs["input_ids"].shape[1] :]


def run_lengths(row: Tensor, token_id: int) -> list[tuple[int, int]]:
    """``(start, end)`` of every maximal run of ``token_id`` in a 1-D id tensor."""
    positions = (row == token_id).nonzero().flatten().tolist()
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs
