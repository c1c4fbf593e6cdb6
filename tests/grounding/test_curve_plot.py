"""The grounding-curve plot (grounding.curve_plot): stages laid end to end on one step axis, one line per metric."""

import numpy as np
from PIL import Image

from grounding.curve_plot import DEFAULT_METRICS, curve_points, plot_grounding_curve

HISTORY = [
    {"stage": "pretrain", "step": 400, "pointing": 0.1, "recall": 0.0, "chance_pointing": 0.05},
    {"stage": "pretrain", "step": 600, "pointing": 0.2, "recall": 0.1, "chance_pointing": 0.05},
    {"stage": "instruct", "step": 400, "pointing": 0.5, "recall": 0.3, "chance_pointing": 0.05},
    {"stage": "instruct", "step": 1200, "pointing": 0.9, "recall": 0.6, "chance_pointing": 0.05},
]


def test_stages_are_laid_end_to_end():
    xs, stages = curve_points(HISTORY)
    assert xs == [400, 600, 1000, 1800]
    assert stages == [("pretrain", 0, 600), ("instruct", 600, 1800)]


def test_the_plot_draws_each_metric_in_its_colour(tmp_path):
    path = plot_grounding_curve(HISTORY, tmp_path / "g" / "curve.png")
    pixels = np.asarray(Image.open(path).convert("RGB"))
    for key in ("pointing", "recall"):
        colour = DEFAULT_METRICS[key][1]
        assert (pixels == colour).all(axis=-1).sum() > 100, key
    absent = DEFAULT_METRICS["ap50"][1]  # no record has AP50: no line, no legend entry
    assert (pixels == absent).all(axis=-1).sum() == 0


def test_the_last_step_label_fits_and_the_legend_sits_where_no_line_runs(tmp_path):
    """A 4-digit last step at the right edge stays inside the image; with a line along the top (mIoU 0.95) and
    one rising from 0.4, the legend goes to a bottom corner, and the top line is drawn whole."""
    history = [
        {"stage": "pretrain", "step": 400, "miou": 0.95, "pointing": 0.4},
        {"stage": "instruct", "step": 3300, "miou": 0.95, "pointing": 0.9},
    ]
    path = plot_grounding_curve(history, tmp_path / "curve.png")
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    height, width, _ = pixels.shape
    left, top, plot_h = 48, 30, height - 30 - 44
    plot_w = width - left - 16
    axis_labels = pixels[top + plot_h + 4 : top + plot_h + 22]
    assert (
        axis_labels[:, -1] == 255
    ).all()  # nothing drawn in the last column: the label "3700" ends before it
    assert (axis_labels[:, -40:] < 200).any()  # but it is there, near the edge
    words = np.argwhere((pixels[top : top + plot_h] < 60).all(axis=-1))  # the legend's black text
    assert len(words) > 50 and (words[:, 0] > plot_h / 2).all()
    line_y = round(top + plot_h * 0.05)
    miou = DEFAULT_METRICS["miou"][1]
    start = round(left + plot_w * 400 / 3700)
    assert (pixels[line_y, start + 4 : left + plot_w - 4] == miou).all(axis=-1).mean() > 0.95
