"""Time of the SAM-free threshold refiner on photo-sized maps: bounded-resolution labelling vs the old search.

``ThresholdRefiner`` thresholds the upsampled attention map at full resolution and finds the 8-connected
component of the point with scipy's ``ndimage.label`` on the region reduced to at most ``max_side`` (1024)
pixels a side. Before, the component was grown from the point by repeated 3x3 max-pooling at full
resolution (a geodesic dilation), whose cost is pixels x the component's diameter: 226 s for 2000 x 1500
and more than 645 s for 8000 x 8000 in the report that led here. This times, per map size, the refiner as
it is now, the same refiner without the bound (scipy's labelling at full resolution), and the old search (only up to
``--old-max-pixels``, it takes minutes beyond), and prints one table:

    python benchmarks/threshold_refiner.py [--old-max-pixels 1000000]

The maps are what attend-and-segment feeds the refiner: a random 24 x 24 token grid upsampled bicubically to
the image, one phrase, the point at its maximum.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from grounding.segment import ThresholdRefiner, argmax_point, upsample_map  # noqa: E402

SIZES = ((512, 512), (1000, 750), (2000, 1500), (4000, 3000), (8000, 8000))


def geodesic_component(region: torch.Tensor, x: int, y: int) -> np.ndarray:
    """The refiner's previous algorithm, verbatim: dilate from the point inside the region until stable."""
    allowed = region[None, None].float()
    grown = torch.zeros_like(allowed)
    grown[0, 0, y, x] = allowed[0, 0, y, x]
    while True:
        before = grown
        for _ in range(8):
            grown = F.max_pool2d(grown, kernel_size=3, stride=1, padding=1) * allowed
        if torch.equal(grown, before):
            return grown[0, 0].bool().numpy()


def seconds(fn, *args) -> tuple[float, object]:  # noqa: ANN001, ANN002
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--old-max-pixels", type=int, default=1_000_000, help="run the old search up to this many pixels"
    )
    args = parser.parse_args(argv)
    refiner, unbounded = ThresholdRefiner(), ThresholdRefiner(max_side=10**9)
    generator = torch.Generator().manual_seed(0)
    grid = torch.randn(24, 24, generator=generator)
    print(
        f"threshold refiner, one phrase, fraction 0.5, max_side {refiner.max_side}; {torch.get_num_threads()} threads"
    )
    header = ("image (W x H)", "refiner now s", "unbounded s", "old search s", "old / now", "same mask")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("-" * (len(h) + 2) for h in header) + "|")
    for width, height in SIZES:
        upsampled = upsample_map(grid, (height, width), aspect="resize")
        image = np.zeros((height, width, 3), dtype=np.uint8)
        point = argmax_point(upsampled)
        refiner(image[:8, :8], [(0, 0)], [upsampled[:8, :8]])  # warm-up: scipy's import
        now, (mask,) = seconds(refiner, image, [point], [upsampled])
        full, (exact,) = seconds(unbounded, image, [point], [upsampled])
        low, peak = upsampled.min(), upsampled[point[1], point[0]]
        region = upsampled >= low + 0.5 * (peak - low)
        same = (
            "yes" if np.array_equal(mask, exact) else f"IoU {(mask & exact).sum() / (mask | exact).sum():.4f}"
        )
        old = ratio = "not run"
        if width * height <= args.old_max_pixels:
            old_s, old_mask = seconds(geodesic_component, region, *point)
            assert np.array_equal(old_mask, exact), "scipy's unbounded label must equal the old search"
            old, ratio = f"{old_s:.2f}", f"{old_s / now:.0f}x"
        print(f"| {width} x {height} | {now:.2f} | {full:.2f} | {old} | {ratio} | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
