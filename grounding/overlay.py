"""Drawing a grounded response so a person understands it at a glance (demo CLI and TensorBoard images).

The left panel is the image with each phrase's mask tinted in its own colour, its point prompt marked, and
its phrase written beside the point; the right panels are the per-phrase heat maps (the normalised
attention map upsampled to the image) in the same colours, and the caption runs along the bottom. Only
PIL and numpy are used, so drawing works wherever the framework runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from grounding.layout import GridView
from grounding.segment import upsample_map

PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (128, 128, 0), (0, 0, 128),
)  # fmt: skip


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB with a dark-blue -> red -> yellow ramp (uint8, shape + (3,))."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    stops = np.array([[0, 0, 40], [30, 60, 200], [220, 40, 40], [255, 230, 60]], dtype=np.float32)
    pos = v * (len(stops) - 1)
    low = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = pos - low
    rgb = stops[low[..., 0]] * (1 - frac) + stops[low[..., 0] + 1] * frac
    return rgb.astype(np.uint8)


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
) -> Image.Image:
    """Compose the overlay panel; ``maps`` are the (h, w) grid maps, put on the image by ``view`` (a grounded
    response's ``view``, any model) or, without one, upsampled with ``aspect``."""
    image = image.convert("RGB")
    scale = display_size / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    base = np.asarray(image.resize(size, Image.LANCZOS)).astype(np.float32)
    for i, mask in enumerate(masks):
        m = (
            np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize(size, Image.NEAREST))
            > 0
        )
        base[m] = 0.5 * base[m] + 0.5 * np.array(PALETTE[i % len(PALETTE)], dtype=np.float32)
    left = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(left)
    font = _font(max(11, display_size // 24))
    for i, ((x, y), phrase) in enumerate(zip(points, phrases, strict=True)):
        colour = PALETTE[i % len(PALETTE)]
        cx, cy = (x + 0.5) * scale, (y + 0.5) * scale
        r = max(4, display_size // 60)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=(255, 255, 255), width=2)
        text_w, text_h = draw.textbbox((0, 0), phrase, font=font)[2:]
        tx = min(max(cx + r + 2, 0), max(size[0] - text_w - 2, 0))
        ty = cy - r - text_h - 2 if cy + text_h + r > size[1] else cy - r  # keep the label inside the image
        draw.text(
            (tx, max(ty, 0)), phrase, fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0)
        )

    tiles = []
    for i, (phrase, grid_map) in enumerate(zip(phrases, maps, strict=True)):
        if view is not None:
            up = view.render(grid_map).numpy()
        else:
            up = upsample_map(grid_map, (image.height, image.width), aspect).numpy()
        span = float(up.max() - up.min()) or 1.0
        heat = Image.fromarray(heat_colours((up - up.min()) / span)).resize(size, Image.BILINEAR)
        tile = Image.new(
            "RGB", (size[0], size[1] + font.size + 8 if hasattr(font, "size") else size[1] + 20), "white"
        )
        tile.paste(heat, (0, tile.height - size[1]))
        ImageDraw.Draw(tile).text((4, 2), phrase, fill=PALETTE[i % len(PALETTE)], font=font)
        tiles.append(tile)

    header = tiles[0].height - size[1] if tiles else 0
    width = size[0] * (1 + len(tiles)) + 8 * len(tiles)
    caption_lines = _wrap(caption or "(empty response)", max(20, width // max(7, display_size // 40)))
    line_h = (font.size if hasattr(font, "size") else 12) + 4
    canvas = Image.new("RGB", (width, header + size[1] + line_h * len(caption_lines) + 8), "white")
    canvas.paste(left, (0, header))
    for i, tile in enumerate(tiles):
        canvas.paste(tile, ((size[0] + 8) * (i + 1), 0))
    d = ImageDraw.Draw(canvas)
    for j, line in enumerate(caption_lines):
        d.text((4, header + size[1] + 4 + j * line_h), line, fill=(0, 0, 0), font=font)
    return canvas


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])
