"""Turning one LLaVA record into model inputs (token ids, labels, image tensor), and batching them.

``SampleEncoder`` runs inside dataloader workers: it renders the conversation with a template, tokenises
it once with character offsets, derives the label mask from the template's target spans, expands the single
``<image>`` token into the encoder's N visual-token slots, truncates to the maximum length and applies the
image transform. Records that cannot train (no assistant turn, nothing left to learn after truncation, an
image placeholder without an image) raise ``SkipSample`` with a reason the datamodule counts and logs.
``collate`` right-pads a list of encoded samples into one batch of image and text-only samples together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from datamodules.shards import SkipSample
from lmm.templates import IMAGE_PLACEHOLDER, ConversationError, Template

IGNORE_INDEX = -100


def image_token_id(tokenizer: Any) -> int:
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {IMAGE_PLACEHOLDER} token; add it with add_special_tokens first")
    return token_id


def token_labels(
    text: str, offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[bool]:
    """For each token (character offsets into ``text``): is it inside one of the target spans?

    A token's leading whitespace is ignored, because tokenizers attach the space before a word to the
    word ("▁Red" covers " Red"), while the target span starts at the word itself.
    """
    flags = []
    for start, end in offsets:
        first = start
        while first < end and text[first].isspace():
            first += 1
        if first == end:  # a whitespace-only token ("\n" ending a plain caption) keeps its whole span
            first = start
        flags.append(start < end and any(s <= first and end <= e for s, e in spans))
    return flags


@dataclasses.dataclass
class SampleEncoder:
    """LLaVA record (+ PIL image or None) -> {input_ids, labels, image}; picklable for dataloader workers."""

    tokenizer: Any
    template: Template
    num_image_tokens: int
    max_length: int
    image_transform: Callable[[Image.Image], Tensor] | None = None

    def __post_init__(self) -> None:
        self.image_id = image_token_id(self.tokenizer)

    def __call__(self, record: dict, image: Image.Image | None) -> dict[str, Tensor]:
        has_image = image is not None
        if not has_image and record.get("image"):
            raise SkipSample("missing_image", str(record.get("image")))
        try:
            rendered = self.template.render(record.get("conversations"), has_image)
        except ConversationError as err:
            raise SkipSample("bad_conversation", str(err)) from None
        enc = self.tokenizer(rendered.text, return_offsets_mapping=True, add_special_tokens=True)
        ids: list[int] = list(enc["input_ids"])
        targets = token_labels(rendered.text, enc["offset_mapping"], rendered.target_spans)
        labels = [t if is_target else IGNORE_INDEX for t, is_target in zip(ids, targets, strict=True)]
        if has_image:
            where = [i for i, t in enumerate(ids) if t == self.image_id]
            if len(where) != 1:
                raise SkipSample("bad_conversation", f"{len(where)} image placeholders after tokenisation")
            i = where[0]
            n = self.num_image_tokens
            ids = ids[:i] + [self.image_id] * n + ids[i + 1 :]
            labels = labels[:i] + [IGNORE_INDEX] * n + labels[i + 1 :]
        truncated = len(ids) > self.max_length
        if truncated:
            if has_image and ids.index(self.image_id) + self.num_image_tokens > self.max_length:
                raise SkipSample("too_long", f"{len(ids)} tokens, image does not fit in {self.max_length}")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise SkipSample("too_long" if truncated else "bad_conversation", "no target token left")
        out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if has_image:
            if self.image_transform is None:
                raise ValueError("SampleEncoder got an image but has no image_transform")
            out["image"] = self.image_transform(image)
        return out


def collate(samples: Sequence[dict[str, Tensor]], pad_token_id: int) -> dict[str, Tensor]:
    """Right-pad a list of encoded samples; ``images`` holds the images of the samples that have one, in order."""
    length = max(len(s["input_ids"]) for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[row, :n] = sample["input_ids"]
        labels[row, :n] = sample["labels"]
        attention_mask[row, :n] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    images = [s["image"] for s in samples if "image" in s]
    if images:
        out["images"] = torch.stack(images)
    return out
