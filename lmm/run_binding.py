"""A run directory bound to its config: a rerun may change how a run proceeds, never what it trains.

Before ``train.py`` writes anything, the resolved config is compared with the run's ``config.yaml``. Keys
that shape the weights or the data already trained (model, encoder, seeds, data, a started stage's recipe)
must be equal: a difference stops the run with one line listing the keys, before ``config.yaml`` or
anything else is touched (frozen weights are rebuilt from the config, so a changed seed or size would
otherwise load the trained checkpoints into another model). Keys that only say how far or how a run goes
(``RESUMABLE_KEYS``: step budgets, checkpoint cadence, logging, evaluation, devices and strategy, loader
workers) may change; so may anything while no stage has a checkpoint yet, a stage's recipe until that stage
starts, and ``run_stages`` as long as the started stages keep their order. Every invocation that passes is
appended to ``history.jsonl`` with the keys it changed, so the run's config history stays readable.
Standard library only (plus OmegaConf to read the saved YAML).
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import json
import os
from pathlib import Path
from typing import Any

from lmm.config import TrainConfig
from lmm.run_dir import RunDir

#: Keys (``fnmatch`` patterns over dotted keys) a rerun may change: they decide how far or how a run goes,
#: not what a trained step computes. Everything else is fixed once a stage has a checkpoint.
RESUMABLE_KEYS: tuple[str, ...] = (
    "run_name",  # a copied run directory
    "runs_dir",  # a moved one
    "stages.*.max_steps",
    "stages.*.epochs",
    "stages.*.checkpoint_every_n_steps",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.fsdp.*",
    "trainer.precision",
    "trainer.deterministic",
    "trainer.log_every_n_steps",
    "trainer.progress_bar",
    "trainer.progress_every_n_steps",
    "trainer.num_threads",
    "trainer.slurm_requeue",
    "data.num_workers",
    "data.record_samples",
    "llm.attn_implementation",
    "qa_eval.*",
    "grounding.*",
)


#: Weight paths ``train.py`` fills in from an in-world pretraining recipe (``lmm.towers.ensure_towers``):
#: weight key -> the recipe key whose tower they name.
TOWER_WEIGHTS: dict[str, str] = {
    "encoder.weights": "encoder.pretrain.steps",  # CLIP encoder
    "encoder.sd_path": "encoder.pretrain.vae.steps",  # diffusion encoder
    "encoder.clip.weights": "encoder.clip.pretrain.steps",  # the diffusion encoder's CLIP
}


class RunBindingError(Exception):
    """A rerun whose config differs from the run's own in keys that shape what was trained (one line)."""


@dataclasses.dataclass
class Binding:
    """The outcome of the check: a new run, or the changed (allowed) keys as ``key -> (saved, new)``."""

    new_run: bool
    changed: dict[str, tuple[Any, Any]]


def check_run_binding(config: TrainConfig) -> Binding:
    """Compare ``config`` (paths resolved) with its run directory's saved config; raise ``RunBindingError``
    when a key that shapes the trained weights or data differs. Reads only."""
    from lmm.config_loading import ConfigError, config_from_dict, config_to_dict
    from lmm.run_paths import resolve_paths, training_folder

    run = RunDir(config.run_dir)
    if not run.config_file.is_file():
        return Binding(new_run=True, changed={})
    raw = _read_yaml(run.config_file)
    runs_dir = str(raw.get("runs_dir", "runs"))
    base = Path.cwd() if Path(runs_dir).is_absolute() else training_folder(run.path, runs_dir)
    try:
        saved = config_from_dict(resolve_paths(raw, base))
    except ConfigError as err:
        raise RunBindingError(
            f"{run.config_file} does not fit the current config schema ({err}); cannot check that this "
            "config continues that run: use another run_name"
        ) from None
    if config.init.llava_hf is not None and config.init.llava_hf == saved.init.llava_hf:
        # encoder, projector and llm are unpacked from init.llava_hf (lmm.build.with_initial_weights), and the
        # saved sections name the unpacked files: the source folder is what is compared, not them.
        config = dataclasses.replace(config, encoder=saved.encoder, projector=saved.projector, llm=saved.llm)
    old, new = _flatten(config_to_dict(saved)), _flatten(config_to_dict(config))
    for key, pretrain in TOWER_WEIGHTS.items():
        # train.py names the cached in-world tower's files (lmm.towers) after this check: the tower's recipe
        # (``pretrain``), compared like any key, decides them.
        if new.get(key, _ABSENT) is None and new.get(pretrain) is not None and key in old:
            new[key] = old[key]
    differing = sorted(k for k in old.keys() | new.keys() if old.get(k, _ABSENT) != new.get(k, _ABSENT))
    started = [s for s in saved.run_stages if run.newest_checkpoint(s) is not None]
    fixed = [k for k in differing if started and not _may_change(k, saved, config, started)]
    if fixed:
        listed = ", ".join(
            f"{k} ({_short(old.get(k, _ABSENT))} -> {_short(new.get(k, _ABSENT))})" for k in fixed
        )
        raise RunBindingError(
            f"{run.path} was trained with another config, and these keys shape its weights or data: {listed}; "
            "undo the change or use another run_name"
        )
    return Binding(new_run=False, changed={k: (old.get(k), new.get(k)) for k in differing})


def _may_change(key: str, saved: TrainConfig, config: TrainConfig, started: list[str]) -> bool:
    if any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_KEYS):
        return True
    if key == "run_stages":  # the stages trained so far keep their order; later ones may change
        n = min(len(started), len(config.run_stages))
        return config.run_stages[:n] == started[:n]
    parts = key.split(".")
    return parts[0] == "stages" and parts[1] not in started  # a stage's recipe, until it starts


def record_invocation(run: RunDir, binding: Binding, argv: list[str]) -> None:
    """Append this invocation (time, arguments, folder, changed keys) to the run's ``history.jsonl``."""
    entry = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": argv,
        "cwd": os.getcwd(),
        "new_run": binding.new_run,
        "changed": {k: [old, new] for k, (old, new) in binding.changed.items()},
    }
    run.path.mkdir(parents=True, exist_ok=True)
    with open(run.history_file, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, default=str) + "\n")


def is_launch_rank_zero() -> bool:
    """Whether this process is the first of its job, before any trainer exists: launchers say so in the
    environment (torchrun: RANK; Lightning's own launcher: LOCAL_RANK and NODE_RANK of the processes it starts;
    srun: SLURM_PROCID)."""
    if "RANK" in os.environ:
        return os.environ["RANK"] == "0"
    if "LOCAL_RANK" in os.environ or "NODE_RANK" in os.environ:
        return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
    return os.environ.get("SLURM_PROCID", "0") == "0"


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{dotted key: leaf}`` (lists and tuples are leaves, compared as lists)."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): list(data) if isinstance(data, tuple) else data}


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_yaml(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # noqa: BLE001  OmegaConf raises many types; say it in one line
        raise RunBindingError(f"{path} is not a readable config ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RunBindingError(f"{path} is not a config mapping")
    return data
