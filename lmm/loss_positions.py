"""The causal-LM training loss with the work no loss reads left out.

Position ``t``'s logits are read only when label ``t + 1`` is supervised: in the shapes world's instruct
batches 16% of the computed positions (the answers), in a pretraining batch only the caption. The last decoder
layer's output elsewhere feeds nothing: every earlier layer is read at every position by the attention of the
positions after it, the last one only by the head. So the last layer's MLP (two thirds of a Llama layer's
work at the default's sizes) and the LM head run on the read positions only; its attention still runs
everywhere, since its keys and values are read by every later position. The loss and gradients are the plain
pass's up to float rounding (tests/test_loss_positions.py); an instruct step of the embedded default is about
1.1x faster, and a large vocabulary's logits (LLaVA's 32000 a position) are kept for the answers alone.

The MLP runs through forward hooks for the length of one forward pass: a layer that is recomputed in the
backward pass (activation checkpointing) would run it whole there, so such models prune the head only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmm.batch import IGNORE_INDEX


def read_positions(labels: Tensor) -> Tensor:
    """(B, L) bool: the positions whose logits a loss reads, those followed by a supervised label."""
    read = torch.zeros_like(labels, dtype=torch.bool)
    read[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return read


@contextlib.contextmanager
def rows_only(module: nn.Module, rows: Tensor) -> Iterator[None]:
    """Within the block, the token-wise ``module`` ((B, L, D) -> (B, L, D')) computes the positions ``rows``
    (B, L) only and gives zeros at the others. It sees them as one sequence (1, N, D), the shape a
    token-wise block expects."""
    shapes: list[torch.Size] = []

    def before(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Tensor]:
        if len(args) != 1 or not isinstance(args[0], Tensor) or args[0].shape[:2] != rows.shape:
            raise TypeError(
                f"{type(module).__name__}: expected one (B, L, D) tensor matching the rows {tuple(rows.shape)}"
            )
        shapes.append(args[0].shape)
        return (args[0][rows].unsqueeze(0),)

    def after(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> Tensor:
        if not isinstance(output, Tensor):
            raise TypeError(f"{type(module).__name__}: expected a tensor output, got {type(output).__name__}")
        full = output.new_zeros(*shapes.pop()[:-1], output.shape[-1])
        return full.masked_scatter(rows.unsqueeze(-1), output.squeeze(0))

    handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def last_layer_mlp(decoder: nn.Module) -> nn.Module | None:
    """The MLP of a decoder's last layer (Llama-family layout: ``layers[-1].mlp``), or None when the layout
    differs or the layers are recomputed in the backward pass (``gradient_checkpointing``)."""
    if getattr(decoder, "gradient_checkpointing", False):
        return None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        return None
    mlp = getattr(layers[-1], "mlp", None)
    return mlp if isinstance(mlp, nn.Module) else None


def supports_read_positions_loss(causal_lm: Any) -> bool:
    """Whether the LM's logits are its head applied to the decoder's output and nothing more (no logit
    soft-capping or scaling), so that the loss can be taken from the head at the read positions."""
    config = causal_lm.config
    return not any(
        getattr(config, key, None) for key in ("final_logit_softcapping", "logit_scale", "logits_scaling")
    )


def read_positions_loss(
    causal_lm: Any,
    embeds: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    **decoder_kwargs: Any,
) -> Tensor:
    """The causal-LM loss of ``embeds`` (B, L, D) against ``labels`` (B, L), mean over the supervised tokens
    as transformers' loss, with the head and (where ``last_layer_mlp`` finds it) the last layer's MLP computed
    at the read positions only. ``decoder_kwargs`` (``position_ids``, ``cache``, ``use_cache``) go to the
    decoder."""
    decoder = causal_lm.get_decoder()
    read = read_positions(labels)
    mlp = last_layer_mlp(decoder)
    decoder_kwargs.setdefault("use_cache", False)
    with rows_only(mlp, read) if mlp is not None else contextlib.nullcontext():
        hidden = decoder(
            inputs_embeds=embeds, attention_mask=attention_mask, **decoder_kwargs
        ).last_hidden_state
    logits = causal_lm.get_output_embeddings()(hidden[read])
    return F.cross_entropy(logits.float(), labels[:, 1:][read[:, :-1]])
