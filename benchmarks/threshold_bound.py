"""How much mask recall the threshold refiner can reach from a token-grid map, whatever the model.

The threshold refiner (``grounding.refiner: threshold``) makes a phrase's mask from its map alone: the map is
upsampled bicubically from the token grid to the image and thresholded around its peak. Its masks can only be
as good as what a grid map can say. This builds, for every ground-truth mask of a shapes-world split, the maps
an ideal model could give on the grid, runs the refiner on them exactly as attend-and-segment does (``pad``
aspect, point at the upsampled map's maximum) and prints the share of masks recovered with IoU > 0.5 (the IoU
criterion of GLaMM's mask recall) and the mean IoU, by the shape's share of the image:

- ``coverage``: each cell holds the fraction of it the shape covers (the best a grid map can carry);
- ``cells >= t``: 1 on the cells the shape covers at least ``t`` times as much as its best-covered cell, 0
  elsewhere: a map that finds the right cells but is flat over them, as attention over tokens smoothed by colour
  is (each token of a shape carries the same features, so each gets the same attention);
- ``cells >= t, n x n shifts`` (with ``--shifts n``): that flat map made on each of the ``n x n`` copies of the
  image shifted by fractions ``1 / n`` of a cell, put on the image, moved back and averaged, as
  ``grounding.grid_shifts`` does with the model's maps (``grounding.shifted_maps``).

    python benchmarks/threshold_bound.py [--split data/shapes/val] [--grids 8 16] [--flat 0.25 0.5]
        [--fraction 0.5] [--shifts 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from encoders.transform import pad_to_square  # noqa: E402
from grounding.coco_io import decode_rle  # noqa: E402
from grounding.layout import single_block_layout  # noqa: E402
from grounding.segment import ThresholdRefiner, argmax_point, upsample_map  # noqa: E402
from grounding.shifted_maps import shift_image, shift_offsets, unshift_map  # noqa: E402

#: Buckets of a shape's share of its image: the world's small, middle and large shapes.
AREAS = ((0.0, 0.03), (0.03, 0.08), (0.08, 1.0))


def coverage_map(mask: np.ndarray, grid: int) -> torch.Tensor:
    """``(grid, grid)``: the fraction of each token cell the mask covers, the image padded to a centred square
    as LLaVA's ``pad`` aspect does (so the cells are the encoder's)."""
    square = pad_to_square(Image.fromarray(mask.astype(np.uint8)), (0,))
    return F.adaptive_avg_pool2d(torch.from_numpy(np.asarray(square, np.float32))[None, None], grid)[0, 0]


def shifted_flat_map(mask: np.ndarray, grid: int, flat: float, shifts: int) -> torch.Tensor:
    """``(H, W)``: the mean over the ``shifts x shifts`` copies of the image shifted by ``1 / shifts`` of a cell
    of the ``cells >= flat`` map made on each copy, upsampled and moved back onto the image."""
    view = single_block_layout(range(grid * grid), (grid, grid), mask.shape, "pad").view()
    total = torch.zeros(mask.shape)
    offsets = shift_offsets(view, shifts)
    for dx, dy in offsets:
        moved = np.asarray(shift_image(Image.fromarray(mask.astype(np.uint8) * 255), dx, dy)) > 127
        cells = coverage_map(moved[..., 0], grid)
        total += unshift_map(upsample_map((cells >= flat * cells.max()).float(), mask.shape, "pad"), dx, dy)
    return total / len(offsets)


def refined_iou(mask: np.ndarray, grid_map: torch.Tensor, refiner: ThresholdRefiner) -> float:
    """IoU with ``mask`` of the threshold refiner's mask from ``grid_map`` (or an ``(H, W)`` map already on the
    image), point at the upsampled maximum."""
    upsampled = grid_map if grid_map.shape == mask.shape else upsample_map(grid_map, mask.shape, "pad")
    point = argmax_point(upsampled)
    blank = np.zeros((*mask.shape, 3), np.uint8)  # the threshold refiner never looks at the image
    predicted = refiner(blank, [point], [upsampled])[0]
    return float((predicted & mask).sum() / (predicted | mask).sum())


def area_buckets(masks: list[np.ndarray]) -> list[np.ndarray]:
    """Per bucket of ``AREAS``, which masks fall in it (their share of the image)."""
    areas = np.array([m.mean() for m in masks])
    return [(areas >= lo) & (areas < hi) for lo, hi in AREAS]


def bound_rows(
    masks: list[np.ndarray], grids: list[int], flats: list[float], fraction: float, shifts: int = 1
) -> list[dict]:
    """One row per (grid, map kind): recall (IoU > 0.5) and mean IoU, overall and per area bucket."""
    refiner = ThresholdRefiner(fraction)
    buckets = area_buckets(masks)
    rows = []
    for grid in grids:
        coverages = [coverage_map(m, grid) for m in masks]
        kinds = {"coverage": coverages}
        for t in flats:
            kinds[f"cells >= {t:g}"] = [(c >= t * c.max()).float() for c in coverages]
        for t in flats if shifts > 1 else ():
            kinds[f"cells >= {t:g}, {shifts} x {shifts} shifts"] = [
                shifted_flat_map(m, grid, t, shifts) for m in masks
            ]
        for kind, maps in kinds.items():
            ious = np.array([refined_iou(m, g, refiner) for m, g in zip(masks, maps, strict=True)])
            row = {
                "grid": grid,
                "map": kind,
                "recall": float((ious > 0.5).mean()),
                "miou": float(ious.mean()),
            }
            for (lo, hi), inside in zip(AREAS, buckets, strict=True):
                row[f"recall {lo:g}-{hi:g}"] = (
                    float((ious[inside] > 0.5).mean()) if inside.any() else float("nan")
                )
            rows.append(row)
    return rows


def load_masks(split: Path) -> list[np.ndarray]:
    path = split / "gcg_masks.json"
    try:
        annotations = json.loads(path.read_text())["annotations"]
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"error: {path}: expected a COCO-style JSON with 'annotations' ({err})") from None
    return [decode_rle(a["segmentation"]) for a in annotations]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", type=Path, default=Path("data/shapes/val"))
    parser.add_argument("--grids", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--flat", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--fraction", type=float, default=0.5, help="the refiner's threshold_fraction")
    parser.add_argument(
        "--shifts", type=int, default=1, help="also the flat maps averaged over n x n shifted copies (n > 1)"
    )
    args = parser.parse_args(argv)
    if args.shifts < 1:
        raise SystemExit(f"error: --shifts must be >= 1, got {args.shifts}")
    masks = load_masks(args.split)
    rows = bound_rows(masks, args.grids, args.flat, args.fraction, args.shifts)
    buckets = [f"recall {lo:g}-{hi:g}" for lo, hi in AREAS]
    counts = [int(inside.sum()) for inside in area_buckets(masks)]
    print(f"{len(masks)} masks of {args.split}; threshold fraction {args.fraction}")
    print(
        "| grid | map | recall (IoU > 0.5) | mIoU | "
        + " | ".join(f"recall, area {b.split()[1]} ({n})" for b, n in zip(buckets, counts, strict=True))
        + " |"
    )
    print("|---|---|---|---|" + "---|" * len(buckets))
    for r in rows:
        cells = " | ".join(f"{r[b]:.3f}" for b in buckets)
        print(f"| {r['grid']} x {r['grid']} | {r['map']} | {r['recall']:.3f} | {r['miou']:.3f} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
