"""Referring expression segmentation with attend-and-segment: the point from a response's maps, the proposal it picks.

As the reference does it (Shengcao-Cao/groundLMM ``aas/res.py`` and ``aas/upper_bound_res.py``): the model
describes ``Describe the "{}" in the image.`` greedily; every generation step's map (the stop step's included)
has the mean of all of them subtracted; the point is the argmax of the element-wise maximum of the first 8
steps' maps upsampled to the image (``res.py``), or the argmax of the map of the token right after the first
"is" (``upper_bound_res.py``); the mask is the highest-scoring instance proposal that contains the point, and
an empty mask when none does (or when the response has no "is"), which scores IoU 0 with the whole GT in the
union. :func:`best_proposal` is the proposals' upper bound: the proposal with the highest IoU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from grounding.coco_io import MaskLike, decode_rle, iou_matrix, to_rle
from grounding.segment import argmax_point, upsample_map

__all__ = ["POINT_MODES", "best_proposal", "res_point", "row_after_word", "select_proposal"]

POINT_MODES = ("first_tokens", "after_is")
PointMode = Literal["first_tokens", "after_is"]


def row_after_word(token_texts: Sequence[str], word: str = "is") -> int | None:
    """The step right after the first token that reads ``word`` (None if there is none, or it is the last).

    ``token_texts[i]`` is the decoded text of generated token ``i`` (one token decoded alone), stop token
    included; surrounding spaces are ignored (a byte-level BPE decodes " is", SentencePiece "is"). The reference
    compares ``tokenizer.decode(token) == 'is'`` over the tokens after its ``--offset`` and takes the map of
    the step after the match.
    """
    for i in range(1, len(token_texts)):
        if token_texts[i - 1].strip() == word:
            return i
    return None


def res_point(
    rows: torch.Tensor,
    image_size: tuple[int, int],
    aspect: str = "pad",
    *,
    mode: PointMode = "first_tokens",
    first_tokens: int = 8,
    token_texts: Sequence[str] | None = None,
    word: str = "is",
) -> tuple[int, int] | None:
    """The ``(x, y)`` point of one expression, or None (no "is" in the response: no prediction).

    ``rows`` is ``(n_rows, h, w)``: the normalised maps of every generation step, stop step included (see
    ``grounding.segment.normalize_response_maps`` with ``n_tokens = n_rows``). ``first_tokens``: the maximum
    over the first ``first_tokens`` steps' maps, each upsampled first (bicubic upsampling of a maximum is not
    the maximum of the upsampled maps). ``after_is``: the map of :func:`row_after_word` over ``token_texts``.
    """
    if rows.ndim != 3 or rows.shape[0] == 0:
        raise ValueError(f"expected (n_rows, h, w) maps with n_rows >= 1, got shape {tuple(rows.shape)}")
    if mode == "first_tokens":
        if first_tokens < 1:
            raise ValueError(f"first_tokens must be >= 1, got {first_tokens}")
        upsampled = torch.stack([upsample_map(r, image_size, aspect) for r in rows[:first_tokens]])
        return argmax_point(upsampled.amax(dim=0))
    if mode == "after_is":
        if token_texts is None or len(token_texts) != rows.shape[0]:
            raise ValueError(f"after_is needs one decoded token per row ({rows.shape[0]} rows)")
        index = row_after_word(token_texts, word)
        return None if index is None else argmax_point(upsample_map(rows[index], image_size, aspect))
    raise ValueError(f"mode must be one of {POINT_MODES}, got {mode!r}")


def _dense(mask: MaskLike) -> np.ndarray:
    if isinstance(mask, np.ndarray):
        return mask.astype(bool, copy=False)
    if isinstance(mask, torch.Tensor):
        return mask.detach().cpu().numpy().astype(bool)
    return decode_rle(to_rle(mask))


def select_proposal(proposals: Sequence[MaskLike], point: tuple[int, int] | None) -> int | None:
    """Index of the first proposal (they come sorted by score, highest first) whose mask contains ``point``.

    None when no proposal contains it or there is no point; the expression then gets an empty mask.
    """
    if point is None:
        return None
    x, y = point
    for index, proposal in enumerate(proposals):
        mask = _dense(proposal)
        if not (0 <= y < mask.shape[0] and 0 <= x < mask.shape[1]):
            raise ValueError(f"point {point} is outside the {mask.shape[1]}x{mask.shape[0]} proposal masks")
        if mask[y, x]:
            return index
    return None


def best_proposal(gt: MaskLike, proposals: Sequence[MaskLike]) -> int | None:
    """The proposals' upper bound: index of the proposal with the highest IoU with ``gt`` (first on ties).

    None when there are no proposals or every IoU is 0: an empty prediction then does at least as well for cIoU
    (its union is the GT alone).
    """
    if not proposals:
        return None
    ious = iou_matrix(
        [to_rle(gt, name="gt")], [to_rle(p, name=f"proposals[{k}]") for k, p in enumerate(proposals)]
    )
    index = int(np.argmax(ious[0]))
    return index if ious[0, index] > 0 else None
