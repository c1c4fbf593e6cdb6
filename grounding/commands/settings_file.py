"""``settings.json`` beside a folder of predictions: what made them, so a resumed run cannot mix settings."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


class SettingsMismatch(Exception):
    """A folder already holds predictions made with other settings."""


def check_settings(
    out: Path,
    settings: dict[str, Any],
    ignore: Iterable[str] = (),
    predictions: str = "",
    absent_means: Mapping[str, Any] | None = None,
) -> None:
    """Record ``settings`` in ``out/settings.json``, or, when the folder already holds predictions
    (``*.json`` in ``out/predictions``, or in ``out`` itself when ``predictions`` is empty), refuse settings
    that differ from the recorded ones in any key but ``ignore`` (those only change speed). ``absent_means``:
    for settings added after a folder was written, the value its missing key stands for (what the code did
    then), so a folder from an older version resumes."""
    out = Path(out)
    path = out / "settings.json"
    folder = out / predictions if predictions else out
    has_predictions = folder.is_dir() and any(p.name != "settings.json" for p in folder.glob("*.json"))
    settings = json.loads(
        json.dumps(settings, default=str)
    )  # as it reads back: tuples -> lists, paths -> str
    if path.is_file() and has_predictions:
        recorded = {**(absent_means or {}), **json.loads(path.read_text(encoding="utf-8"))}
        skip = set(ignore)
        for key in sorted((recorded.keys() | settings.keys()) - skip):
            if recorded.get(key) != settings.get(key):
                raise SettingsMismatch(
                    f"{out} holds predictions made with {key}={recorded.get(key)!r}, this run has "
                    f"{settings.get(key)!r}; use another --out (or delete the predictions there)"
                )
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".settings.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
