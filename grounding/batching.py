"""Left padding for batched generation: every groundable model pads its prompts the same way."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor, list[int]]:
    """Token-id rows of any lengths -> ``(input_ids, attention_mask, offsets)``, left-padded to the longest.

    ``offsets[b]`` is how many pad tokens precede row b, so position ``p`` of row b is ``offsets[b] + p`` in
    the batch: generation appends new tokens on the right, where every row then continues in step.
    """
    if not rows:
        raise ValueError("left_pad needs at least one row")
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    offsets = []
    for b, row in enumerate(rows):
        offset = length - len(row)
        if len(row):
            input_ids[b, offset:] = torch.as_tensor(list(row), dtype=torch.long)
        attention_mask[b, offset:] = 1
        offsets.append(offset)
    return input_ids, attention_mask, offsets
