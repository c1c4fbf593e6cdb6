"""The file paths of a run config, made independent of the folder a command runs from.

A config names folders and files (data, tokenizer, weights) as the user typed them, usually relative to the
folder ``train.py`` ran in. ``train.py`` resolves them against that folder before the config is checked,
compared with the run's saved one and written to ``runs/<name>/config.yaml``, so a run directory refers to
what it needs by absolute path and every command that loads it works from any folder. Paths that a config
defines relative to ``data.root`` (``stages.<s>.data``, ``qa_eval.questions``, ``grounding.data``) stay so:
``data.root`` itself becomes absolute.

A run directory written before paths were resolved holds relative ones; ``training_folder`` recovers the
folder they were relative to from where the run directory is and its own ``runs_dir``. Standard library only.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from lmm.config import TrainConfig

#: Every config key that names a path on disk (dotted; ``encoder.clip`` is the diffusion and fused
#: encoders' CLIP tower). A new path field in the schema belongs here (tests/lmm/test_run_dir.py checks it).
PATH_KEYS: tuple[str, ...] = (
    "runs_dir",
    "data.root",
    "llm.path",
    "llm.tokenizer",
    "encoder.weights",
    "encoder.sd_path",
    "encoder.clip.weights",
    "grounding.sam_checkpoint",
    "grounding.text_model",
    "init.llava_hf",
    "towers.cache_dir",
)


def resolve_config_paths(config: TrainConfig, base: str | Path) -> TrainConfig:
    """``config`` with every relative path of ``PATH_KEYS`` made absolute against folder ``base``."""
    from lmm.config_loading import config_from_dict, config_to_dict

    return config_from_dict(resolve_paths(config_to_dict(config), base))


def resolve_paths(data: dict[str, Any], base: str | Path) -> dict[str, Any]:
    """A copy of config dict ``data`` whose ``PATH_KEYS`` are absolute (``~`` expanded, relative ones joined to
    ``base``; ``..`` kept as written, so a symlinked folder stays what the user named)."""
    data = copy.deepcopy(data)
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        section: Any = data
        for name in parents:
            section = section.get(name) if isinstance(section, dict) else None
        if isinstance(section, dict) and isinstance(section.get(leaf), str) and section[leaf]:
            path = Path(os.path.expanduser(section[leaf]))
            section[leaf] = str(path if path.is_absolute() else Path(os.path.abspath(Path(base) / path)))
    return data


def training_folder(run_path: str | Path, runs_dir: str) -> Path:
    """The folder ``train.py`` ran in for a run directory whose config has a relative ``runs_dir``: the run's
    ``runs_dir`` was relative to it, so it is the run directory's ancestor that many levels up."""
    parts = Path(runs_dir).parts
    if ".." in parts:  # cannot be undone from the run directory's location
        return Path.cwd()
    levels = len(parts) + 1  # runs_dir's parts, then the run's own folder
    return Path(os.path.abspath(run_path)).parents[levels - 1]
