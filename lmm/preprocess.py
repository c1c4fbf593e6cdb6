"""Turning one LLaVA record into model inputs (token ids, labels, uint8 image) inside a dataloader worker.

``SampleEncoder`` renders the conversation with a template, tokenises it once with character offsets,
derives the label mask from the template's target spans, expands the single ``<image>`` token into the
encoder's N visual-token slots and truncates to the maximum length. The image is passed on as decoded uint8
pixels; ``lmm.batch`` batches the samples and resizes and normalises the images on the accelerator. Records
that cannot train (no assistant turn, nothing left to learn after truncation, an image placeholder without an
image) raise ``SkipSample`` with a reason the datamodule counts and logs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from datamodules.errors import SkipSample
from datamodules.templates import IMAGE_PLACEHOLDER, ConversationError, Template
from encoders.transform import to_uint8_image
from lmm.batch import IGNORE_INDEX


def image_token_id(tokenizer: Any) -> int:
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {IMAGE_PLACEHOLDER} token; add it with add_special_tokens first")
    return token_id


#: ``_IS_SPACE[c]``: does ``str.isspace`` accept code point ``c``? No code point above U+3000 is
#: whitespace, so larger ones are clipped onto the final ``False`` entry.
_IS_SPACE = np.array([chr(c).isspace() for c in range(0x3001)] + [False])


def token_labels(
    text: str, offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[bool]:
    """For each token (character offsets into ``text``): is it inside one of the target spans?

    A token's leading whitespace is ignored, because tokenizers attach the space before a word to the
    word ("▁Red" covers " Red"), while the target span starts at the word itself. A whitespace-only token
    (the "\n" ending a plain caption) keeps its whole span.
    """
    if not len(offsets):
        return []
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    start, end = bounds[:, 0], bounds[:, 1]
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    visible = np.flatnonzero(~_IS_SPACE[np.minimum(codes, len(_IS_SPACE) - 1)])
    # The first visible character at or after each token's start (len(text) when there is none).
    at = np.searchsorted(visible, start)
    first = np.append(visible, len(text))[at]
    first = np.where(first < end, first, start)
    inside = np.zeros(len(start), dtype=bool)
    for span_start, span_end in spans:
        inside |= (span_start <= first) & (end <= span_end)
    return (inside & (start < end)).tolist()


@dataclasses.dataclass
class SampleEncoder:
    """LLaVA record (+ image or None) -> {input_ids, labels[, image]}; picklable for dataloader workers.

    ``image`` comes out as ``(H, W, 3)`` uint8 at the decoded size (see ``ImageTransform``).
    """

    tokenizer: Any
    template: Template
    num_image_tokens: int
    max_length: int

    def __post_init__(self) -> None:
        self.image_id = image_token_id(self.tokenizer)

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets, special tokens added. A fast tokenizer's Rust backend is called
        directly: the same encoding its Python wrapper returns, without the wrapper's per-call overhead.
        Not when the backend carries truncation or padding settings, which the wrapper switches off."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and backend.truncation is None and backend.padding is None:
            encoding = backend.encode(text, add_special_tokens=True)
            return encoding.ids, encoding.offsets
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        return enc["input_ids"], enc["offset_mapping"]

    def __call__(self, record: dict, image: Image.Image | Tensor | None) -> dict[str, Tensor]:
        has_image = image is not None
        if not has_image and record.get("image"):
            raise SkipSample("missing_image", str(record.get("image")))
        try:
            rendered = self.template.render(record.get("conversations"), has_image)
        except ConversationError as err:
            raise SkipSample("bad_conversation", str(err)) from None
        token_ids, offsets = self._tokenize(rendered.text)
        ids = np.asarray(token_ids, dtype=np.int64)
        targets = np.asarray(token_labels(rendered.text, offsets, rendered.target_spans), dtype=bool)
        labels = np.where(targets, ids, IGNORE_INDEX)
        n = self.num_image_tokens
        if has_image:
            where = np.flatnonzero(ids == self.image_id)
            if len(where) != 1:
                raise SkipSample("bad_conversation", f"{len(where)} image placeholders after tokenisation")
            i = int(where[0])
            if i + n > self.max_length:
                raise SkipSample(
                    "too_long", f"{len(ids) - 1 + n} tokens, image does not fit in {self.max_length}"
                )
            ids = np.concatenate([ids[:i], np.full(n, self.image_id), ids[i + 1 :]])
            labels = np.concatenate([labels[:i], np.full(n, IGNORE_INDEX), labels[i + 1 :]])
        truncated = len(ids) > self.max_length
        if truncated:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if (labels == IGNORE_INDEX).all():
            raise SkipSample("too_long" if truncated else "bad_conversation", "no target token left")
        out = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        if has_image:
            out["image"] = to_uint8_image(image)
        return out
