"""An open_clip vision transformer as a transformers ``CLIPVisionModel``: config and renamed weights.

Both are the same pre-LN ViT (patch conv without bias, a class token, learned positions, ``ln_pre``, blocks of
LayerNorm -> attention -> residual, LayerNorm -> MLP -> residual), so the mapping is a renaming, except that
open_clip keeps the query, key and value projections in one ``in_proj`` matrix that HF splits in three.
The MLP activation carries over (OpenAI's CLIP: QuickGELU = HF ``quick_gelu``; LAION's: exact GELU = HF
``gelu``). The output projection (``proj``) has no place in ``CLIPVisionModel`` and is dropped; LLaVA never
uses it. Towers with parts HF's CLIP lacks (attention pooling, layer scale, no ``ln_pre``, other position
embeddings) are refused with a one-line message.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class UnsupportedTower(ValueError):
    """An open_clip tower that ``CLIPVisionModel`` cannot represent."""


def _activation(tower: nn.Module) -> str:
    act = tower.transformer.resblocks[0].mlp.gelu
    if type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise UnsupportedTower(
        f"open_clip MLP activation {act!r} has no CLIPVisionModel equivalent (QuickGELU or GELU)"
    )


def _check_plain_vit(tower: nn.Module) -> None:
    if getattr(tower, "attn_pool", None) is not None:
        raise UnsupportedTower("open_clip tower with attention pooling has no CLIPVisionModel equivalent")
    if isinstance(tower.ln_pre, nn.Identity):
        raise UnsupportedTower("open_clip tower without ln_pre has no CLIPVisionModel equivalent")
    if not isinstance(getattr(tower, "positional_embedding", None), Tensor):
        raise UnsupportedTower(
            "open_clip tower without learned position embeddings has no CLIPVisionModel equivalent"
        )
    if getattr(tower.conv1, "bias", None) is not None:
        raise UnsupportedTower("open_clip patch embedding with a bias has no CLIPVisionModel equivalent")
    for i, block in enumerate(tower.transformer.resblocks):
        if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            raise UnsupportedTower(f"open_clip block {i} has layer scale, which CLIPVisionModel lacks")
        if not isinstance(block.attn, nn.MultiheadAttention):
            raise UnsupportedTower(
                f"open_clip block {i} attention {type(block.attn).__name__} is not nn.MultiheadAttention"
            )


def open_clip_to_hf_vision(tower: nn.Module) -> tuple[Any, dict[str, Tensor]]:
    """``(CLIPVisionConfig, state dict with CLIPVisionModel's keys)`` for an open_clip ``VisionTransformer``."""
    from transformers import CLIPVisionConfig

    _check_plain_vit(tower)
    blocks = tower.transformer.resblocks
    width = tower.conv1.out_channels
    first = blocks[0]
    layer_norm = tower.ln_pre
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=first.mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=first.attn.num_heads,
        image_size=int(tower.image_size[0]),
        patch_size=int(tower.patch_size[0]),
        num_channels=tower.conv1.in_channels,
        hidden_act=_activation(tower),
        layer_norm_eps=layer_norm.eps,
        projection_dim=getattr(tower, "output_dim", width) or width,
    )
    state: dict[str, Tensor] = {
        "embeddings.class_embedding": tower.class_embedding,
        "embeddings.patch_embedding.weight": tower.conv1.weight,
        "embeddings.position_embedding.weight": tower.positional_embedding,
        "pre_layrnorm.weight": tower.ln_pre.weight,
        "pre_layrnorm.bias": tower.ln_pre.bias,
        "post_layernorm.weight": tower.ln_post.weight,
        "post_layernorm.bias": tower.ln_post.bias,
    }
    for i, block in enumerate(blocks):
        prefix = f"encoder.layers.{i}."
        q, k, v = block.attn.in_proj_weight.chunk(3, dim=0)
        qb, kb, vb = block.attn.in_proj_bias.chunk(3, dim=0)
        state.update(
            {
                prefix + "layer_norm1.weight": block.ln_1.weight,
                prefix + "layer_norm1.bias": block.ln_1.bias,
                prefix + "self_attn.q_proj.weight": q,
                prefix + "self_attn.q_proj.bias": qb,
                prefix + "self_attn.k_proj.weight": k,
                prefix + "self_attn.k_proj.bias": kb,
                prefix + "self_attn.v_proj.weight": v,
                prefix + "self_attn.v_proj.bias": vb,
                prefix + "self_attn.out_proj.weight": block.attn.out_proj.weight,
                prefix + "self_attn.out_proj.bias": block.attn.out_proj.bias,
                prefix + "layer_norm2.weight": block.ln_2.weight,
                prefix + "layer_norm2.bias": block.ln_2.bias,
                prefix + "mlp.fc1.weight": block.mlp.c_fc.weight,
                prefix + "mlp.fc1.bias": block.mlp.c_fc.bias,
                prefix + "mlp.fc2.weight": block.mlp.c_proj.weight,
                prefix + "mlp.fc2.bias": block.mlp.c_proj.bias,
            }
        )
    return config, {k: v.detach().contiguous() for k, v in state.items()}


def hf_hidden_state_index(select_layer: int, backend: str) -> int:
    """``ClipEncoderConfig.select_layer`` as an index into ``CLIPVisionModel``'s ``hidden_states`` (embeddings
    first), i.e. LLaVA's ``vision_feature_layer``. Negative values mean the same thing in both back-ends
    (-2: the penultimate layer's output); a non-negative one counts open_clip blocks from 0 but HF hidden
    states from the embeddings."""
    if select_layer < 0 or backend == "hf":
        return select_layer
    return select_layer + 1


@torch.no_grad()
def hf_tower_equals(tower: nn.Module, reference: nn.Module) -> bool:
    """Does the (possibly truncated) HF ``tower`` hold exactly ``reference``'s weights for the layers it keeps?"""
    ours = tower.state_dict()
    theirs = reference.state_dict()
    return all(key in theirs and torch.equal(value, theirs[key]) for key, value in ours.items())
