"""grounding.layout: blocks, the grid that is read, and the inverse geometry onto the image.

The render of a one-block layout must equal the reference's two upsampling modes (``segment.upsample_map``:
``pad`` = bicubic to the max(H, W) square and the centre crop, ``resize`` = bicubic to H x W); stitched tiles
and dropped columns are checked against grids written out by hand.
"""

from __future__ import annotations

import pytest
import torch

from grounding.layout import Block, ImageLayout, full_box, pad_box, single_block_layout
from grounding.protocol import PreparedBatch
from grounding.segment import upsample_map


@pytest.mark.parametrize("size", [(40, 100), (100, 40), (37, 37), (51, 20)])
@pytest.mark.parametrize("aspect", ["pad", "resize", "crop"])
def test_single_block_render_equals_the_reference_upsampling(size, aspect):
    torch.manual_seed(0)
    grid_map = torch.randn(4, 4)
    layout = single_block_layout(range(10, 26), (4, 4), size, aspect)
    view = layout.view()
    assert view.grid == (4, 4) and torch.equal(view.positions, torch.arange(10, 26))
    torch.testing.assert_close(view.render(grid_map), upsample_map(grid_map, size, aspect), rtol=0, atol=0)


def test_pad_box_is_the_expand2square_square():
    assert pad_box(40, 100) == (0.0, -30.0, 100.0, 70.0)
    assert pad_box(51, 20) == (-15.0, 0.0, 36.0, 51.0)  # offset (51 - 20) // 2 = 15, side 51
    assert full_box(40, 100) == (0.0, 0.0, 100.0, 40.0)


def test_newline_column_is_dropped():
    # A 2 x (3 + 1) block: positions 100..107, the last of each row a newline.
    block = Block("highres", torch.arange(100, 108), (2, 4), full_box(20, 30), drop_columns=(3,))
    layout = ImageLayout(
        (20, 30), (Block("base", torch.arange(90, 94), (2, 2), full_box(20, 30)), block), "highres"
    )
    view = layout.view()
    assert view.grid == (2, 3)
    assert view.positions.tolist() == [100, 101, 102, 104, 105, 106]
    assert layout.positions().tolist() == [90, 91, 92, 93, *range(100, 108)]
    assert layout.with_read("base").view().positions.tolist() == [90, 91, 92, 93]


def test_tiles_stitch_row_major_into_one_grid():
    # Three columns by two rows of 2x2 tiles, stored tile after tile (row-major), then a thumbnail.
    size = (20, 30)
    blocks = []
    for i in range(6):
        r, c = divmod(i, 3)
        box = (c * 10.0, r * 10.0, (c + 1) * 10.0, (r + 1) * 10.0)
        blocks.append(Block("tile", torch.arange(4 * i, 4 * i + 4), (2, 2), box, tile=(r, c)))
    blocks.append(Block("thumbnail", torch.arange(24, 28), (2, 2), full_box(*size)))
    layout = ImageLayout(size, blocks, read="tile")
    view = layout.view()
    assert view.grid == (4, 6) and view.box == full_box(*size)
    # Tile t holds 4t..4t+3 as [[4t, 4t+1], [4t+2, 4t+3]].
    expected = [
        [0, 1, 4, 5, 8, 9],
        [2, 3, 6, 7, 10, 11],
        [12, 13, 16, 17, 20, 21],
        [14, 15, 18, 19, 22, 23],
    ]
    assert view.positions.view(4, 6).tolist() == expected
    assert layout.with_read("thumbnail").view().positions.tolist() == [24, 25, 26, 27]
    # The stitched grid is mapped onto the whole image: cell (1, 4) is x in [20, 25), y in [5, 10).
    assert view.cell_region(1, 4) == (20.0, 5.0, 25.0, 10.0)


def test_a_box_beyond_the_image_is_cropped_and_a_short_one_extends_its_edge():
    grid_map = torch.zeros(2, 2)
    grid_map[0, 1] = 1.0
    # Box wider than the image on both sides (an unpadded grid's partial padding columns).
    wide = ImageLayout((10, 10), (Block("image", range(4), (2, 2), (-5.0, 0.0, 15.0, 10.0)),), "image").view()
    full = torch.nn.functional.interpolate(grid_map[None, None], size=(10, 20), mode="bicubic")[0, 0]
    torch.testing.assert_close(wide.render(grid_map), full[:, 5:15], rtol=0, atol=0)
    # Box one pixel short at the bottom: the last image row repeats the box's last row.
    short = ImageLayout((10, 10), (Block("image", range(4), (2, 2), (0.0, 0.0, 10.0, 9.0)),), "image").view()
    rendered = short.render(grid_map)
    torch.testing.assert_close(rendered[9], rendered[8], rtol=0, atol=0)


def test_bad_layouts_name_the_problem():
    with pytest.raises(ValueError, match="5 positions do not fill a 2x2 grid"):
        Block("image", range(5), (2, 2), full_box(4, 4))
    with pytest.raises(ValueError, match="drop_columns"):
        Block("image", range(4), (2, 2), full_box(4, 4), drop_columns=(2,))
    with pytest.raises(ValueError, match="box .* is empty"):
        Block("image", range(4), (2, 2), (0.0, 0.0, 0.0, 4.0))
    block = Block("image", range(4), (2, 2), full_box(4, 4))
    with pytest.raises(ValueError, match="read 'tile' is not one of this image's blocks"):
        ImageLayout((4, 4), (block,), read="tile")
    tiles = (
        Block("tile", range(4), (2, 2), full_box(4, 4), tile=(0, 0)),
        Block("tile", range(4, 8), (2, 2), full_box(4, 4), tile=(1, 1)),
    )
    with pytest.raises(ValueError, match="do not fill a 2x2 arrangement"):
        ImageLayout((4, 4), tiles, read="tile").view()
    with pytest.raises(ValueError, match="expected a \\(2, 2\\) map"):
        block_layout = ImageLayout((4, 4), (block,), read="image")
        block_layout.view().render(torch.zeros(3, 3))


def test_a_view_with_mixing_spreads_each_tokens_value_over_its_cells():
    # Token 0 carries half of cell 0 and half of cell 1; the others are their own cells.
    mixing = torch.eye(4)
    mixing[0] = torch.tensor([0.5, 0.5, 0.0, 0.0])
    view = single_block_layout(range(4), (2, 2), (8, 8), "pad", mixing=mixing).view()
    values = torch.tensor([[2.0, 0.0, 1.0, 0.0], [0.0, 3.0, 0.0, 0.0]])
    torch.testing.assert_close(
        view.to_grid(values), torch.tensor([[[1.0, 1.0], [1.0, 0.0]], [[0.0, 3.0], [0.0, 0.0]]])
    )
    torch.testing.assert_close(view.without_mixing().to_grid(values), values.view(2, 2, 2))
    with pytest.raises(ValueError, match=r"mixing of shape \(3, 3\), expected \(4, 4\)"):
        Block("image", range(4), (2, 2), full_box(4, 4), mixing=torch.eye(3))
    tiles = tuple(
        Block("tile", range(4 * i, 4 * i + 4), (2, 2), full_box(4, 4), tile=(0, i), mixing=torch.eye(4))
        for i in range(2)
    )
    with pytest.raises(ValueError, match="mix their cells"):
        ImageLayout((4, 8), tiles, read="tile").view()


def test_prepared_batch_positions_and_spans():
    layouts = [
        single_block_layout(range(3, 7), (2, 2), (8, 8), "pad"),
        single_block_layout(range(5, 9), (2, 2), (8, 8), "pad"),
    ]
    batch = PreparedBatch(inputs=None, layouts=layouts)
    assert [p.tolist() for p in batch.image_positions] == [[3, 4, 5, 6], [5, 6, 7, 8]]
    assert batch.image_spans == [(3, 7), (5, 9)]
    tiled = ImageLayout((4, 4), (Block("image", [0, 2, 4, 6], (2, 2), full_box(4, 4)),), "image")
    with pytest.raises(ValueError, match="not one contiguous run"):
        _ = PreparedBatch(inputs=None, layouts=[tiled]).image_spans


def test_overlay_draws_maps_through_the_view():
    import numpy as np
    from PIL import Image

    from grounding.overlay import draw_overlay

    image = Image.new("RGB", (60, 30), "white")
    grid_map = torch.zeros(2, 2)
    grid_map[0, 1] = 1.0
    args = (image, "a thing", ["a thing"], [(45, 7)], [np.zeros((30, 60), bool)], [grid_map])
    pad = single_block_layout(range(4), (2, 2), (30, 60), "pad").view()
    # The view of a padded single block draws exactly what the aspect-based upsampling drew before.
    assert np.array_equal(
        np.asarray(draw_overlay(*args, aspect="pad")), np.asarray(draw_overlay(*args, view=pad))
    )
    # A view over the whole image (another model's geometry) draws a different heat map.
    whole = single_block_layout(range(4), (2, 2), (30, 60), "resize").view()
    assert not np.array_equal(
        np.asarray(draw_overlay(*args, aspect="pad")), np.asarray(draw_overlay(*args, view=whole))
    )


def test_centre_span_is_where_render_interpolates():
    # 96 x 96, 8 x 8 cells of 12 px: cell centres at 6, 18, ..., 90; pixel i's centre is i + 0.5.
    view = single_block_layout(range(64), (8, 8), (96, 96), "pad").view()
    assert view.centre_span() == (slice(6, 90), slice(6, 90))
    # Padded to the 128 square: the rows' outer centres (-8, 104) lie off the image, so every row is inside.
    wide = single_block_layout(range(64), (8, 8), (96, 128), "pad").view()
    assert wide.centre_span() == (slice(0, 96), slice(8, 120))
    # A one-cell axis keeps the pixel at its centre.
    assert single_block_layout(range(1), (1, 1), (10, 10), "resize").view().centre_span() == (
        slice(5, 6),
        slice(5, 6),
    )
    # A hot border cell: outside the span bicubic overshoots the cell's value (towards the edge); inside it
    # never exceeds it.
    grid_map = torch.zeros(8, 8)
    grid_map[0, 3] = 1.0
    rendered = view.render(grid_map)
    rows, cols = view.centre_span()
    assert rendered.max() > 1.05 and int(rendered.argmax()) // 96 < 6
    assert rendered[rows, cols].max() <= 1.0 + 1e-6
    assert view.peak_region("centres") == (rows, cols) and view.peak_region("image") is None
    with pytest.raises(ValueError, match="peak must be"):
        view.peak_region("edge")
