"""Colour-guided token smoothing (``encoders.token_smoothing``, ``encoder.smoothing_steps``): checked against a
loop over cells written from its definition, and for what it is for: features spread within a region of one
colour and not across its edge."""

import math

import pytest
import torch

from encoders.token_smoothing import colour_guided_smoothing, smoothing_matrix


def _by_definition(cells: torch.Tensor, images: torch.Tensor, steps: int, sigma: float) -> torch.Tensor:
    """One cell at a time: mean colour of each cell, Gaussian weights to the 3 x 3 neighbours on the grid."""
    batch, channels, height, width = cells.shape
    ph, pw = images.shape[-2] // height, images.shape[-1] // width
    colour = [
        [[images[b, :, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw].mean((1, 2)) for c in range(width)]
         for r in range(height)]
        for b in range(batch)
    ]  # fmt: skip
    for _ in range(steps):
        out = torch.zeros_like(cells)
        for b in range(batch):
            for r in range(height):
                for c in range(width):
                    total, weight_sum = torch.zeros(channels, dtype=cells.dtype), 0.0
                    for rr in range(max(r - 1, 0), min(r + 2, height)):
                        for cc in range(max(c - 1, 0), min(c + 2, width)):
                            d2 = float((colour[b][rr][cc] - colour[b][r][c]).pow(2).sum())
                            w = math.exp(-d2 / (2 * sigma**2))
                            total += w * cells[b, :, rr, cc]
                            weight_sum += w
                    out[b, :, r, c] = total / weight_sum
        cells = out
    return cells


def test_smoothing_equals_its_definition_cell_by_cell():
    torch.manual_seed(0)
    cells = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    images = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    for steps, sigma in ((1, 0.7), (3, 1.5)):
        torch.testing.assert_close(
            colour_guided_smoothing(cells, images, steps, sigma), _by_definition(cells, images, steps, sigma)
        )
    assert torch.equal(colour_guided_smoothing(cells, images, 0, 0.5), cells)


def test_features_spread_within_a_colour_region_and_not_across_its_edge():
    # A 4 x 4-cell dark square on a light background: 8 x 8 cells of 4 px, colours 3 units apart (sigma 0.5).
    images = torch.full((1, 3, 32, 32), 1.5)
    images[..., 8:24, 8:24] = -1.5
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[2:6, 2:6] = True
    torch.manual_seed(0)
    cells = torch.randn(1, 16, 8, 8)
    seen = torch.zeros_like(cells)
    seen[..., 2, 2] = 10.0  # what only the square's corner token saw
    out = colour_guided_smoothing(cells + seen, images, 6, 0.5) - colour_guided_smoothing(
        cells, images, 6, 0.5
    )
    # Every token of the square comes to share it (a linear map: the difference is the spread of `seen`) ...
    assert out[0, 0][inside].min() > 0.15  # a third of an even share (10 / 16) at the far corner
    # ... and no background token gets any of it, nor does anything the background holds reach the square.
    assert out[0, 0][~inside].abs().max() < 1e-3
    noise = torch.randn_like(cells) * (~inside)
    changed = colour_guided_smoothing(cells + noise, images, 6, 0.5) - colour_guided_smoothing(
        cells, images, 6, 0.5
    )
    assert changed[0][:, inside].abs().max() < 1e-3 and changed[0][:, ~inside].abs().max() > 0.1
    # Without the edge (one flat colour) the same smoothing does carry it into the background.
    flat = torch.zeros_like(images)
    spread = colour_guided_smoothing(cells + seen, flat, 6, 0.5) - colour_guided_smoothing(
        cells, flat, 6, 0.5
    )
    assert spread[0, 0][~inside].max() > 0.3


def test_smoothing_refuses_a_grid_the_image_does_not_divide_into():
    with pytest.raises(ValueError, match=r"images \(30, 32\) do not divide into a 8 x 8 grid"):
        colour_guided_smoothing(torch.zeros(1, 4, 8, 8), torch.zeros(1, 3, 30, 32), 1, 0.5)


def test_gradients_reach_the_features_exactly():
    # The fused encoder's U-Net half trains through the smoothing: its gradient must be the linear map's own.
    cells = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: colour_guided_smoothing(x, images, 2, 0.7), (cells,))


def test_the_smoothing_matrix_is_the_smoothing_as_a_matrix():
    torch.manual_seed(0)
    cells = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    images = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    matrix = smoothing_matrix(images, (4, 6), 3, 1.5)
    assert matrix.shape == (2, 24, 24)
    torch.testing.assert_close(matrix.sum(-1), torch.ones(2, 24, dtype=torch.float64))
    expected = _by_definition(cells, images, 3, 1.5).flatten(2)  # (B, C, n)
    torch.testing.assert_close((matrix @ cells.flatten(2).transpose(1, 2)).transpose(1, 2), expected)
    torch.testing.assert_close(
        smoothing_matrix(images, (4, 6), 0, 1.5), torch.eye(24).expand(2, -1, -1).double()
    )


def test_attention_read_through_the_matrix_stays_in_its_colour_region():
    # The square of the spreading test: all the attention on the square's corner token is attributed to the
    # square's 16 cells, a part to each, and none to the background.
    images = torch.full((1, 3, 32, 32), 1.5)
    images[..., 8:24, 8:24] = -1.5
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[2:6, 2:6] = True
    attention = torch.zeros(64)
    attention[2 * 8 + 2] = 1.0
    cells = (attention @ smoothing_matrix(images, (8, 8), 6, 0.5)[0]).view(8, 8)
    assert cells.sum() == pytest.approx(1.0)
    assert cells[inside].min() > 0.01 and cells[~inside].max() < 1e-4
