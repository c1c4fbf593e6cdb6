"""Maps finer than the token grid: the response's attention read again on copies of the image shifted by a
fraction of a cell (``AttendConfig.grid_shifts``).

A phrase's map holds one value per token cell, so a threshold of it ends on the cells' borders: on the shapes
world's 8 x 8 grid over a 128-px square, a 20-px shape's mask is the 32- or 48-px block of the cells it
touches, and no threshold of a map flat over those cells reaches IoU 0.5 with it. With ``grid_shifts = n`` the
image is also moved right and down by ``(i / n, j / n)`` of a cell for every other ``i, j`` in ``0 .. n - 1``
(the strip it uncovers at the top and left repeats the edge pixels), the generated response is forced again on
each copy in one forward pass (``teacher_forced_rows(own_positions=False)``: the rows generation captured, on
the moved image), and each copy's phrase maps are put on its image as usual and moved back. The maps on the
image are averaged: ``n x n`` grids offset by ``1 / n`` of a cell, so the average steps every ``1 / n`` of a
cell and a threshold ends within that of where the attention changes. It is test-time augmentation, as
class-activation-map methods average maps over scales and flips: nothing is learned, no pixel's colour enters
a map, and the masks still come from the attention alone. It costs one forward pass per extra copy over the
prompt and the response, and no generation. ``grid_shifts = 1`` is the reference's single map.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from grounding.layout import GridView

__all__ = ["ShiftedMaps", "average_on_image", "shift_image", "shift_offsets", "unshift_map"]

Offset = tuple[int, int]


@dataclasses.dataclass
class ShiftedMaps:
    """One response's phrase maps read on a copy of the image moved by ``offset`` = ``(dx, dy)`` pixels (right,
    down): per phrase its ``(h, w)`` map on that copy's grid ``view``."""

    offset: Offset
    maps: list[torch.Tensor]
    view: GridView


def shift_offsets(view: GridView, shifts: int) -> list[Offset]:
    """``(dx, dy)`` in image pixels of the ``shifts x shifts`` copies, ``(0, 0)`` (the image itself) first:
    ``(round(i * cell_w / shifts), round(j * cell_h / shifts))``, row-major over ``j, i``: always ``shifts**2``
    of them (on a cell of fewer pixels than ``shifts`` some coincide, and that copy counts twice)."""
    if shifts < 1:
        raise ValueError(f"grid_shifts must be >= 1, got {shifts}")
    left, top, right, bottom = view.box
    rows, cols = view.grid
    cell_w, cell_h = (right - left) / cols, (bottom - top) / rows
    return [
        (round(i * cell_w / shifts), round(j * cell_h / shifts)) for j in range(shifts) for i in range(shifts)
    ]


def shift_image(image: Image.Image, dx: int, dy: int) -> Image.Image:
    """``image`` (as RGB) moved ``dx`` pixels right and ``dy`` down, the same size: what leaves at the right and
    bottom is cut, the strip uncovered at the left and top repeats the edge pixels (no colour the image does not
    have)."""
    if dx < 0 or dy < 0:
        raise ValueError(f"shift offsets must be >= 0, got ({dx}, {dy})")
    if dx == 0 and dy == 0:
        return image.convert("RGB")
    pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    if dx >= width or dy >= height:
        raise ValueError(f"a shift of ({dx}, {dy}) px leaves nothing of a {width} x {height} image")
    moved = np.pad(pixels, ((dy, 0), (dx, 0), (0, 0)), mode="edge")[:height, :width]
    return Image.fromarray(np.ascontiguousarray(moved))


def unshift_map(values: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """An ``(H, W)`` map on the copy moved by ``(dx, dy)`` -> the same map on the image: pixel ``(x, y)`` takes
    the copy's ``(x + dx, y + dy)``; the right and bottom strips that left the copy repeat its last pixels."""
    if dx == 0 and dy == 0:
        return values
    back = values[dy:, dx:]
    return torch.nn.functional.pad(back[None, None], (0, dx, 0, dy), mode="replicate")[0, 0]


def average_on_image(
    maps: Sequence[torch.Tensor],
    view: GridView,
    shifted: Sequence[ShiftedMaps],
    render: Callable[[Sequence[torch.Tensor], GridView], list[torch.Tensor]],
) -> list[torch.Tensor]:
    """Per phrase, the ``(H, W)`` map on the image: ``render(maps, view)`` (grid maps -> maps on that view's
    image) for the image itself, averaged with every shifted copy's rendered maps moved back onto the image.

    The average is of the maps as rendered, not rescaled: every copy reads the same response with the same
    model, so their scales agree, and a consumer that needs the absolute scale (SAM's mask prompt) keeps it.
    """
    if not maps:
        return []
    rendered = render(maps, view)
    if not shifted:  # the single map, as rendered: no copy, no division
        return rendered
    total = [m.float().clone() for m in rendered]
    for copy in shifted:
        if len(copy.maps) != len(total):
            raise ValueError(f"a shifted copy has {len(copy.maps)} phrase maps, the image {len(total)}")
        dx, dy = copy.offset
        for k, m in enumerate(render(copy.maps, copy.view)):
            total[k] += unshift_map(m.float(), dx, dy)
    return [t / (1 + len(shifted)) for t in total]
