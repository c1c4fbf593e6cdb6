"""Where an image's tokens sit in the sequence and where each of their grids lies on the image.

A model turns one image into one or more **blocks** of tokens: LLaVA-1.5 one 24x24 grid; LLaVA-NeXT and
OneVision a base grid of the whole image and then the unpadded high-resolution grid with a newline token
after each row; InternVL 448-px tiles of 16x16 tokens plus a thumbnail; Qwen-VL one grid of merged patches
whose size follows the image. A :class:`Block` lists its tokens' positions in the sequence given to the model
(after left padding) row-major over its ``(h, w)`` grid, the grid columns that are not image cells (the
newline column), and its ``box``: the rectangle of the original image the grid covers, in the original
image's pixels, as the model's own preprocessing put it there (a pad-to-square box reaches beyond the image;
a tile covers its share of the image).

An :class:`ImageLayout` holds an image's blocks and which of them are **read**: one block (the base or
high-resolution grid, the thumbnail) or tiles that stitch into one grid. That choice is a :class:`GridView`:
the positions to capture, the ``(h, w)`` grid they form and its box. A phrase's map on that grid becomes a map
on the image by :meth:`GridView.render`: bicubic upsampling to the box's size in image pixels, then the part
of the box that lies on the image (a plain resize when the box is the whole image). The reference's
``aspect_ratio == "pad"`` (upsample to the ``max(H, W)`` square, crop the centre) and ``"original"`` (resize
to ``H x W``) are the two cases LLaVA-1.5 and the other models need.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from grounding.config import Peak

__all__ = [
    "Block",
    "Box",
    "GridView",
    "ImageLayout",
    "full_box",
    "pad_box",
    "read_views",
    "single_block_layout",
]

#: ``(left, top, right, bottom)`` in the original image's pixels; may reach beyond the image (padding).
Box = tuple[float, float, float, float]


def full_box(height: int, width: int) -> Box:
    """The whole image: what a grid covers when the image was resized (or tiled) without padding."""
    return (0.0, 0.0, float(width), float(height))


def pad_box(height: int, width: int) -> Box:
    """The ``max(H, W)`` square that LLaVA's ``expand2square`` pastes the image into (floor offsets)."""
    side = max(height, width)
    left, top = -((side - width) // 2), -((side - height) // 2)
    return (float(left), float(top), float(left + side), float(top + side))


def _as_positions(positions: torch.Tensor | Sequence[int]) -> torch.Tensor:
    out = torch.as_tensor(positions, dtype=torch.long).flatten().cpu()
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Block:
    """One grid of image tokens.

    Attributes:
        name: what the block is (``image``, ``base``, ``highres``, ``tile``, ``thumbnail``); blocks are read by
            name.
        positions: ``h * w`` sequence positions, row-major over ``grid`` (dropped columns included).
        grid: ``(h, w)`` of the token grid, dropped columns included.
        box: the image region the grid covers, dropped columns excluded (see :data:`Box`).
        drop_columns: grid columns that are not image cells (LLaVA-NeXT's newline token: ``(w - 1,)``).
        tile: ``(row, col)`` of this block among the blocks of its name that stitch into one grid.
        registers: how many of ``positions``' first entries are register tokens (a ViT's extra tokens that
            precede the grid), not grid cells; ``positions`` then holds ``registers + h * w`` entries.
        mixing: ``(n, n)`` over the ``n`` kept cells, for an encoder that mixes its cells into its tokens
            (``VisualEncoder.token_mixing``): row ``t`` is how much of each cell token ``t`` carries. None: every
            token is its own cell.
    """

    name: str
    positions: torch.Tensor
    grid: tuple[int, int]
    box: Box
    drop_columns: tuple[int, ...] = ()
    tile: tuple[int, int] | None = None
    registers: int = 0
    mixing: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", _as_positions(self.positions))
        object.__setattr__(self, "grid", (int(self.grid[0]), int(self.grid[1])))
        object.__setattr__(self, "box", tuple(float(v) for v in self.box))
        h, w = self.grid
        if self.registers < 0:
            raise ValueError(f"block {self.name!r}: registers must be >= 0, got {self.registers}")
        if h <= 0 or w <= 0 or len(self.positions) != self.registers + h * w:
            extra = f" after {self.registers} register tokens" if self.registers else ""
            raise ValueError(
                f"block {self.name!r}: {len(self.positions) - self.registers} positions{extra} do not fill a "
                f"{h}x{w} grid"
            )
        if any(not 0 <= c < w for c in self.drop_columns) or len(set(self.drop_columns)) >= w:
            raise ValueError(f"block {self.name!r}: drop_columns {self.drop_columns} invalid for width {w}")
        left, top, right, bottom = self.box
        if not (right > left and bottom > top):
            raise ValueError(f"block {self.name!r}: box {self.box} is empty")
        if self.mixing is not None:
            n = h * (w - len(self.drop_columns))
            if tuple(self.mixing.shape) != (n, n):
                raise ValueError(
                    f"block {self.name!r}: mixing of shape {tuple(self.mixing.shape)}, expected ({n}, {n}) for its "
                    f"{n} cells"
                )
            object.__setattr__(self, "mixing", self.mixing.detach().float().cpu())

    @property
    def kept_grid(self) -> tuple[int, int]:
        """``(h, w)`` of the image cells (dropped columns removed)."""
        return self.grid[0], self.grid[1] - len(self.drop_columns)

    def kept_positions(self) -> torch.Tensor:
        """The image cells' positions, row-major over :attr:`kept_grid` (registers and dropped columns out)."""
        h, w = self.grid
        keep = [c for c in range(w) if c not in self.drop_columns]
        return self.positions[self.registers :].view(h, w)[:, keep].reshape(-1)


@dataclasses.dataclass(frozen=True, eq=False)
class GridView:
    """The grid that is read: ``positions`` row-major over ``grid``, covering ``box`` of the image; ``mixing``
    (see :class:`Block`) when its tokens mix the cells."""

    positions: torch.Tensor
    grid: tuple[int, int]
    box: Box
    image_size: tuple[int, int]
    mixing: torch.Tensor | None = None

    def to_grid(self, values: torch.Tensor) -> torch.Tensor:
        """``(..., h * w)`` values in ``positions`` order -> ``(..., h, w)``.

        With ``mixing``, values over the tokens (attention) become values over the cells first: a token's share
        is spread over the cells it carries (``values @ mixing``), so a map says where the attended content lies
        in the image rather than which token carried it. The total is unchanged (``mixing``'s rows sum to 1).
        """
        if self.mixing is not None:
            values = values.float() @ self.mixing.to(values.device)
        return values.reshape(*values.shape[:-1], *self.grid)

    def without_mixing(self) -> GridView:
        """This view reading every token as its own cell (``AttendConfig.attribute_mixing`` off)."""
        return dataclasses.replace(self, mixing=None)

    def render(self, grid_map: torch.Tensor) -> torch.Tensor:
        """An ``(h, w)`` map on the grid -> a float32 ``(H, W)`` map on the original image.

        Bicubic (``align_corners=False``, as the reference) to the box's size in pixels, then the image's part
        of the box; a box that falls short of the image edge (sub-pixel rounding of an unpadded grid) extends
        its edge pixels.
        """
        if tuple(grid_map.shape) != self.grid:
            raise ValueError(f"expected a {self.grid} map, got shape {tuple(grid_map.shape)}")
        height, width = self.image_size
        grid = grid_map.float()[None, None]
        if self.box == full_box(height, width):
            return F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)[0, 0]
        left, top, right, bottom = (round(v) for v in self.box)
        box = F.interpolate(grid, size=(bottom - top, right - left), mode="bicubic", align_corners=False)[
            0, 0
        ]
        rows = (torch.arange(height) - top).clamp(0, box.shape[0] - 1)
        cols = (torch.arange(width) - left).clamp(0, box.shape[1] - 1)
        return box[rows][:, cols]

    def centre_span(self) -> tuple[slice, slice]:
        """``(rows, cols)``: the image pixels whose centres lie between the grid's first and last cell centres.

        Inside that span :meth:`render` interpolates between cells; outside it (half a cell along each edge
        of a box that ends at the image's edge) bicubic upsampling extrapolates, and a border cell's value
        overshoots towards the edge, so a peak there moves onto the edge pixel itself. An axis whose span is
        empty (a one-cell axis, a cell smaller than a pixel) keeps the pixel nearest the cell centres.
        """
        left, top, right, bottom = self.box
        height, width = self.image_size
        h, w = self.grid
        return (
            _centre_span(top, (bottom - top) / h, h, height),
            _centre_span(left, (right - left) / w, w, width),
        )

    def peak_region(self, peak: Peak) -> tuple[slice, slice] | None:
        """Where a phrase's point is searched (``AttendConfig.peak``): None for ``image`` (the whole map, as the
        reference), :meth:`centre_span` for ``centres``; for ``segment.argmax_point(..., within=)``."""
        if peak == "image":
            return None
        if peak == "centres":
            return self.centre_span()
        raise ValueError(f"peak must be 'image' or 'centres', got {peak!r}")

    def cell_region(self, row: int, col: int) -> tuple[float, float, float, float]:
        """The image region ``(left, top, right, bottom)`` of grid cell ``(row, col)`` (for checks and overlays)."""
        left, top, right, bottom = self.box
        h, w = self.grid
        cw, ch = (right - left) / w, (bottom - top) / h
        return (left + col * cw, top + row * ch, left + (col + 1) * cw, top + (row + 1) * ch)


def _centre_span(start: float, cell: float, cells: int, pixels: int) -> slice:
    """Pixels ``i`` of one axis with ``start + cell / 2 <= i + 0.5 <= start + (cells - 0.5) * cell``."""
    first, last = start + cell / 2, start + (cells - 0.5) * cell
    lo, hi = max(math.ceil(first - 0.5), 0), min(math.floor(last - 0.5), pixels - 1)
    if lo > hi:
        lo = hi = min(max(math.floor((first + last) / 2), 0), pixels - 1)
    return slice(lo, hi + 1)


@dataclasses.dataclass(frozen=True, eq=False)
class ImageLayout:
    """One image's token blocks in sequence order, and which of them are read (see the module docstring).

    ``read`` names the block read, or the name shared by the tiles stitched into one grid (every block of
    that name must carry its ``tile`` coordinates and the same grid).
    """

    image_size: tuple[int, int]
    blocks: tuple[Block, ...]
    read: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))
        object.__setattr__(self, "image_size", (int(self.image_size[0]), int(self.image_size[1])))
        names = sorted({b.name for b in self.blocks})
        if self.read not in names:
            raise ValueError(f"read {self.read!r} is not one of this image's blocks {names}")

    def positions(self) -> torch.Tensor:
        """Every image-token position of every block, in block order (the image's whole token run)."""
        return torch.cat([b.positions for b in self.blocks])

    def with_read(self, read: str) -> ImageLayout:
        return dataclasses.replace(self, read=read)

    def with_registers(self, count: int) -> ImageLayout:
        """This layout for a model that puts ``count`` register tokens at the start of every image block, before
        the grid this layout describes (the reference's ``--reg-tokens``: the grid starts ``count`` tokens after
        the image's first token). Each block's grid moves ``count`` positions later per block up to and
        including it; the tokens it moved over become its registers. Blocks that already declare registers are
        left as they are when they declare ``count`` of them (the model's adapter knew), refused otherwise.
        """
        if count < 0:
            raise ValueError(f"register tokens must be >= 0, got {count}")
        if count == 0:
            return self
        if all(b.registers == count for b in self.blocks):
            return self
        if any(b.registers for b in self.blocks):
            declared = sorted({b.registers for b in self.blocks})
            raise ValueError(f"the model's layout already declares {declared} register tokens, not {count}")
        blocks, shift = [], 0
        for b in self.blocks:
            start = int(b.positions[0]) + shift
            shift += count
            positions = torch.cat([torch.arange(start, start + count), b.positions + shift])
            blocks.append(dataclasses.replace(b, positions=positions, registers=count))
        return dataclasses.replace(self, blocks=tuple(blocks))

    def view(self) -> GridView:
        chosen = [b for b in self.blocks if b.name == self.read]
        if len(chosen) == 1 and chosen[0].tile is None:
            block = chosen[0]
            return GridView(block.kept_positions(), block.kept_grid, block.box, self.image_size, block.mixing)
        return self._stitch(chosen)

    def _stitch(self, tiles: list[Block]) -> GridView:
        if any(t.mixing is not None for t in tiles):
            raise ValueError(
                f"the {len(tiles)} blocks named {self.read!r} mix their cells: tiles cannot be stitched"
            )
        if any(t.tile is None for t in tiles) or len({t.kept_grid for t in tiles}) != 1:
            raise ValueError(
                f"the {len(tiles)} blocks named {self.read!r} cannot be read as one grid: "
                "tiles need (row, col) coordinates and equal grids"
            )
        h, w = tiles[0].kept_grid
        rows = 1 + max(t.tile[0] for t in tiles)
        cols = 1 + max(t.tile[1] for t in tiles)
        if sorted(t.tile for t in tiles) != [(r, c) for r in range(rows) for c in range(cols)]:
            raise ValueError(f"the {self.read!r} tiles do not fill a {rows}x{cols} arrangement")
        canvas = torch.empty(rows * h, cols * w, dtype=torch.long)
        for t in tiles:
            r, c = t.tile
            canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = t.kept_positions().view(h, w)
        box = (
            min(t.box[0] for t in tiles),
            min(t.box[1] for t in tiles),
            max(t.box[2] for t in tiles),
            max(t.box[3] for t in tiles),
        )
        return GridView(canvas.reshape(-1), (rows * h, cols * w), box, self.image_size)


def read_views(
    layouts: Sequence[ImageLayout], register_tokens: int = 0, attribute_mixing: bool = True
) -> list[GridView]:
    """The grid each layout reads, with ``register_tokens`` skipped at the start of every block and the blocks'
    token mixing kept or dropped (``AttendConfig.register_tokens`` and ``attribute_mixing``)."""
    views = [layout.with_registers(register_tokens).view() for layout in layouts]
    return views if attribute_mixing else [view.without_mixing() for view in views]


def single_block_layout(
    positions: torch.Tensor | Sequence[int],
    grid: tuple[int, int],
    image_size: tuple[int, int],
    aspect: str,
    mixing: torch.Tensor | None = None,
) -> ImageLayout:
    """One grid over the whole image: LLaVA-1.5 and the project's LMMs.

    ``aspect``: ``pad`` (the image was padded to a centred square: :func:`pad_box`), ``crop`` or ``resize``
    (the grid is mapped onto the whole image, as the reference does for a centre crop). ``mixing``: see
    :class:`Block`.
    """
    height, width = image_size
    if aspect == "pad":
        box = pad_box(height, width)
    elif aspect in ("crop", "resize"):
        box = full_box(height, width)
    else:
        raise ValueError(f"aspect must be 'pad', 'crop' or 'resize', got {aspect!r}")
    return ImageLayout(image_size, (Block("image", positions, grid, box, mixing=mixing),), read="image")
