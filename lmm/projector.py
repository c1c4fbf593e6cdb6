"""The vision-language projector: maps visual tokens to the LLM's embedding width.

``mlp2x_gelu`` is LLaVA-1.5's projector (Linear -> GELU -> Linear). With ``positional_embedding`` it adds a
learnable (num_tokens x d) embedding after the MLP, which together with the fused encoder's front half
makes DiffLMM's fused projector block. ``linear`` is LLaVA-1's. The projector is its own LightningModule
so per-stage freezing and the projector learning rate address it by name.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor, nn

from lmm.config import ProjectorConfig


def _mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


def _linear(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Linear(in_dim, out_dim)


PROJECTORS: dict[str, Callable[[int, int], nn.Module]] = {"mlp2x_gelu": _mlp2x_gelu, "linear": _linear}


class Projector(L.LightningModule):
    def __init__(self, config: ProjectorConfig, in_dim: int, out_dim: int, num_tokens: int) -> None:
        super().__init__()
        if config.name not in PROJECTORS:
            raise ValueError(f"unknown projector {config.name!r}; expected one of {sorted(PROJECTORS)}")
        # Keeping LLaVA's module names (mm_projector.0 / .2) makes released projector weights load as-is.
        self.mlp = PROJECTORS[config.name](in_dim, out_dim)
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, num_tokens, out_dim)) if config.positional_embedding else None
        )

    def forward(self, features: Tensor) -> Tensor:
        out = self.mlp(features)
        if self.pos_embed is not None:
            out = out + self.pos_embed.to(out.dtype)
        return out
