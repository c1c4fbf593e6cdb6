"""Teacher-forced panoptic narrative grounding: the caption's tokens, each segment's map, its point.

As the reference does it (Shengcao-Cao/groundLMM ``aas/infer_attn_png.py`` and ``aas/png.py``): the narrative is
appended to the prompt "Describe the image in detail." as the response, built by encoding each utterance
separately without special tokens and concatenating the ids, so every segment owns a contiguous range of
response tokens; one forward pass gives, for every caption token, the attention of the query *at that token's
own position* to the image tokens (the last ``len(caption)`` query rows of the prefill); the caption's mean map
is subtracted; each evaluated segment's map is its tokens' maps aggregated by ``first`` (the reference's
default: the segment's first token), ``max`` or ``mean``; the map is upsampled to the image and its argmax
pixel is the segment's point, whose mask is the predicted panoptic segment under it
(:func:`grounding.png_data.segment_at`) or a SAM mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from grounding.segment import argmax_point, normalize_maps, upsample_map

__all__ = [
    "AGGREGATIONS",
    "TeacherForcedCaption",
    "aggregate_segment_maps",
    "segment_points",
    "teacher_forced_caption",
]

AGGREGATIONS = ("first", "max", "mean")
Aggregation = Literal["first", "max", "mean"]


@dataclass(frozen=True)
class TeacherForcedCaption:
    """The response of one narrative: its token ids and, per segment, the ``[start, end)`` range of its tokens."""

    token_ids: list[int]
    segment_ranges: list[tuple[int, int]]


def teacher_forced_caption(tokenizer: Any, utterances: Sequence[str]) -> TeacherForcedCaption:
    """Encode each utterance on its own (``add_special_tokens=False``) and concatenate, as the reference does.

    Encoding utterances separately (rather than the joined caption) is what gives each segment its own tokens:
    a SentencePiece tokenizer, for example, starts every utterance with its word-boundary marker.
    """
    if isinstance(utterances, str):
        raise TypeError("utterances: expected a sequence of strings, got one string")
    ids: list[int] = []
    ranges = []
    for utterance in utterances:
        tokens = list(tokenizer.encode(utterance, add_special_tokens=False))
        ranges.append((len(ids), len(ids) + len(tokens)))
        ids.extend(tokens)
    return TeacherForcedCaption(token_ids=ids, segment_ranges=ranges)


def aggregate_segment_maps(
    maps: torch.Tensor, ranges: Sequence[tuple[int, int]], how: Aggregation = "first"
) -> torch.Tensor:
    """One map per range from the ``(n_tokens, ...)`` token maps: the range's ``first`` token, ``max`` or ``mean``."""
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")
    out = []
    for start, end in ranges:
        if not 0 <= start < end <= maps.shape[0]:
            raise ValueError(
                f"token range [{start}, {end}) is empty or outside the {maps.shape[0]} token maps"
            )
        group = maps[start:end]
        out.append(group[0] if how == "first" else group.amax(dim=0) if how == "max" else group.mean(dim=0))
    return torch.stack(out)


def segment_points(
    caption_maps: torch.Tensor,
    caption: TeacherForcedCaption,
    segments: Sequence[int],
    image_size: tuple[int, int],
    aspect: str = "pad",
    how: Aggregation = "first",
) -> tuple[list[tuple[int, int]], list[torch.Tensor]]:
    """Points ``(x, y)`` and upsampled ``(H, W)`` maps of the given segments of one narrative.

    ``caption_maps`` is ``(n_tokens, h, w)``: the raw maps of every caption token at its own position; the mean
    over all of them is subtracted (the reference's normalisation over the caption's rows) before the
    segments' tokens are aggregated; ``segments`` are indices into ``caption.segment_ranges`` (the evaluated
    ones); ``image_size`` is ``(H, W)`` and ``aspect`` the transform to invert (see ``upsample_map``).
    """
    if caption_maps.shape[0] != len(caption.token_ids):
        raise ValueError(f"{caption_maps.shape[0]} maps for {len(caption.token_ids)} caption tokens")
    if not segments:
        return [], []
    grouped = aggregate_segment_maps(
        normalize_maps(caption_maps), [caption.segment_ranges[k] for k in segments], how
    )
    upsampled = [upsample_map(m, image_size, aspect) for m in grouped]
    return [argmax_point(u) for u in upsampled], upsampled
