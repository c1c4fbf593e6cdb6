"""``ConvTower``: a small convolutional CLIP vision tower whose tokens each see only their own neighbourhood.

CLIP was trained with ResNets as well as ViTs; this is the shapes world's convolutional tower, built for what a
grounding LMM needs from its frozen encoder: the kind of an object in *that object's* tokens. A ViT mixes every
token with every other from its first layer, and contrastive pretraining on captions is free to write a shape's
kind into background tokens (as ViTs use background patches as registers), where the LMM then reads it and the
kind word's attention follows; measured in this world, a linear probe reads an object's kind from a tiny ViT's
tokens under its mask 0.40 of the time in multi-shape scenes. Here each token is a function of a bounded
square of pixels around its cell (``receptive_field``, 29 px for the default's three stages), normalised per
position (LayerNorm over channels, so no statistics cross positions), and the contrastive image embedding is
the projected mean of the tokens: what a caption names can only come from the tokens that see the object.

Layout: a stride-1 3x3 stem conv to ``channels[0]``, then one stage per following width and a last one to
``width``; each stage a stride-2 3x3 conv followed by ``depths[i]`` stride-1 3x3 convs (by default one in
every stage but the last, which stops there to keep the receptive field local). Every conv is followed by the
per-position LayerNorm and GELU.
The LMM's tokens are the last stage's ``(image_size / patch_size)^2`` cells, plus open_clip's fixed 2-D
sine-cosine position embedding (the pooled embedding does not see it: a mean over positions is a constant).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from encoders.config import default_conv_depths
from encoders.token_smoothing import colour_guided_smoothing, smoothing_matrix


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each position of an NCHW map (ConvNeXt's), never across positions."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1), ChannelNorm(cout), nn.GELU()]


class ConvTower(nn.Module):
    """Images ``(B, 3, S, S)`` -> tokens ``(B, (S / patch)^2, width)`` (``forward_tokens``) or the contrastive
    embedding ``(B, output_dim)`` (``forward``)."""

    def __init__(
        self,
        image_size: int,
        channels: Sequence[int],
        width: int,
        output_dim: int,
        depths: Sequence[int] | None = None,
        smoothing_steps: int = 0,
        smoothing_sigma: float = 0.3,
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("a convnet tower needs at least one channel width before its last stage")
        patch = 2 ** len(channels)
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of the tower's stride {patch}")
        depths = default_conv_depths(len(channels)) if depths is None else tuple(depths)
        if len(depths) != len(channels) or min(depths) < 0:
            raise ValueError(
                f"depths {list(depths)}: one count >= 0 of stride-1 convs per stage ({len(channels)} stages)"
            )
        layers = _conv(3, channels[0], 1)
        widths = [*channels[1:], width]
        for cin, cout, depth in zip(channels, widths, depths, strict=True):
            layers += _conv(cin, cout, 2)
            for _ in range(depth):
                layers += _conv(cout, cout, 1)
        self.body = nn.Sequential(*layers)
        self.image_size = (image_size, image_size)  # open_clip's attribute names and forms
        self.patch_size = (patch, patch)
        self.width = width
        side = image_size // patch
        from open_clip.pos_embed import get_2d_sincos_pos_embed

        self.register_buffer(
            "positional_embedding", torch.from_numpy(get_2d_sincos_pos_embed(width, side)).float()
        )
        self.proj = nn.Linear(width, output_dim)
        if smoothing_steps < 0 or smoothing_sigma <= 0:
            raise ValueError(
                f"smoothing: steps >= 0 and sigma > 0, got {smoothing_steps} and {smoothing_sigma}"
            )
        self.smoothing_steps = smoothing_steps
        self.smoothing_sigma = smoothing_sigma

    @property
    def receptive_field(self) -> int:
        """Side in pixels of the input square a token depends on (centred on its cell, cut at the border)."""
        field, jump = 1, 1
        for layer in self.body:
            if isinstance(layer, nn.Conv2d):
                field += (layer.kernel_size[0] - 1) * jump
                jump *= layer.stride[0]
        return field

    def features(self, images: Tensor) -> Tensor:
        """The last stage's cells as tokens, row-major, without positions."""
        return self.body(images).flatten(2).transpose(1, 2)

    def forward_tokens(self, images: Tensor) -> Tensor:
        """What the LMM reads: each cell's features, smoothed among cells of its colour when configured
        (``encoders.token_smoothing``; before the positions, so every token keeps saying where it is), plus its
        fixed position."""
        cells = colour_guided_smoothing(self.body(images), images, self.smoothing_steps, self.smoothing_sigma)
        features = cells.flatten(2).transpose(1, 2)
        return features + self.positional_embedding.to(features.dtype)

    def token_mixing(self, images: Tensor) -> Tensor | None:
        """``(B, n, n)``: the smoothing :meth:`forward_tokens` applies to ``images``' cells; None without it."""
        if not self.smoothing_steps:
            return None
        patch = self.patch_size[0]
        grid = (images.shape[-2] // patch, images.shape[-1] // patch)
        return smoothing_matrix(images, grid, self.smoothing_steps, self.smoothing_sigma)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(self.features(images).mean(1))
