"""Benchmark-style questions answered and scored by a loaded LMM: batched generation and continuation log-probs.

A benchmark harness (lmms-eval, see ``lmm.lmms_eval_plugin``) hands over (question, image) pairs and wants
either a generated answer or the log-probability of a given answer. ``ChatRunner`` does both the way the
model was instruction-tuned: the question goes into the chat template the model learned (``vicuna_v1`` for
LLaVA-1.5), with ``<image>\\n`` leading the first user turn, and the image through the transform of the
stage that trained it (``pad`` for LLaVA-1.5 instruction tuning). A run of this project is tokenised and
left-padded by the model's own ``LMM.prepare_prompts``; a released LLaVA-1.5 / DiffLMM checkpoint as the
reference runs it (``reference=True``: LLaVA's chunk-wise ``tokenizer_image_token`` and its PIL
``expand2square`` preprocessing), so benchmark numbers are comparable with the published ones.

Generation is greedy unless sampling is asked for; it stops at the template's end-of-turn token (or after
``max_new_tokens``) and the text is cut at the first of the caller's stop strings. A continuation's score is
the summed log-probability of its tokens given the prompt and the image (by default without the
end-of-turn token that would close the reply; ``score_stop=True`` includes it, as LLaVA's own lmms-eval
model does), with ``is_greedy`` true when greedy decoding would produce exactly those tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from datamodules.templates import get_template
from grounding.batching import left_pad
from lmm.model import LMM, PromptBatch

#: Keys of a harness's generation settings that map onto ``transformers``' ``generate``.
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "num_beams")


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (empty stop strings are ignored)."""
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class ChatRunner:
    """Answer and score chat questions with ``model``; see the module docstring.

    Args:
        model: a loaded ``LMM`` (``lmm.run_dir.load_run`` or ``lmm.released.llava15.load_llava15`` /
            ``load_difflmm``), in eval mode.
        template: the chat template the model was instruction-tuned with.
        aspect: the image aspect handling it was trained with (``pad``, ``crop`` or ``resize``).
        reference: tokenise and preprocess as LLaVA's reference code does (released checkpoints).
    """

    def __init__(self, model: LMM, template: str = "vicuna_v1", aspect: str = "pad", reference: bool = False):
        self.model = model.eval()
        self.template = get_template(template)
        self.aspect = aspect
        self.reference = reference
        self.tokenizer = model.llm.tokenizer
        encoder = model.encoder
        if reference:
            from lmm.released.llava15 import LlavaImageTransform

            self.transform = LlavaImageTransform(
                encoder.image_size, encoder.image_mean, encoder.image_std, aspect
            )
        else:
            self.transform = encoder.image_transform(aspect)
        stop = self.tokenizer.eos_token_id
        if self.template.stop_text != self.tokenizer.eos_token:
            # ``plain`` captions end with a newline: the last token of its encoding ends the reply.
            stop = self.tokenizer(self.template.stop_text, add_special_tokens=False)["input_ids"][-1]
        self.stop_token_ids = sorted({stop, self.tokenizer.eos_token_id})

    # -------------------------------------------------------------------------------------- prompts
    def prompt(self, question: str, has_image: bool) -> str:
        """The generation prompt: the question as the first user turn, ending where the reply starts."""
        return self.template.prompt(question, has_image)

    def conversation(self, question: str, answer: str, has_image: bool, score_stop: bool = False) -> str:
        """Prompt + the answer as the model's reply, as training renders it (``score_stop``: with the
        end-of-turn text that closes the reply)."""
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        text = self.template.render(turns, has_image).text
        if not score_stop:
            text = text.removesuffix(self.template.stop_text)
        return text

    def token_ids(self, text: str) -> list[int]:
        """Token ids of a rendered text, ``<image>`` as one placeholder id (not yet expanded)."""
        if self.reference:
            from lmm.released.llava15 import tokenizer_image_token

            return tokenizer_image_token(text, self.tokenizer, [self.model.llm.image_token_id])
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def pixels(self, image: Image.Image | None) -> Tensor | None:
        return None if image is None else self.transform(image.convert("RGB"))

    def batch(self, texts: Sequence[str], images: Sequence[Image.Image | None]) -> PromptBatch:
        """Tokenised, image-expanded, left-padded inputs on the model's device."""
        pixels = [self.pixels(image) for image in images]
        if not self.reference:
            batch = self.model.prepare_prompts(texts, pixels)
        else:
            llm = self.model.llm
            image_id, n_visual = llm.image_token_id, self.model.encoder.num_tokens
            rows = []
            for text, image in zip(texts, images, strict=True):
                ids = self.token_ids(text)
                if ids.count(image_id) != (image is not None):
                    raise ValueError(
                        f"prompt has {ids.count(image_id)} <image> tokens but {'no' if image is None else 'one'} image"
                    )
                if image is not None:
                    at = ids.index(image_id)
                    ids = ids[:at] + [image_id] * n_visual + ids[at + 1 :]
                rows.append(ids)
            input_ids, attention_mask, offsets = left_pad(rows, self.tokenizer.pad_token_id)
            spans = [
                (offset + row.index(image_id), offset + row.index(image_id) + n_visual)
                if image_id in row
                else None
                for row, offset in zip(rows, offsets, strict=True)
            ]
            present = [p for p in pixels if p is not None]
            device = self.model.device
            batch = PromptBatch(
                input_ids.to(device),
                attention_mask.to(device),
                spans,
                torch.stack(present).to(device) if present else None,
            )
        if batch.images is not None:
            batch.images = batch.images.to(dtype=next(self.model.projector.parameters()).dtype)
        return batch

    # ----------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        questions: Sequence[str],
        images: Sequence[Image.Image | None],
        *,
        until: Sequence[str] = (),
        max_new_tokens: int = 128,
        **sampling: Any,
    ) -> list[str]:
        """One answer per question (greedy unless ``sampling`` says otherwise), cut at ``until``."""
        unknown = set(sampling) - set(SAMPLING_KEYS)
        if unknown:
            raise ValueError(f"unsupported generation settings {sorted(unknown)}; expected {SAMPLING_KEYS}")
        if sampling.get("temperature", 0) and sampling.get("do_sample") is None:
            sampling["do_sample"] = True
        if not sampling.get("do_sample", False):
            sampling = {k: v for k, v in sampling.items() if k == "num_beams"}
        texts = [self.prompt(q, image is not None) for q, image in zip(questions, images, strict=True)]
        batch = self.batch(texts, images)
        new = self.model.generate_from(
            batch, max_new_tokens=max_new_tokens, eos_token_id=self.stop_token_ids, **sampling
        )
        return [cut_at_stops(text, until).strip() for text in self.decode(new)]

    def decode(self, new_tokens: Tensor) -> list[str]:
        """New tokens -> texts, each cut at its first end-of-turn token."""
        texts = []
        for row in new_tokens.tolist():
            ends = [row.index(t) for t in self.stop_token_ids if t in row]
            texts.append(self.tokenizer.decode(row[: min(ends, default=len(row))], skip_special_tokens=True))
        return texts

    # -------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def loglikelihood(
        self,
        questions: Sequence[str],
        answers: Sequence[str],
        images: Sequence[Image.Image | None],
        score_stop: bool = False,
    ) -> list[tuple[float, bool]]:
        """(summed log-probability of each answer's tokens after its prompt, is it the greedy answer)."""
        prompts, full = [], []
        for question, answer, image in zip(questions, answers, images, strict=True):
            prompts.append(self.prompt(question, image is not None))
            full.append(self.conversation(question, answer, image is not None, score_stop))
        # As lm-eval does: the answer's tokens are those of prompt + answer after the prompt's own tokens.
        n_answer = [
            len(self.token_ids(f)) - len(self.token_ids(p)) for p, f in zip(prompts, full, strict=True)
        ]
        empty = [q for q, n in zip(questions, n_answer, strict=True) if n < 1]
        if empty:
            raise ValueError(f"an answer adds no token after its prompt (question {empty[0]!r})")
        batch = self.batch(full, images)
        mask = batch.attention_mask
        # Left padding: positions count from each row's first real token, as generation does.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        embeds = self.model.embed_inputs(batch.input_ids, batch.images)
        logits = self.model.llm.model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions
        ).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = batch.input_ids[:, 1:]
        token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        greedy = logprobs.argmax(-1) == targets
        out = []
        for row, n in enumerate(n_answer):
            out.append((float(token_logprobs[row, -n:].sum()), bool(greedy[row, -n:].all())))
        return out
