"""The project's LMM seen through ``grounding.protocol.GroundableModel``, for attend-and-segment.

It formats each question with the chat template the model was instructed with, applies the image
transform of the stage that trained it (``pad`` for LLaVA-1.5 instruction tuning), and generates greedily.
The language model it exposes is the transformers causal LM inside the LMM (the LoRA wrapper removed), so
``AttentionCapture`` sees exactly the layers that attend to the visual tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image
from torch import Tensor, nn

from grounding.layout import single_block_layout
from grounding.protocol import PreparedBatch
from lmm.model import LMM
from lmm.templates import get_template


class LMMGrounding:
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

    @property
    def language_model(self) -> nn.Module:
        return self.model.llm.causal_lm()

    def prepare(self, images: Sequence[Image.Image], questions: Sequence[str]) -> PreparedBatch:
        pixels = [self.transform(image) for image in images]
        prompts = [self.template.prompt(q, has_image=True) for q in questions]
        batch = self.model.prepare_prompts(prompts, pixels)
        spans = [span for span in batch.image_spans if span is not None]
        layouts = [
            single_block_layout(range(*span), self.grid, (image.height, image.width), self.aspect)
            for span, image in zip(spans, images, strict=True)
        ]
        return PreparedBatch(inputs=batch, layouts=layouts)

    def generate(self, batch: PreparedBatch, max_new_tokens: int) -> Tensor:
        return self.model.generate_from(
            batch.inputs, max_new_tokens=max_new_tokens, eos_token_id=self.stop_token_ids
        )
