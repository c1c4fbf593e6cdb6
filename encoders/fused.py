"""DiffLMM's fused encoder: diffusion-U-Net features and CLIP features concatenated on the same token grid.

The front half of DiffLMM's projector block lives here because it works on the feature maps: the U-Net's
``up_blocks[1]`` output (1280 channels for SD-1.5) -> LayerNorm over channels -> 1x1 conv to ``dm_dim``
-> GELU, concatenated on channels with the CLIP patch features (1024) at the same 24x24 grid and flattened
to tokens of width ``clip width + dm_dim`` (CLIP channels first). The CLIP features are computed once
and shared with the implicit captioner. DiffLMM sets ``dm_dim = d / 4``, d the LLM's width (1024 for
Vicuna-7B's 4096; 32 for the tiny default LLM's 128): an ordinary config field, since encoders never read
the LLM's config. The back half (Linear -> GELU -> Linear to d, plus a learnable N x d positional
embedding) is the project's projector ``mlp2x_gelu`` with ``positional_embedding: true``, which every
fused config sets. Trainable here: the captioner, the LayerNorm and the conv; the VAE, U-Net and CLIP
stay frozen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.base import VisualEncoder, seeded_init
from encoders.config import FusedEncoderConfig
from encoders.diffusion import DiffusionEncoder
from encoders.token_smoothing import colour_guided_smoothing


class FusedEncoder(VisualEncoder):
    Config = FusedEncoderConfig

    def __init__(self, config: FusedEncoderConfig) -> None:
        super().__init__()
        if config.dm_dim <= 0:
            raise ValueError(f"encoder.dm_dim must be positive, got {config.dm_dim}")
        self.config = config
        self.diffusion = DiffusionEncoder(config)
        channels = self.diffusion.embed_dim
        with seeded_init(config.init_seed):
            self.norm = nn.LayerNorm(channels)
            self.reduce = nn.Conv2d(channels, config.dm_dim, kernel_size=1)

    @property
    def embed_dim(self) -> int:
        return self.diffusion.clip.embed_dim + self.config.dm_dim

    @property
    def grid(self) -> tuple[int, int]:
        return self.diffusion.grid

    @property
    def image_size(self) -> int:
        return self.diffusion.image_size

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return self.diffusion.image_mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        return self.diffusion.image_std

    def frozen_modules(self) -> Iterator[nn.Module]:
        return self.diffusion.frozen_modules()

    def token_mixing(self, images: Tensor) -> Tensor | None:
        # Both halves of a token are smoothed by the CLIP tower's weights on its own input (see forward).
        return self.diffusion.clip.token_mixing(self.diffusion.clip_inputs(images))

    def forward(self, images: Tensor) -> Tensor:
        features, clip_tokens = self.diffusion.encode(images)
        dtype = self.norm.weight.dtype
        # LayerNorm normalises the last axis, so it runs channels-last before the conv goes back to NCHW.
        dm = self.norm(features.to(dtype).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        dm = F.gelu(self.reduce(dm))
        clip = self.diffusion.config.clip
        if clip.smoothing_steps:
            # The CLIP half comes smoothed by its own tower; the U-Net half is smoothed the same way (by the colours
            # of the CLIP tower's input, in its units), so both halves of a token speak for the same region.
            dm = colour_guided_smoothing(
                dm,
                self.diffusion.clip_inputs(images).to(dm.dtype),
                clip.smoothing_steps,
                clip.smoothing_sigma,
            )
        dm_tokens = dm.flatten(2).transpose(1, 2)
        return torch.cat([clip_tokens.to(dm_tokens.dtype), dm_tokens], dim=-1)
