"""A run directory: where a run keeps its files, and rebuilding the trained model from them.

A run lives in ``runs/<run_name>/`` (no auto-incremented versions: the same name always finds the same
folder, so a restarted or requeued job picks up its own checkpoints):

    config.yaml                       the resolved config of the run
    checkpoints/<stage>/last.ckpt     trainable weights + optimizer and data state, per stage
    checkpoints/<stage>/hpc_ckpt_<n>.ckpt   a SLURM requeue checkpoint (superseded by last.ckpt at stage end)
    tensorboard/<stage>/              TensorBoard logs
    init/                             initial weights unpacked from init.llava_hf (clip/, llm/, projector)
    tokenizer/                        the run's copy of llm.tokenizer, for a LLM built from scratch
    grounding/metrics.json            the grounding evaluation's history
    samples/<stage>/rank<r>.jsonl     consumed sample keys (data.record_samples)
    history.jsonl                     one line per invocation of train.py: when, how, which keys changed
    train.log, qa_eval.json, summary.json

``load_run`` rebuilds the model from the config (frozen weights from their files or seeds) and replays the
stages in order, configuring each and loading its trainable weights (``weights_only=True``); a LLM built from
scratch is built over the run's own tokenizer copy (``lmm.run_tokenizer``), not the data folder's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lmm.config import TrainConfig

if TYPE_CHECKING:
    import torch

    from lmm.model import LMM

log = logging.getLogger(__name__)


class RunDir:
    """The file layout of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def log_file(self) -> Path:
        return self.path / "train.log"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def history_file(self) -> Path:
        return self.path / "history.jsonl"

    @property
    def qa_file(self) -> Path:
        return self.path / "qa_eval.json"

    @property
    def grounding_dir(self) -> Path:
        return self.path / "grounding"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    @property
    def init_dir(self) -> Path:
        """Initial weights unpacked from outside the project (``init.llava_hf``)."""
        return self.path / "init"

    @property
    def tokenizer_dir(self) -> Path:
        """The run's copy of the tokenizer its LLM was trained over (``lmm.run_tokenizer``)."""
        return self.path / "tokenizer"

    def checkpoint_dir(self, stage: str) -> Path:
        return self.path / "checkpoints" / stage

    def last_checkpoint(self, stage: str) -> Path:
        return self.checkpoint_dir(stage) / "last.ckpt"

    def requeue_checkpoints(self, stage: str) -> list[Path]:
        return sorted(self.checkpoint_dir(stage).glob("hpc_ckpt_*.ckpt"))

    def newest_checkpoint(self, stage: str) -> Path | None:
        """The most recently written of ``last.ckpt`` and the requeue checkpoints: where a stage resumes."""
        candidates = [
            p for p in (self.last_checkpoint(stage), *self.requeue_checkpoints(stage)) if p.is_file()
        ]
        return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None

    def samples_dir(self, stage: str) -> Path:
        return self.path / "samples" / stage

    def read_config(self) -> TrainConfig:
        """The run's config; relative paths (a run written before they were resolved at train time) are made
        absolute against the folder that run was trained from, so the result does not depend on the cwd."""
        from lmm.config_loading import read_config_file
        from lmm.run_paths import resolve_config_paths, training_folder

        if not self.config_file.is_file():
            raise FileNotFoundError(f"{self.path} is not a run directory (no config.yaml)")
        config = read_config_file(self.config_file)
        if not Path(config.runs_dir).is_absolute():
            config = resolve_config_paths(config, training_folder(self.path, config.runs_dir))
        return config

    def write_config(self, config: TrainConfig) -> None:
        """Replace ``config.yaml`` atomically: a reader never sees half a file."""
        from lmm.config_loading import save_config

        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.config_file.with_name(f".config.yaml.tmp{os.getpid()}")
        try:
            save_config(config, tmp)
            os.replace(tmp, self.config_file)
        finally:
            tmp.unlink(missing_ok=True)


def owns_tokenizer(config: TrainConfig) -> bool:
    """Whether the run's vocabulary comes from a data folder, not from a released LLM's own files."""
    return config.llm.path is None and config.llm.tokenizer is not None


def with_run_tokenizer(config: TrainConfig, run: RunDir) -> TrainConfig:
    """``config`` building its LLM over the run's own tokenizer copy, where the run has one."""
    if not owns_tokenizer(config) or not run.tokenizer_dir.is_dir():
        return config
    return dataclasses.replace(config, llm=dataclasses.replace(config.llm, tokenizer=str(run.tokenizer_dir)))


def load_trained_stages(config: TrainConfig, run: RunDir, stages: list[str]) -> tuple[LMM, list[str]]:
    """A model built from ``config`` with the trained weights of ``stages`` (in order, up to the first without
    ``last.ckpt``) loaded, each stage configured before its weights go in; returns it and the stages loaded."""
    from lmm.build import build_model
    from lmm.checkpoint_io import load_stage_weights

    model = build_model(with_run_tokenizer(config, run), run.init_dir)
    loaded = []
    for name in stages:
        path = run.last_checkpoint(name)
        model.configure_stage(name, config.stages[name], quiet=True)
        if not path.is_file():
            break
        load_stage_weights(model, path, name)
        loaded.append(name)
    return model, loaded


def load_run(run_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[LMM, TrainConfig]:
    """Rebuild the trained model of a run directory (all stages that have a checkpoint), in eval mode."""
    run = RunDir(run_dir)
    config = run.read_config()
    model, loaded = load_trained_stages(config, run, config.run_stages)
    if not loaded:
        raise FileNotFoundError(f"{run.path} has no stage checkpoint under checkpoints/<stage>/last.ckpt")
    log.info("loaded run %s (stages %s)", run.path, ", ".join(loaded))
    return model.to(map_location).eval(), config
