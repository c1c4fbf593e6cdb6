"""The grounding curve as a picture: metrics of the training-time grounding evaluation against training steps.

``plot_grounding_curve(history, path)`` draws the records the training callback keeps (``grounding/metrics.json``:
one dict per evaluation with ``stage``, ``step`` and the metrics) as lines on one step axis, the stages laid
end to end with a dashed boundary and their names, the pointing chance level as a dashed grey line, and a
legend in the plot's corner that the lines cross least. Drawn with PIL (no plotting library is a dependency), so
it works wherever training runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

#: metric key -> (legend name, line colour).
DEFAULT_METRICS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "pointing": ("pointing accuracy", (31, 119, 180)),
    "recall": ("mask recall", (255, 127, 14)),
    "threshold_recall": ("mask recall, threshold refiner", (140, 86, 75)),  # grounding.threshold_also
    "miou": ("mIoU", (44, 160, 44)),
    "ap50": ("AP50", (214, 39, 40)),
    "description": ("description accuracy", (148, 103, 189)),
}


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def curve_points(history: Sequence[dict[str, Any]]) -> tuple[list[float], list[tuple[str, float, float]]]:
    """The x of each record on one axis (each stage's steps offset by the stages before it, in order of first
    appearance) and each stage's (name, start, end)."""
    offsets: dict[str, float] = {}
    ends: dict[str, float] = {}
    xs = []
    total = 0.0
    for record in history:
        stage = str(record.get("stage"))
        if stage not in offsets:
            offsets[stage] = total
        x = offsets[stage] + float(record["step"])
        ends[stage] = max(ends.get(stage, x), x)
        total = max(total, ends[stage])
        xs.append(x)
    return xs, [(stage, offsets[stage], ends[stage]) for stage in offsets]


def plot_grounding_curve(
    history: Sequence[dict[str, Any]],
    path: str | Path,
    metrics: dict[str, tuple[str, tuple[int, int, int]]] | None = None,
    title: str = "grounding during training (validation set)",
    size: tuple[int, int] = (720, 400),
) -> Path:
    """Write the curve of ``history`` (the callback's records) to ``path`` (PNG); returns the path."""
    metrics = DEFAULT_METRICS if metrics is None else metrics
    width, height = size
    left, right, top, bottom = 48, 16, 30, 44
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(13), _font(11)
    draw.text((left, 8), title, fill=(0, 0, 0), font=font)
    plot_w, plot_h = width - left - right, height - top - bottom
    xs, stages = curve_points(history)
    x_max = max(xs) if xs else 1.0
    x_max = x_max or 1.0

    def px(x: float) -> float:
        return left + plot_w * x / x_max

    def py(y: float) -> float:
        return top + plot_h * (1.0 - min(max(y, 0.0), 1.0))

    for k in range(6):  # y grid and labels at 0, 0.2, ..., 1
        y = k / 5
        draw.line([(left, py(y)), (left + plot_w, py(y))], fill=(225, 225, 225))
        draw.text((left - 30, py(y) - 7), f"{y:.1f}", fill=(80, 80, 80), font=small)
    draw.rectangle((left, top, left + plot_w, top + plot_h), outline=(120, 120, 120))
    for name, start, end in stages:
        if start > 0:
            _dashed(draw, (px(start), top), (px(start), top + plot_h), (120, 120, 120))
        label_x = px(start) + 4
        draw.text((label_x, top + plot_h + 22), name, fill=(60, 60, 60), font=small)
        for x in (start, end):
            label = f"{int(round(x))}"
            # the axis's last label ends inside the image instead of running off its right edge
            label_x = min(px(x) - 6, width - 2 - draw.textlength(label, font=small))
            draw.text((label_x, top + plot_h + 6), label, fill=(80, 80, 80), font=small)
    chance = [r.get("chance_pointing") for r in history if r.get("chance_pointing") is not None]
    if chance:
        _dashed(draw, (left, py(chance[-1])), (left + plot_w, py(chance[-1])), (150, 150, 150))
    legend: list[tuple[str, tuple[int, int, int]]] = []
    drawn: list[tuple[float, float]] = []  # points along every line, to place the legend clear of them
    for key, (name, colour) in metrics.items():
        series = [
            (x, r[key]) for x, r in zip(xs, history, strict=True) if isinstance(r.get(key), (int, float))
        ]
        if not series:
            continue
        points = [(px(x), py(y)) for x, y in series]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for cx, cy in points:
            draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=colour)
        drawn += [
            (ax + (bx - ax) * t / 16, ay + (by - ay) * t / 16)
            for (ax, ay), (bx, by) in zip(points, points[1:] or points, strict=False)
            for t in range(17)
        ]
        legend.append((f"{name} ({series[-1][1]:.2f})", colour))
    if legend:
        # In the plot's corner that the lines cross least, on a white box, so that no word is drawn over.
        box_w = 34 + max(draw.textlength(text, font=small) for text, _ in legend)
        box_h = 6 + 15 * len(legend)
        corners = [
            (x0, y0)
            for y0 in (top + 3, top + plot_h - 3 - box_h)
            for x0 in (left + 2, left + plot_w - 2 - box_w)
        ]

        def crossings(corner: tuple[float, float]) -> int:
            x0, y0 = corner
            return sum(x0 - 4 <= x <= x0 + box_w + 4 and y0 - 4 <= y <= y0 + box_h + 4 for x, y in drawn)

        x0, y0 = min(corners, key=crossings)
        draw.rectangle((x0, y0, x0 + box_w, y0 + box_h), fill="white")
        for i, (text, colour) in enumerate(legend):
            legend_y = y0 + 3 + 15 * i
            draw.line([(x0 + 6, legend_y + 7), (x0 + 24, legend_y + 7)], fill=colour, width=3)
            draw.text((x0 + 28, legend_y), text, fill=(0, 0, 0), font=small)
    if chance:  # its label at the line's right end, or at its left end when the legend sits at the right
        label_x = left + plot_w - 100
        if legend and x0 > left + 2 and y0 > top + 3:
            label_x = left + 6
        draw.text((label_x, py(chance[-1]) - 14), "pointing chance", fill=(120, 120, 120), font=small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _dashed(
    draw: ImageDraw.ImageDraw,
    start: tuple[float, float],
    end: tuple[float, float],
    colour: tuple[int, int, int],
) -> None:
    (x0, y0), (x1, y1) = start, end
    length = max(abs(x1 - x0), abs(y1 - y0))
    n = max(1, int(length // 6))
    for i in range(0, n, 2):
        a, b = i / n, min((i + 1) / n, 1.0)
        draw.line(
            [(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)], fill=colour
        )
