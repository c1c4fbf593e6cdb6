"""Teacher-forced attention maps: a given response appended to each prompt, one forward pass, one row per token.

Panoptic narrative grounding reads the maps of a caption the model did not write (DESIGN.md section 6, the
reference's ``aas/infer_attn_png.py``): the narrative's token ids follow the chat prompt as the assistant's
response, one forward pass runs over prompt + response, and the map of response token ``i`` is the attention
of the query *at that token's own position* to the image tokens (the last ``len(caption)`` query rows of the
prefill), averaged over all heads of all (or the chosen) layers by ``AttentionCapture(own_positions=True)``.

Batching: prompts are already left-padded by ``GroundableModel.prepare`` (they all end at the same position),
so responses of different lengths are appended and *right*-padded. Every response then starts at the same
position, the image positions of the layouts do not move, and the padding after a short response sits after
all of its real tokens, where the causal mask hides it from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from grounding.capture import AttentionCapture
from grounding.layout import GridView, read_views
from grounding.protocol import GroundableModel, PreparedBatch

__all__ = ["append_responses", "teacher_forced_rows"]


def _get(inputs: Any, key: str) -> torch.Tensor:
    return inputs[key] if isinstance(inputs, Mapping) else getattr(inputs, key)


def append_responses(
    batch: PreparedBatch, responses: Sequence[Sequence[int]], pad_id: int
) -> tuple[PreparedBatch, int]:
    """``batch`` with ``responses[b]`` appended to sample ``b``'s prompt, right-padded with ``pad_id``.

    Returns the new batch and the position of every response's first token (the padded prompt length).
    ``batch.inputs`` is a mapping (a transformers processor's output: ``input_ids``, ``attention_mask`` and
    other tensors; per-token ``(B, prompt_len)`` integer tensors such as ``token_type_ids`` are extended with
    zeros, text's type) or a dataclass with ``input_ids`` and ``attention_mask`` fields (the project's LMMs).
    """
    ids, mask = _get(batch.inputs, "input_ids"), _get(batch.inputs, "attention_mask")
    n, start = ids.shape
    if len(responses) != n:
        raise ValueError(f"{len(responses)} responses for a batch of {n}")
    if any(len(r) == 0 for r in responses):
        raise ValueError("every teacher-forced response needs at least one token")
    width = max(len(r) for r in responses)
    tail = torch.full((n, width), pad_id, dtype=ids.dtype, device=ids.device)
    tail_mask = torch.zeros((n, width), dtype=mask.dtype, device=mask.device)
    for b, response in enumerate(responses):
        tail[b, : len(response)] = torch.as_tensor(list(response), dtype=ids.dtype)
        tail_mask[b, : len(response)] = 1
    new_ids, new_mask = torch.cat([ids, tail], dim=1), torch.cat([mask, tail_mask], dim=1)
    if isinstance(batch.inputs, Mapping):
        inputs = dict(batch.inputs)
        for key, value in batch.inputs.items():
            if key in ("input_ids", "attention_mask"):
                continue
            per_token = isinstance(value, torch.Tensor) and value.shape[:2] == (n, start) and value.ndim == 2
            if per_token and not value.is_floating_point():
                inputs[key] = torch.cat([value, value.new_zeros((n, width))], dim=1)
        inputs.update(input_ids=new_ids, attention_mask=new_mask)
    elif dataclasses.is_dataclass(batch.inputs):
        inputs = dataclasses.replace(batch.inputs, input_ids=new_ids, attention_mask=new_mask)
    else:
        raise TypeError(f"cannot append responses to inputs of type {type(batch.inputs).__name__}")
    return PreparedBatch(inputs=inputs, layouts=batch.layouts), start


@torch.no_grad()
def teacher_forced_rows(
    model: GroundableModel,
    batch: PreparedBatch,
    responses: Sequence[Sequence[int]],
    layers: Sequence[int] | None = None,
    register_tokens: int = 0,
    attribute_mixing: bool = True,
    own_positions: bool = True,
) -> list[tuple[torch.Tensor, GridView]]:
    """Per sample, ``(rows, view)``: one raw map row per response token, the attention of the query at that
    token's own position to the cells of ``view`` (the read grid, ``register_tokens`` skipped), in view order;
    ``attribute_mixing``: whether the view keeps the layout's token mixing (``AttendConfig.attribute_mixing``).
    ``own_positions=False``: row ``i`` is instead the query that produces token ``i``, as in generation, so a
    generated response forced again gives the rows its generation captured (``grounding.shifted_maps``).

    ``model.forward(batch)`` runs the single pass (``GroundableModel.forward``).
    """
    views = read_views(batch.layouts, register_tokens, attribute_mixing)
    pad = model.tokenizer.pad_token_id
    full, start = append_responses(batch, responses, 0 if pad is None else int(pad))
    positions = [view.positions for view in views]
    with AttentionCapture(
        model.language_model, positions, response_start=start, layers=layers, own_positions=own_positions
    ) as capture:
        model.forward(full)
    maps = capture.maps()
    return [(m[: len(r)], view) for m, r, view in zip(maps, responses, views, strict=True)]
