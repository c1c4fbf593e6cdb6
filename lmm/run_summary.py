"""``summary.json``: what each stage of a run did (steps, seconds, final loss) and the QA accuracy.

A rerun loads a finished stage instead of training it; its summary then says only ``skipped``. The summary a
stage got when it trained is kept instead, so resuming a run never loses its stage times and losses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def merge_stage_summaries(
    previous: list[dict[str, Any]], current: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``current``'s stage summaries, where a stage that was only loaded (``skipped``) keeps the summary of
    the invocation that trained it (from ``previous``), when there is one."""
    trained = {s.get("stage"): s for s in previous if isinstance(s, dict) and not s.get("skipped")}
    return [trained.get(s.get("stage"), s) if s.get("skipped") else s for s in current]


def read_stage_summaries(path: Path) -> list[dict[str, Any]]:
    """The stage summaries of an earlier ``summary.json`` (none when it is missing or unreadable)."""
    try:
        stages = json.loads(Path(path).read_text()).get("stages", [])
    except (OSError, ValueError, AttributeError):
        return []
    return stages if isinstance(stages, list) else []


def write_summary(path: Path, report: dict[str, Any]) -> None:
    """Replace ``summary.json`` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
