"""Colour-guided token smoothing: each token averaged with its neighbours of the same colour, never across edges.

The convolutional tower keeps every token local, so what it knows of a shape lives in the tokens that see it; but
a token in the middle of a large shape sees only that shape's colour, and the kind is on the outline. The LMM's
attention to a kind word then lights the outline and leaves the middle dark: a ring, whose half-height region
misses most of the shape. Real CLIP towers mix their tokens by self-attention, mostly among tokens that look
alike; this does the same here without any learning and without reaching across an edge. For ``steps`` rounds,
every cell's features become the mean of its 3 x 3 neighbourhood (itself included, the grid's outside left out),
each neighbour weighted by ``exp(-d^2 / 2 sigma^2)``, ``d`` the Euclidean distance between the two cells' mean
input colours (in the tower's normalised units). Within one flat-coloured region features spread by a cell per
round; between a shape and its background (``d`` of 1.5 or more in the shapes world, where backgrounds are
light and every palette colour has a dark channel) a neighbour weighs ``exp(-12.5)``, a few millionths, at the
default's ``sigma`` of 0.3. A cell straddling an edge has a mixed mean colour and joins the side it mostly lies on. The weights depend on
the pixels only, so gradients reach the features, and the tower's contrastive pretraining (its pooled embedding)
is not affected: the smoothing is how the LMM reads the frozen tower, as ``select_layer`` is for a ViT.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def colour_affinities(images: Tensor, grid: tuple[int, int], sigma: float) -> Tensor:
    """``(B, 1, 9, h * w)`` weights of each cell's 3 x 3 neighbourhood (row-major, the cell itself in the middle),
    normalised to sum to 1 per cell, for ``images`` ``(B, 3, H, W)`` on an ``(h, w)`` grid of cells."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    height, width = grid
    if images.shape[-2] % height or images.shape[-1] % width:
        raise ValueError(f"images {tuple(images.shape[-2:])} do not divide into a {height} x {width} grid")
    colours = nn.functional.avg_pool2d(images, (images.shape[-2] // height, images.shape[-1] // width))
    unfold = nn.Unfold(3, padding=1)
    batch, channels = colours.shape[:2]
    neighbours = unfold(colours).view(batch, channels, 9, height * width)
    on_grid = unfold(torch.ones_like(colours[:, :1])).view(batch, 1, 9, height * width)
    distance2 = (neighbours - colours.flatten(2).unsqueeze(2)).pow(2).sum(1, keepdim=True)
    weights = torch.exp(-distance2 / (2 * sigma**2)) * on_grid
    return weights / weights.sum(2, keepdim=True)


def colour_guided_smoothing(cells: Tensor, images: Tensor, steps: int, sigma: float) -> Tensor:
    """``cells`` ``(B, C, h, w)`` after ``steps`` rounds of averaging with their colour-alike neighbours in
    ``images`` ``(B, 3, H, W)`` (module docstring); ``steps = 0`` returns ``cells`` unchanged."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if steps == 0:
        return cells
    batch, _, height, width = cells.shape
    weights = colour_affinities(images.to(cells.dtype), (height, width), sigma).view(
        batch, 1, 3, 3, height, width
    )
    for _ in range(steps):
        # Nine shifted views of the zero-padded grid, each times its weight: five times faster than unfolding.
        padded = nn.functional.pad(cells, (1, 1, 1, 1))
        smoothed = torch.zeros_like(cells)
        for row in range(3):
            for col in range(3):
                smoothed += padded[:, :, row : row + height, col : col + width] * weights[:, :, row, col]
        cells = smoothed
    return cells


def smoothing_matrix(images: Tensor, grid: tuple[int, int], steps: int, sigma: float) -> Tensor:
    """``(B, n, n)`` with ``n = h * w``: row ``t`` says how much of each cell's features token ``t`` carries after
    :func:`colour_guided_smoothing` (rows sum to 1; the identity for ``steps = 0``), so that the smoothed tokens
    are ``matrix @ cells`` with the cells flattened row-major.

    Attend-and-segment reads it backwards: attention to token ``t`` is attention to what ``t`` carries, so a map
    over the tokens becomes ``map @ matrix`` over the cells (``grounding.layout.GridView``).
    """
    height, width = grid
    n = height * width
    batch = images.shape[0]
    # Smoothing is linear in the cells: smoothing the n one-hot cell maps gives, in channel c at token t, the
    # weight of cell c in token t.
    one_hot = torch.eye(n, dtype=images.dtype, device=images.device).view(1, n, height, width)
    spread = colour_guided_smoothing(one_hot.expand(batch, -1, -1, -1), images, steps, sigma)
    return spread.view(batch, n, n).transpose(1, 2).contiguous()
