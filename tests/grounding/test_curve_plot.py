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
