"""A training pass that computes the prefix every sample of a batch shares once, not once per sample.

Every conversation of a chat-template stage opens with the same tokens (Vicuna's system line: 31 of the
shapes world's ~145 tokens an image sample, 31 of ~45 a text-only one). In a causal LM those positions'
hidden states depend on nothing after them, so they are the same in every row: the pass runs them for one
row, repeats their keys and values over the batch (autograd sums the rows' gradients back into the one
computation) and runs the rest of every row on top, with the positions and mask the whole rows would have
had. The loss and gradients are those of the plain pass up to float rounding (tests/test_shared_prefix.py);
an instruct step of the embedded default is about 1.2-1.3x faster.

Only a prefix that no label is read from qualifies (position ``p``'s logits predict token ``p + 1``, so the
label after the prefix must be ignored as well), and no image slot: visual tokens differ per sample. A model
with dropout trains the plain way (``dropout_free``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lmm.batch import IGNORE_INDEX
from lmm.loss_positions import read_positions_loss

#: Below this many shared tokens the second pass costs more than it saves.
MIN_SHARED_PREFIX = 8
#: transformers' names for the dropout probabilities of decoder models' configs.
DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop")


def dropout_free(model_config: Any) -> bool:
    """Whether a causal LM's config sets no dropout. With dropout the shared prefix would draw one mask for
    every row where the plain pass draws one per row: the same expectation, not the same training."""
    return not any(float(getattr(model_config, key, 0.0) or 0.0) > 0.0 for key in DROPOUT_KEYS)


def strategy_allows_sharing(strategy: str) -> bool:
    """Whether a Lightning strategy (by name) lets a decoder layer run twice in one step: not FSDP's or
    DeepSpeed's wrapped layers (and FSDP's activation checkpointing would rerun a layer into a cache)."""
    return "fsdp" not in strategy and "deepspeed" not in strategy


def shared_prefix_length(
    input_ids: Tensor, attention_mask: Tensor, labels: Tensor, image_token_id: int
) -> int:
    """How many leading positions (B, L) every row shares and no loss reads: the same token in every row,
    unpadded, not an image slot, and with the label at that position and the next one ignored. 0 when
    fewer than ``MIN_SHARED_PREFIX`` or a single row."""
    if input_ids.shape[0] < 2:
        return 0
    same = (
        (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0) & (input_ids[0] != image_token_id)
    )
    ignored = (labels == IGNORE_INDEX).all(0)
    run_same = int(same.int().cumprod(0).sum())
    run_ignored = int(ignored.int().cumprod(0).sum())
    prefix = min(run_same, run_ignored - 1, input_ids.shape[1] - 1)
    return prefix if prefix >= MIN_SHARED_PREFIX else 0


def prefix_shared_loss(
    causal_lm: Any,
    embeds: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    prefix: int,
    *,
    read_only: bool = False,
) -> Tensor:
    """The causal-LM loss of ``embeds`` (B, L, D) against ``labels`` (B, L), with the first ``prefix``
    positions (shared by every row; ``shared_prefix_length``) computed for one row only; with ``read_only``
    the rest of each row computes its last layer's MLP and its head only where the loss reads them
    (``lmm.loss_positions``)."""
    from transformers import DynamicCache

    rows, length = labels.shape
    cache = DynamicCache(config=causal_lm.config)
    causal_lm.get_decoder()(inputs_embeds=embeds[:1, :prefix], cache=cache, use_cache=True)
    cache.batch_repeat_interleave(rows)
    positions = torch.arange(prefix, length, device=embeds.device).unsqueeze(0).expand(rows, -1)
    # Position prefix - 1's logits predict label `prefix`, which is ignored: the rest's own logits and
    # labels are the whole loss, averaged over the same supervised tokens as the plain pass.
    rest = {"position_ids": positions, "cache": cache, "use_cache": True}
    if read_only:
        return read_positions_loss(causal_lm, embeds[:, prefix:], attention_mask, labels[:, prefix:], **rest)
    return causal_lm(
        inputs_embeds=embeds[:, prefix:], attention_mask=attention_mask, labels=labels[:, prefix:], **rest
    ).loss
