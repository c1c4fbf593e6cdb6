"""What every ``python -m grounding reproduce`` command shares: the one-line input error, loading the model in a
worker, running the work on every device with a progress bar, ``--ids``, the settings a run defaults to, and
the table of measured numbers beside the paper's."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from grounding.commands.models import ModelLoadError, load_model
from grounding.commands.settings_file import SettingsMismatch, check_settings
from grounding.commands.sharded import ShardFailed, read_ids, run_sharded, write_json_atomic
from grounding.config import ADDED_SETTINGS, AttendConfig

__all__ = [
    "PAPER_SETTINGS",
    "ReproduceError",
    "absolute",
    "base_settings",
    "load_for_work",
    "pending",
    "predictions_folder",
    "print_rows",
    "read_predictions",
    "run_work",
    "select_ids",
    "single_map",
    "write_report",
]

#: The paper's GCG settings (the reference's final scripts); the refiner is SAM ViT-H once --sam is given.
PAPER_SETTINGS = AttendConfig()


class ReproduceError(Exception):
    """A problem with the inputs; reported as one ``error:`` line (exit status 2)."""


def load_for_work(args: argparse.Namespace) -> Any:
    """The groundable model ``args`` names, on ``args.device`` (a load error becomes a ``ReproduceError``)."""
    try:
        return load_model(args, PAPER_SETTINGS).model
    except ModelLoadError as err:
        raise ReproduceError(str(err)) from None


def run_work(
    args: argparse.Namespace, todo: Sequence[Any], work: Any, out_dir: Path, desc: str, batch_size: int
) -> dict:
    """Run ``work`` over ``todo`` on every device (``run_sharded``), counting ``out_dir``'s JSON files."""

    def done() -> int:
        return sum(1 for _ in out_dir.glob("*.json")) if out_dir.is_dir() else 0

    try:
        timing = run_sharded(args, todo, work, done, desc)
    except ShardFailed as err:
        raise ReproduceError(str(err)) from None
    timing["batch_size"] = batch_size
    peak = ""
    if str(args.device).startswith("cuda") and timing["processes"] == 1:
        import torch

        timing["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30  # weights included
        peak = f", peak GPU memory {timing['peak_gpu_gib']:.1f} GiB"
    print(
        f"{desc}: {timing['images']} items in {timing['seconds']:.1f} s ({timing['images_per_minute']:.2f} "
        f"per min at batch {batch_size}, {timing['processes']} process(es){peak})"
    )
    return timing


def predictions_folder(out: Path, recorded: Mapping[str, Any]) -> Path:
    """``out/predictions``, once the settings recorded in ``out`` are checked against ``recorded`` (written there
    on a first run): predictions made with other settings are never mixed into one result."""
    try:
        check_settings(
            out,
            dict(recorded),
            ignore=("batch_size",),
            predictions="predictions",
            absent_means=ADDED_SETTINGS,
        )
    except SettingsMismatch as err:
        raise ReproduceError(str(err)) from None
    return out / "predictions"


def pending(ids: Sequence[Any], path_of: Callable[[Any], Path], noun: str) -> list[Any]:
    """The ``ids`` without a prediction file yet (a rerun resumes there), and a line saying how many."""
    todo = [i for i in ids if not path_of(i).is_file()]
    print(f"{len(ids)} {noun}: {len(ids) - len(todo)} already done, {len(todo)} to ground")
    return todo


def read_predictions(ids: Sequence[Any], path_of: Callable[[Any], Path], field: str) -> dict[Any, Any]:
    """``field`` of each of ``ids``' prediction files that exists (an id without one is left out)."""
    found = {}
    for i in ids:
        path = path_of(i)
        if path.is_file():
            found[i] = json.loads(path.read_text(encoding="utf-8"))[field]
    return found


def write_report(out: Path, report: Mapping[str, Any]) -> None:
    """``out/metrics.json``, replaced atomically."""
    write_json_atomic(out / "metrics.json", report, indent=2)
    print(f"wrote {out / 'metrics.json'}")


def select_ids(ids: Sequence[Any], args: argparse.Namespace) -> list[Any]:
    """``ids`` limited to ``--ids`` (compared as strings), in their own order; unknown ids are an error."""
    try:
        wanted = read_ids(args.ids)
    except ShardFailed as err:
        raise ReproduceError(str(err)) from None
    if wanted is None:
        return list(ids)
    known = {str(i) for i in ids}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ReproduceError(f"--ids: {len(unknown)} ids are not in the data (first: {unknown[0]!r})")
    keep = set(wanted)
    return [i for i in ids if str(i) in keep]


def base_settings(args: argparse.Namespace) -> AttendConfig:
    """What unset options default to: the paper's settings, or a trained run's own grounding settings."""
    if args.run is None:
        return PAPER_SETTINGS
    from lmm.run_dir import RunDir

    return RunDir(args.run).read_config().grounding.attend_settings()


def single_map(settings: AttendConfig, task: str) -> AttendConfig:
    """``settings`` with ``grid_shifts`` 1, for a task that reads its maps without the pipeline's grounding
    step (``task`` names it); says so when the settings, a run's own, asked for shifted copies."""
    if settings.grid_shifts == 1:
        return settings
    print(
        f"note: grid_shifts {settings.grid_shifts} (the run's grounding settings) is read by GCG and the shapes "
        f"evaluations; {task} reads each map once"
    )
    return dataclasses.replace(settings, grid_shifts=1)


def absolute(path: Any) -> str | None:
    return None if path is None else str(Path(path).resolve())


def print_rows(
    title: str, columns: Sequence[tuple[str, str]], rows: Sequence[tuple[str, Mapping[str, Any]]]
) -> None:
    """A table: ``columns`` are ``(key, header)``; each row ``(label, values)`` with fractions (printed x100)."""
    header = ["", *(h for _, h in columns)]
    lines = [header]
    for label, values in rows:
        cells = []
        for key, _ in columns:
            v = values.get(key)
            cells.append("-" if v is None else f"{100.0 * v:.1f}")
        lines.append([label, *cells])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print(title)
    for line in lines:
        print("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(line)))
