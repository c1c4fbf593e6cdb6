"""Overlays (grounding.overlay): labels never overlap each other, a mask or a point, and each phrase keeps one
colour in the mask outline, the heat-map title and the caption. Checked geometrically on crowded random scenes
and on the rendered pixels."""

import numpy as np
import pytest
import torch
from PIL import Image

from grounding.overlay import (
    PALETTE,
    _outline,
    colour_family,
    draw_overlay,
    overlay_layout,
    phrase_spans,
)


def _disc(h, w, cx, cy, r):
    yy, xx = np.mgrid[0:h, 0:w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _random_scene(rng, n):
    w, h = int(rng.integers(60, 200)), int(rng.integers(60, 200))
    masks, points = [], []
    for _ in range(n):
        r = int(rng.integers(4, max(5, min(w, h) // 3)))
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        masks.append(_disc(h, w, cx, cy, r))
        points.append((cx, cy))
    phrases = [f"a {'very ' * int(rng.integers(0, 3))}large shape {i}" for i in range(n)]
    return (w, h), phrases, points, masks


def _check_layout(layout):
    boxes = [label.box for label in layout.labels]
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        assert 0 <= x0 < x1 <= layout.panel_width and 0 <= y0 < y1 <= layout.panel_height, boxes[i]
        for j in range(i):
            a = boxes[j]
            assert not (x0 < a[2] and a[0] < x1 and y0 < a[3] and a[1] < y1), (boxes[i], a)
        # No mask pixel under a label (the gutter lies right of the image, where there are none).
        for mask in layout.masks:
            assert not mask[y0:y1, x0:x1].any(), (i, boxes[i])
        # No point marker under a label.
        for label in layout.labels:
            px, py = label.point
            assert not (x0 <= px < x1 and y0 <= py < y1), (i, label.point)


@pytest.mark.parametrize("seed", range(40))
def test_labels_never_overlap_each_other_masks_or_points(seed):
    rng = np.random.default_rng(seed)
    size, phrases, points, masks = _random_scene(rng, int(rng.integers(1, 9)))
    layout = overlay_layout(size, phrases, points, masks, display_size=int(rng.integers(160, 400)))
    assert len(layout.labels) == len(phrases)
    _check_layout(layout)


def test_a_crowded_image_sends_labels_to_the_gutter_and_a_roomy_one_keeps_them_beside_the_objects():
    h = w = 100
    full = [np.ones((h, w), bool)] * 3  # masks cover everything: no room inside the image
    layout = overlay_layout((w, h), ["one", "two", "three"], [(10, 10), (50, 50), (90, 90)], full, 200)
    assert all(label.leader and label.box[0] >= layout.size[0] for label in layout.labels)
    assert layout.panel_width > layout.size[0]
    _check_layout(layout)

    small = [_disc(h, w, 20, 20, 5), _disc(h, w, 80, 80, 5)]
    layout = overlay_layout((w, h), ["left", "right"], [(20, 20), (80, 80)], small, 200)
    assert layout.panel_width == layout.size[0], "everything fits beside its object"
    for label in layout.labels:
        x0, y0, x1, y1 = label.box
        px, py = label.point
        gap = max(x0 - px, px - x1, y0 - py, py - y1)
        assert gap < 30, "a label sits next to its point"
    _check_layout(layout)


def test_each_phrase_has_one_colour_in_outline_title_and_caption():
    h, w = 96, 128
    masks = [_disc(h, w, 25, 25, 14), _disc(h, w, 100, 70, 12)]
    phrases = ["a large red circle", "a small blue circle"]
    caption = "A large red circle is top left. A small blue circle is bottom right."
    maps = [torch.rand(8, 8), torch.rand(8, 8)]
    image = Image.new("RGB", (w, h), (200, 200, 200))
    overlay = np.asarray(
        draw_overlay(image, caption, phrases, [(25, 25), (100, 70)], masks, maps, display_size=256)
    )
    layout = overlay_layout((w, h), phrases, [(25, 25), (100, 70)], masks, 256)
    header = layout.font_size + 6 + 2
    for i, colour in enumerate(layout.colours):
        assert colour == PALETTE[i]
        outline = _outline(layout.masks[i])
        ys, xs = np.nonzero(outline)
        # Outline pixels away from the point marker and the label's thin leader line show the phrase colour:
        # nothing else covers the mask.
        label = layout.labels[i]
        px, py = label.point
        far = ((xs - px) ** 2 + (ys - py) ** 2 > 12**2) & (_segment_distance(xs, ys, label) > 2.5)
        assert far.sum() > 20
        pixels = overlay[ys[far] + header, xs[far]]
        assert (pixels == colour).all(), i
        # The heat-map tile's title bar is the phrase colour.
        tile_x = layout.panel_width + 8 + i * (layout.size[0] + 8)
        assert (overlay[2, tile_x + 1 : tile_x + 3] == colour).all()
        # The caption below shows the phrase highlighted in its colour.
        caption_strip = overlay[header + layout.size[1] :]
        assert (caption_strip == colour).all(axis=-1).sum() > 50, i


def _segment_distance(xs, ys, label):
    """Distance of pixels from the label's leader line (point -> nearest point of its box); inf without one."""
    if not label.leader:
        return np.full(xs.shape, np.inf)
    (px, py), (x0, y0, x1, y1) = label.point, label.box
    ex, ey = min(max(px, x0), x1 - 1), min(max(py, y0), y1 - 1)
    dx, dy = ex - px, ey - py
    t = np.clip(((xs - px) * dx + (ys - py) * dy) / max(dx * dx + dy * dy, 1e-9), 0, 1)
    return np.hypot(xs - (px + t * dx), ys - (py + t * dy))


def test_a_legend_numbers_phrases_when_colours_share_a_family():
    families = [colour_family(c) for c in PALETTE]
    first_repeat = next(i for i in range(len(families)) if families[i] in families[:i])
    masks = [np.zeros((50, 50), bool)] * (first_repeat + 1)
    points = [(5 * i, 5 * i) for i in range(first_repeat + 1)]
    phrases = [f"p{i}" for i in range(first_repeat + 1)]
    assert not overlay_layout((50, 50), phrases[:-1], points[:-1], masks[:-1]).legend
    layout = overlay_layout((50, 50), phrases, points, masks)
    assert layout.legend and [label.text for label in layout.labels][:2] == ["1. p0", "2. p1"]
    plain = draw_overlay(
        Image.new("RGB", (50, 50)),
        "",
        phrases[:-1],
        points[:-1],
        masks[:-1],
        [torch.zeros(2, 2)] * first_repeat,
    )
    legend = draw_overlay(
        Image.new("RGB", (50, 50)), "", phrases, points, masks, [torch.zeros(2, 2)] * (first_repeat + 1)
    )
    assert legend.height > plain.height  # the legend's rows


def test_phrase_spans_follow_the_caption_in_order():
    caption = "A red circle is left. A red circle is right."
    assert phrase_spans(caption, ["a red circle", "A red circle", "a blue square"]) == [
        (0, 12),
        (22, 34),
        None,
    ]


def test_a_response_with_newlines_draws_as_its_one_line_form():
    """Generated text may hold newlines (an undertrained model's), which PIL cannot measure in one line: the
    overlay draws them as single spaces, exactly as the one-line text."""
    h, w = 64, 64
    masks, points, maps = [_disc(h, w, 20, 20, 10)], [(20, 20)], [torch.rand(4, 4)]
    image = Image.new("RGB", (w, h), (200, 200, 200))
    broken = draw_overlay(image, "A red\n circle\n\nis left.", ["red\n circle"], points, masks, maps)
    single = draw_overlay(image, "A red circle is left.", ["red circle"], points, masks, maps)
    assert np.array_equal(np.asarray(broken), np.asarray(single))
