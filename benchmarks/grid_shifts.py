"""What reading each response again on shifted copies of the image costs (``grounding.grid_shifts``).

Runs attend-and-segment (generation with the attention capture, phrases, points, masks: the whole pipeline a
grounding evaluation runs) over the first ``--images`` validation images of a trained run, with its own
grounding settings and ``grid_shifts`` = each of ``--shifts``. After one warm-up pass per setting, ``--repeats``
rounds run every setting once, in an order rotated each round, so that load changes hit all alike; the table
gives the median wall time per image and, per setting, the median over rounds of its time over the single
map's in the same round.

    python benchmarks/grid_shifts.py --run runs/shapes-default [--images 48] [--shifts 1 2 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402

from grounding.attend import AttendAndSegment  # noqa: E402
from grounding.commands.models import ModelLoadError, load_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/shapes-default"))
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--shifts", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.images < 1 or args.repeats < 1 or min(args.shifts) < 1:
        raise SystemExit("error: --images, --repeats and every --shifts value must be >= 1")
    shifts = sorted(set(args.shifts) | {1})
    try:
        loaded = load_model(argparse.Namespace(run=args.run, device="cpu"))
    except ModelLoadError as err:
        raise SystemExit(f"error: {err}") from None
    config = loaded.run_config
    folder = Path(config.data.root) / config.grounding.data / "images"
    paths = sorted(folder.iterdir())[: args.images]
    if not paths:
        raise SystemExit(f"error: no validation images in {folder}")
    images = [Image.open(p).convert("RGB") for p in paths]
    base = config.grounding.attend_settings()
    pipelines = {n: AttendAndSegment(loaded.model, dataclasses.replace(base, grid_shifts=n)) for n in shifts}
    for pipeline in pipelines.values():  # warm-up
        pipeline(images[: base.batch_size])
    times: dict[int, list[float]] = {n: [] for n in shifts}
    for round_ in range(args.repeats):
        order = shifts[round_ % len(shifts) :] + shifts[: round_ % len(shifts)]
        for n in order:
            start = time.perf_counter()
            pipelines[n](images)
            times[n].append((time.perf_counter() - start) / len(images))
    print(
        f"\n{args.run}: {len(images)} images, batch {base.batch_size}, refiner {base.refiner}, "
        f"{args.repeats} rounds"
    )
    print("| grid_shifts | copies read | ms per image (median) | / one map (median of rounds) |")
    print("|---|---|---|---|")
    for n in shifts:
        ratio = statistics.median(t / one for t, one in zip(times[n], times[1], strict=True))
        print(f"| {n} | {n * n} | {statistics.median(times[n]) * 1e3:.1f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
