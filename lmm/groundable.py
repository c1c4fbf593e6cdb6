"""The project's LMMs seen through ``grounding.protocol.GroundableModel``, for attend-and-segment.

``LMMGrounding`` runs a model trained here: each question formatted with the chat template the model was
instructed with, the image transform of the stage that trained it (``pad`` for LLaVA-1.5 instruction
tuning), greedy generation. ``LlavaGrounding`` runs a released LLaVA-1.5 or DiffLMM exactly as the reference
code does: LLaVA's ``conv_llava_v1`` prompt, ``tokenizer_image_token``'s chunk-wise tokenisation and
``LlavaImageTransform``'s PIL preprocessing. Both expose the transformers causal LM inside the LMM (the LoRA
wrapper removed), so ``AttentionCapture`` sees exactly the layers that attend to the visual tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor, nn

from datamodules.templates import get_template
from grounding.batching import left_pad
from grounding.layout import ImageLayout, single_block_layout
from grounding.protocol import PreparedBatch
from lmm.model import LMM, PromptBatch
from lmm.released.llava15 import LlavaImageTransform, tokenizer_image_token


def single_block_layouts(
    spans: Sequence[tuple[int, int]],
    images: Sequence[Image.Image],
    grid: tuple[int, int],
    aspect: str,
    mixing: Tensor | None = None,
) -> list[ImageLayout]:
    """One grid of visual tokens per image, over the encoder's square fitted with ``aspect``; ``mixing``:
    ``(B, n, n)``, each image's ``VisualEncoder.token_mixing``, or None."""
    mixes = [None] * len(images) if mixing is None else list(mixing)
    return [
        single_block_layout(range(*span), grid, (image.height, image.width), aspect, mix)
        for span, image, mix in zip(spans, images, mixes, strict=True)
    ]


@torch.no_grad()
def forward_prompts(model: LMM, batch: PromptBatch) -> None:
    """One forward pass of the language model over ``batch`` (its images embedded), for teacher forcing."""
    embeds = model.embed_inputs(batch.input_ids, batch.images)
    model.llm.model(
        inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False, logits_to_keep=1
    )


class LMMGrounding:
    """A model trained here, prompted with ``template`` and its images fitted with ``aspect``."""

    def __init__(self, model: LMM, template: str = "vicuna_v1", aspect: str = "pad") -> None:
        self.model = model
        self.template = get_template(template)
        self.aspect = aspect
        self.transform = model.encoder.image_transform(aspect)
        self.tokenizer = model.llm.tokenizer
        self.grid = model.encoder.grid
        stop = self.tokenizer.eos_token_id
        if self.template.stop_text != self.tokenizer.eos_token:
            stop = self.tokenizer(self.template.stop_text, add_special_tokens=False)["input_ids"][-1]
        self.stop_token_ids = [stop]

    @classmethod
    def for_current_stage(cls, model: LMM) -> LMMGrounding:
        """With the template and aspect of the stage ``model`` is configured for (instruction tuning's
        ``vicuna_v1`` / ``pad`` before any stage is)."""
        if model.stage is None:
            return cls(model)
        return cls(model, model.stage.template, model.stage.aspect)

    @property
    def language_model(self) -> nn.Module:
        return self.model.llm.causal_lm()

    def prepare(self, images: Sequence[Image.Image], questions: Sequence[str]) -> PreparedBatch:
        pixels = [self.transform(image) for image in images]
        prompts = [self.template.prompt(q, has_image=True) for q in questions]
        batch = self.model.prepare_prompts(prompts, pixels)
        spans = [span for span in batch.image_spans if span is not None]
        with torch.no_grad():
            mixing = None if batch.images is None else self.model.encoder.token_mixing(batch.images)
        return PreparedBatch(
            inputs=batch, layouts=single_block_layouts(spans, images, self.grid, self.aspect, mixing)
        )

    def generate(self, batch: PreparedBatch, max_new_tokens: int) -> Tensor:
        return self.model.generate_from(
            batch.inputs, max_new_tokens=max_new_tokens, eos_token_id=self.stop_token_ids
        )

    def forward(self, batch: PreparedBatch) -> None:
        forward_prompts(self.model, batch.inputs)


class LlavaGrounding:
    """A loaded LLaVA-1.5 / DiffLMM LMM as a ``grounding.protocol.GroundableModel``, run as the reference runs it.

    Prompts use ``conv_llava_v1`` (the ``vicuna_v1`` template), token ids come from ``tokenizer_image_token``,
    and images from ``LlavaImageTransform``; batches are left-padded, so each sample's image span is known.
    """

    def __init__(self, model: LMM, aspect: str | None = None, template: str = "vicuna_v1") -> None:
        self.model = model
        self.aspect = aspect or (model.stage.aspect if model.stage is not None else "pad")
        self.template = get_template(template)
        encoder = model.encoder
        self.transform = LlavaImageTransform(
            encoder.image_size, encoder.image_mean, encoder.image_std, self.aspect
        )
        self.tokenizer = model.llm.tokenizer
        self.grid = encoder.grid
        # conv_llava_v1 ends each reply with "</s>"; LLaVA's generation stops at EOS.
        self.stop_token_ids = [self.tokenizer.eos_token_id]

    @property
    def language_model(self) -> nn.Module:
        return self.model.llm.causal_lm()

    def prepare(self, images: Sequence[Image.Image], questions: Sequence[str]) -> PreparedBatch:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        tok = self.tokenizer
        n_visual = self.model.encoder.num_tokens
        image_ids = [self.model.llm.image_token_id] * n_visual
        rows = [
            tokenizer_image_token(self.template.prompt(q, has_image=True), tok, image_ids) for q in questions
        ]
        input_ids, attention_mask, offsets = left_pad(rows, tok.pad_token_id)
        spans = []
        for offset, ids in zip(offsets, rows, strict=True):
            start = offset + ids.index(image_ids[0])
            spans.append((start, start + n_visual))
        device = self.model.device
        dtype = next(self.model.projector.parameters()).dtype
        pixels = torch.stack([self.transform(image) for image in images]).to(device=device, dtype=dtype)
        batch = PromptBatch(input_ids.to(device), attention_mask.to(device), list(spans), pixels)
        with torch.no_grad():
            mixing = self.model.encoder.token_mixing(pixels)
        return PreparedBatch(
            inputs=batch, layouts=single_block_layouts(spans, images, self.grid, self.aspect, mixing)
        )

    def generate(self, batch: PreparedBatch, max_new_tokens: int) -> Tensor:
        return self.model.generate_from(
            batch.inputs, max_new_tokens=max_new_tokens, eos_token_id=self.stop_token_ids
        )

    def forward(self, batch: PreparedBatch) -> None:
        forward_prompts(self.model, batch.inputs)
