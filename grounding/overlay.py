"""Drawing a grounded response so a person understands it at a glance (demo CLI and TensorBoard images).

The left panel is the image with each phrase's mask tinted and outlined in the phrase's colour, its point
prompt marked, and its label (the phrase on a tag of its colour) placed where it covers neither another label
nor any mask: beside the object when there is room, else in a gutter to the right of the image with a leader
line to the point. The right panels are the per-phrase heat maps (the normalised attention map upsampled to
the image) under a title bar of the same colour, with the mask outlined and the point marked; the caption
runs along the bottom with each phrase highlighted in its colour. Colours come from one palette in phrase
order; when two phrases' colours fall in the same colour family (hue bucket: possible with many phrases),
the labels are numbered and a legend lists number, colour and phrase. Only PIL and numpy are used, so
drawing works wherever the framework runs. ``overlay_layout`` computes the geometry ``draw_overlay`` draws.
"""

from __future__ import annotations

import colorsys
import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from grounding.layout import GridView
from grounding.segment import upsample_map

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 with x1, y1 exclusive

PALETTE: tuple[RGB, ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (128, 128, 0), (0, 0, 128),
)  # fmt: skip
#: Hue buckets (degrees, upper bounds) that people name as one colour; the last wraps back to red.
_FAMILIES = ((15, "red"), (45, "orange"), (70, "yellow"), (165, "green"), (200, "cyan"), (255, "blue"),
             (290, "purple"), (335, "magenta"), (360, "red"))  # fmt: skip
_GUTTER_GAP = 6
_TILE_GAP = 8


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def phrase_colour(index: int) -> RGB:
    return PALETTE[index % len(PALETTE)]


def colour_family(colour: RGB) -> str:
    """The colour name a person would give ``colour`` (grey for unsaturated or very dark colours)."""
    hue, lightness, saturation = colorsys.rgb_to_hls(*(c / 255 for c in colour))
    if saturation < 0.25 or lightness < 0.12 or lightness > 0.92:
        return "grey"
    degrees = hue * 360
    return next(name for bound, name in _FAMILIES if degrees < bound)


def text_colour_on(background: RGB) -> RGB:
    """Black or white, whichever reads better on ``background`` (relative luminance)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB with a dark-blue -> red -> yellow ramp (uint8, shape + (3,))."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    stops = np.array([[0, 0, 40], [30, 60, 200], [220, 40, 40], [255, 230, 60]], dtype=np.float32)
    pos = v * (len(stops) - 1)
    low = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = pos - low
    rgb = stops[low[..., 0]] * (1 - frac) + stops[low[..., 0] + 1] * frac
    return rgb.astype(np.uint8)


@dataclasses.dataclass
class Label:
    """A phrase's tag in the left panel: ``box`` in panel pixels; ``leader``: drawn with a line to the point."""

    index: int
    text: str
    box: Box
    point: tuple[float, float]
    leader: bool


@dataclasses.dataclass
class OverlayLayout:
    """The geometry of an overlay's left panel: the image at ``size`` (top left at the origin), a gutter to
    its right when some label did not fit beside its object (``panel_width`` > image width), the masks at
    display size, and one label per phrase."""

    size: tuple[int, int]
    panel_width: int
    panel_height: int
    scale: float
    colours: list[RGB]
    masks: list[np.ndarray]
    labels: list[Label]
    legend: bool
    font_size: int


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    return np.asarray(image.resize(size, Image.NEAREST)) > 0


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _label_text(index: int, phrase: str, legend: bool) -> str:
    return f"{index + 1}. {phrase}" if legend else phrase


def _boxes_overlap(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def overlay_layout(
    image_size: tuple[int, int],
    phrases: Sequence[str],
    points: Sequence[tuple[int, int]],
    masks: Sequence[np.ndarray],
    display_size: int = 320,
) -> OverlayLayout:
    """Where everything of the left panel goes, for an image of ``image_size = (W, H)``.

    Each label is tried at positions around its point, nearest first, and takes the first that stays inside
    the image and overlaps no mask pixel, no point marker and no label placed before it; a label with no such
    position goes to the gutter, stacked below the gutter's previous labels.
    """
    width, height = image_size
    scale = display_size / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    colours = [phrase_colour(i) for i in range(len(phrases))]
    families = [colour_family(c) for c in colours]
    legend = len(set(families)) < len(families)
    font_size = max(11, display_size // 24)
    font = _font(font_size)
    display_masks = [_resize_mask(m, size) for m in masks]
    occupied = np.zeros((size[1], size[0]), dtype=bool)
    for m in display_masks:
        occupied |= m
    radius = max(4, display_size // 60)
    anchors = [((x + 0.5) * scale, (y + 0.5) * scale) for x, y in points]
    markers: list[Box] = [
        (int(cx - radius - 1), int(cy - radius - 1), int(cx + radius + 2), int(cy + radius + 2))
        for cx, cy in anchors
    ]
    # Integral image of occupied pixels: any box's count in four lookups.
    integral = np.pad(occupied.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def covers_mask(box: Box) -> bool:
        x0, y0, x1, y1 = box
        return bool(integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0])

    labels: list[Label] = []
    gutter: list[int] = []  # label indices that go to the gutter
    placed: list[Box] = []
    pad = 3
    for i, (phrase, (cx, cy)) in enumerate(zip(phrases, anchors, strict=True)):
        text = _label_text(i, phrase, legend)
        left, top, right, bottom = font.getbbox(text)
        w, h = right - left + 2 * pad, bottom - top + 2 * pad
        box = None
        for dist in (radius + 3, radius + 10, radius + 20, radius + 35, radius + 55, radius + 80):
            for dx, dy in ((1, 0), (-1, 0), (0, -1), (0, 1), (1, -1), (-1, -1), (1, 1), (-1, 1)):
                # The box's edge nearest the point sits ``dist`` from it along the direction.
                x0 = cx + dx * dist - (w if dx < 0 else 0 if dx > 0 else w / 2)
                y0 = cy + dy * dist - (h if dy < 0 else 0 if dy > 0 else h / 2)
                cand = (int(round(x0)), int(round(y0)), int(round(x0)) + w, int(round(y0)) + h)
                if cand[0] < 0 or cand[1] < 0 or cand[2] > size[0] or cand[3] > size[1]:
                    continue
                if covers_mask(cand) or any(_boxes_overlap(cand, b) for b in placed + markers):
                    continue
                box = cand
                break
            if box is not None:
                break
        if box is None:
            gutter.append(i)
            labels.append(Label(i, text, (0, 0, w, h), (cx, cy), leader=True))
            continue
        placed.append(box)
        labels.append(Label(i, text, box, (cx, cy), leader=dist > radius + 10))

    panel_width, panel_height = size
    if gutter:
        x0 = size[0] + _GUTTER_GAP
        y = 0
        widest = 0
        for i in gutter:
            label = labels[i]
            w, h = label.box[2], label.box[3]
            label.box = (x0, y, x0 + w, y + h)
            y += h + 4
            widest = max(widest, w)
        panel_width = x0 + widest + 2
        panel_height = max(panel_height, y)
    return OverlayLayout(
        size, panel_width, panel_height, scale, colours, display_masks, labels, legend, font_size
    )


def _outline(mask: np.ndarray) -> np.ndarray:
    """The border pixels of ``mask`` (those with a 4-neighbour outside it), thickened inward to two pixels."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    border = mask & ~interior
    p = np.pad(border, 1, constant_values=False)
    return border | (mask & (p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]))


def _rim(mask: np.ndarray) -> np.ndarray:
    """The pixels just outside ``mask`` (4-neighbours of it): drawn dark so an outline shows on any colour."""
    p = np.pad(mask, 1, constant_values=False)
    return ~mask & (p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:])


def _draw_point(draw: ImageDraw.ImageDraw, cx: float, cy: float, radius: int, colour: RGB) -> None:
    draw.ellipse(
        (cx - radius, cy - radius, cx + radius, cy + radius), fill=colour, outline=(255, 255, 255), width=2
    )
    draw.ellipse((cx - radius - 1, cy - radius - 1, cx + radius + 1, cy + radius + 1), outline=(0, 0, 0))


def _draw_tag(draw: ImageDraw.ImageDraw, box: Box, text: str, colour: RGB, font: ImageFont.ImageFont) -> None:
    draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=colour, outline=(0, 0, 0))
    left, top, _, _ = font.getbbox(text)
    draw.text((box[0] + 3 - left, box[1] + 3 - top), text, fill=text_colour_on(colour), font=font)


def _left_panel(image: Image.Image, layout: OverlayLayout) -> Image.Image:
    base = np.asarray(image.resize(layout.size, Image.LANCZOS)).astype(np.float32)
    for mask, colour in zip(layout.masks, layout.colours, strict=True):
        base[mask] = 0.55 * base[mask] + 0.45 * np.array(colour, dtype=np.float32)
    for mask, colour in zip(layout.masks, layout.colours, strict=True):
        base[_rim(mask)] = 0
        base[_outline(mask)] = colour
    panel = Image.new("RGB", (layout.panel_width, layout.panel_height), "white")
    panel.paste(Image.fromarray(base.astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(panel)
    font = _font(layout.font_size)
    radius = max(4, max(layout.size) // 60)
    for label in layout.labels:
        colour = layout.colours[label.index]
        if label.leader:
            x0, y0, x1, y1 = label.box
            end = (min(max(label.point[0], x0), x1 - 1), min(max(label.point[1], y0), y1 - 1))
            draw.line([label.point, end], fill=(0, 0, 0), width=3)
            draw.line([label.point, end], fill=colour, width=1)
    for label in layout.labels:
        _draw_point(draw, *label.point, radius, layout.colours[label.index])
    for label in layout.labels:
        _draw_tag(draw, label.box, label.text, layout.colours[label.index], font)
    return panel


def _heat_tile(
    grid_map: torch.Tensor,
    image: Image.Image,
    aspect: str,
    view: GridView | None,
    layout: OverlayLayout,
    index: int,
    title: str,
    title_height: int,
    image_map: torch.Tensor | None = None,
) -> Image.Image:
    if image_map is not None:
        up = image_map.float().numpy()
    elif view is not None:
        up = view.render(grid_map).numpy()
    else:
        up = upsample_map(grid_map, (image.height, image.width), aspect).numpy()
    span = float(up.max() - up.min()) or 1.0
    heat = np.asarray(
        Image.fromarray(heat_colours((up - up.min()) / span)).resize(layout.size, Image.BILINEAR)
    )
    heat = heat.copy()
    colour = layout.colours[index]
    if index < len(layout.masks):
        heat[_rim(layout.masks[index])] = 255
        heat[_outline(layout.masks[index])] = colour
    tile = Image.new("RGB", (layout.size[0], layout.size[1] + title_height), "white")
    tile.paste(Image.fromarray(heat), (0, title_height))
    draw = ImageDraw.Draw(tile)
    font = _font(layout.font_size)
    draw.rectangle((0, 0, layout.size[0] - 1, title_height - 2), fill=colour)
    text = title
    while len(text) > 3 and draw.textlength(text, font=font) > layout.size[0] - 8:
        text = text[:-4] + "..."
    left, top, _, bottom = font.getbbox(text)
    draw.text(
        (4 - left, (title_height - 1 - (bottom - top)) // 2 - top),
        text,
        fill=text_colour_on(colour),
        font=font,
    )
    if index < len(layout.labels):
        cx, cy = layout.labels[index].point
        _draw_point(draw, cx, cy + title_height, max(4, max(layout.size) // 60), colour)
    return tile


def phrase_spans(caption: str, phrases: Sequence[str]) -> list[tuple[int, int] | None]:
    """Character span of each phrase in ``caption``, searched in order (case-insensitive); None if absent."""
    lower = caption.lower()
    spans: list[tuple[int, int] | None] = []
    start = 0
    for phrase in phrases:
        at = lower.find(phrase.lower(), start)
        if at < 0:
            at = lower.find(phrase.lower())
        if at < 0 or not phrase:
            spans.append(None)
            continue
        spans.append((at, at + len(phrase)))
        start = at + len(phrase)
    return spans


def _caption_runs(caption: str, phrases: Sequence[str]) -> list[tuple[str, int | None]]:
    """The caption as words, each with the index of the phrase it belongs to (None: plain text)."""
    owner = [None] * len(caption)
    for i, span in enumerate(phrase_spans(caption, phrases)):
        if span is not None:
            for c in range(*span):
                owner[c] = i
    runs: list[tuple[str, int | None]] = []
    word, word_owner = "", None
    for ch, who in zip(caption, owner, strict=True):
        if ch.isspace():
            if word:
                runs.append((word, word_owner))
            word, word_owner = "", None
            continue
        if word and who != word_owner:  # a phrase boundary inside a word ("circle." -> "circle" + ".")
            runs.append((word, word_owner))
            word = ""
        if not word:
            word_owner = who
        word += ch
    if word:
        runs.append((word, word_owner))
    return runs


def _draw_caption(
    draw: ImageDraw.ImageDraw,
    origin: tuple[int, int],
    width: int,
    caption: str,
    phrases: Sequence[str],
    colours: Sequence[RGB],
    font: ImageFont.ImageFont,
    line_height: int,
) -> int:
    """Draw the wrapped caption with phrases highlighted; returns the number of lines."""
    x0, y0 = origin
    space = draw.textlength(" ", font=font)
    x, line = x0, 0
    runs = _caption_runs(caption or "(empty response)", phrases)
    for k, (word, who) in enumerate(runs):
        w = draw.textlength(word, font=font)
        joined = k > 0 and runs[k - 1][1] == who and who is not None
        if x > x0 and x + w > x0 + width:
            x, line = x0, line + 1
            joined = False
        y = y0 + line * line_height
        if who is not None:
            start = x - (space if joined else 0)
            draw.rectangle((start, y - 1, x + w, y + line_height - 3), fill=colours[who])
            draw.text((x, y), word, fill=text_colour_on(colours[who]), font=font)
        else:
            draw.text((x, y), word, fill=(0, 0, 0), font=font)
        x += w + space
    return line + 1


def draw_overlay(
    image: Image.Image,
    caption: str,
    phrases: Sequence[str],
    points: Sequence[tuple[int, int]],
    masks: Sequence[np.ndarray],
    maps: Sequence[torch.Tensor],
    aspect: str = "pad",
    display_size: int = 320,
    view: GridView | None = None,
    image_maps: Sequence[torch.Tensor] | None = None,
) -> Image.Image:
    """Compose the overlay panel; ``maps`` are the (h, w) grid maps, put on the image by ``view`` (a grounded
    response's ``view``, any model) or, without one, upsampled with ``aspect``; ``image_maps``, when given, are
    the ``(H, W)`` maps already on the image that the points and masks came from
    (``GroundedResponse.image_maps``: with ``grid_shifts`` finer than the grid) and are drawn instead."""
    if image_maps is not None and len(image_maps) != len(maps):
        raise ValueError(f"{len(image_maps)} image maps for {len(maps)} phrase maps")
    image = image.convert("RGB")
    # One line each: a response may hold newlines (an undertrained model's, or a chat model's), which PIL cannot
    # measure, and a label or title bar has room for one line anyway.
    caption = _one_line(caption)
    phrases = [_one_line(phrase) for phrase in phrases]
    layout = overlay_layout(image.size, phrases, points, masks, display_size)
    font = _font(layout.font_size)
    line_height = layout.font_size + 6
    title_height = line_height + 2
    left = _left_panel(image, layout)
    tiles = [
        _heat_tile(
            grid_map,
            image,
            aspect,
            view,
            layout,
            i,
            _label_text(i, phrase, layout.legend),
            title_height,
            None if image_maps is None else image_maps[i],
        )
        for i, (phrase, grid_map) in enumerate(zip(phrases, maps, strict=True))
    ]
    header = title_height if tiles else 0
    width = layout.panel_width + sum(t.width + _TILE_GAP for t in tiles)
    legend_lines = len(phrases) if layout.legend else 0
    # Caption lines are counted by a dry run on a scratch canvas (wrapping depends on word widths).
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    n_lines = _draw_caption(scratch, (4, 0), width - 8, caption, phrases, layout.colours, font, line_height)
    body = max(layout.panel_height, layout.size[1])
    height = header + body + 6 + line_height * (n_lines + legend_lines) + 6
    canvas = Image.new("RGB", (width, height), "white")
    canvas.paste(left, (0, header))
    x = layout.panel_width + _TILE_GAP
    for tile in tiles:  # the heat maps line up with the image; their title bars sit in the header
        canvas.paste(tile, (x, header - title_height))
        x += tile.width + _TILE_GAP
    draw = ImageDraw.Draw(canvas)
    y = header + body + 6
    _draw_caption(draw, (4, y), width - 8, caption, phrases, layout.colours, font, line_height)
    y += n_lines * line_height
    for i, phrase in enumerate(phrases if layout.legend else ()):
        row = y + i * line_height
        draw.rectangle(
            (4, row, 4 + line_height - 4, row + line_height - 4), fill=layout.colours[i], outline=(0, 0, 0)
        )
        draw.text((line_height + 4, row), f"{i + 1}. {phrase}", fill=(0, 0, 0), font=font)
    return canvas
