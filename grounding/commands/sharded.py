"""Every device at once for the ``reproduce`` commands: one process per device, a shard of the work each.

A command hands :func:`run_sharded` the items still to do (images, narratives, expressions) and a *work*
function ``work(args, items, progress)`` that loads the model on ``args.device``, processes its items in batches
and writes one result file per item atomically (so a rerun resumes item by item and shards never need to talk:
the results folder is the merge). With one process the work runs here; with ``N`` it runs in ``N`` spawned
processes (``torch.multiprocessing``), process ``r`` on ``cuda:r`` (round-robin when there are more
processes than GPUs; or the CPU), taking items ``r, r + N, ...``,
while this process shows one progress bar over all of them with the images per minute, counting result files.

``--processes`` defaults to the number of visible GPUs when the device is CUDA, else 1; on a CPU, ``N``
processes split the cores between them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ShardFailed",
    "Work",
    "add_parallel_arguments",
    "process_count",
    "read_ids",
    "run_sharded",
    "write_json_atomic",
]

#: ``work(args, items, progress)``: ``args.device`` is this process's device; call ``progress(0)`` once the model
#: is loaded and ``progress(n)`` after each ``n`` items.
Work = Callable[[argparse.Namespace, list[Any], Callable[[int], None]], None]


class ShardFailed(Exception):
    """A worker process failed; the message is its error's last line."""


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--processes",
        type=int,
        default=None,
        help="worker processes, one device each (default: every visible GPU on cuda, else 1)",
    )
    parser.add_argument(
        "--ids",
        nargs="+",
        default=None,
        metavar="ID",
        help="only these items (image / narrative / sentence ids; @FILE reads one id per line)",
    )


def read_ids(values: Sequence[str] | None) -> list[str] | None:
    """``--ids`` as strings (``@FILE`` entries expanded, one id per line)."""
    if values is None:
        return None
    out: list[str] = []
    for value in values:
        if value.startswith("@"):
            path = Path(value[1:])
            if not path.is_file():
                raise ShardFailed(f"--ids {value}: file not found")
            out += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            out.append(value)
    return out


def process_count(args: argparse.Namespace) -> int:
    """``--processes``, or one per visible GPU when running on CUDA, else 1."""
    if args.processes is not None:
        if args.processes < 1:
            raise ShardFailed(f"--processes must be >= 1, got {args.processes}")
        return args.processes
    if str(args.device).startswith("cuda"):
        import torch

        return max(1, torch.cuda.device_count())
    return 1


def write_json_atomic(path: Path, payload: Any, indent: int | None = None) -> None:
    """Write JSON so that a killed run never leaves a half file a resumed run would take as done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(payload, indent=indent, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _worker(rank: int, n: int, args: argparse.Namespace, items: list[Any], work: Work) -> None:
    import torch

    device = str(args.device)
    if device.startswith("cuda"):
        index = rank % max(1, torch.cuda.device_count())  # more processes than GPUs share them round-robin
        args.device = f"cuda:{index}"
        torch.cuda.set_device(index)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
    try:
        work(args, items[rank::n], lambda k: None)
    except Exception as err:  # a one-line reason crosses the process boundary, not a pickled exception
        raise RuntimeError(f"{type(err).__name__}: {err}") from None


def run_sharded(
    args: argparse.Namespace, items: Sequence[Any], work: Work, done: Callable[[], int], desc: str
) -> dict[str, Any]:
    """Run ``work`` over ``items`` in :func:`process_count` processes; ``done()`` counts finished result files
    (for the progress bar across processes). Returns the timing of the work."""
    from tqdm import tqdm

    items = list(items)
    n = min(process_count(args), len(items))
    start = time.perf_counter()
    bars: list[
        Any
    ] = []  # opened at the first progress call: after the model loaded, so a load error is alone

    def progress(k: int) -> None:
        if not bars:
            bars.append(tqdm(total=len(items), desc=desc, unit="img"))
        bar = bars[0]
        bar.update(k)
        bar.set_postfix(images_per_min=f"{60.0 * bar.n / max(time.perf_counter() - start, 1e-9):.1f}")

    try:
        if n <= 1:
            work(args, items, progress)
        else:
            import torch.multiprocessing as mp

            before = done()
            context = mp.start_processes(
                _worker, args=(n, args, items, work), nprocs=n, join=False, start_method="spawn"
            )
            try:
                finished = False
                while not finished:
                    finished = context.join(timeout=2.0)
                    progress(min(done() - before, len(items)) - (bars[0].n if bars else 0))
            except mp.ProcessRaisedException as err:
                lines = [line for line in str(err).splitlines() if line.strip()]
                raise ShardFailed(f"a worker process failed: {lines[-1] if lines else err}") from None
            except mp.ProcessExitedException as err:
                raise ShardFailed(f"a worker process died: {err}") from None
    finally:
        if bars:
            bars[0].close()
    seconds = time.perf_counter() - start
    return {
        "images": len(items),
        "seconds": seconds,
        "images_per_minute": 60.0 * len(items) / max(seconds, 1e-9),
        "processes": max(n, 1),
    }
