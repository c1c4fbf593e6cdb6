"""Run directories and checkpoints: where a run keeps its files, and rebuilding a trained LMM from them.

A run lives in ``runs/<run_name>/``: ``config.yaml`` (the resolved config), ``checkpoints/<stage>/last.ckpt``
per stage, ``tensorboard/<stage>/`` and ``train.log``. No auto-incremented versions: the same run name always
finds the same folder, so a restarted or requeued job picks up its own checkpoints. Checkpoints hold only
the weights a stage trains; ``load_run`` rebuilds the model from the config (frozen weights from their
files or seeds) and replays the stages in order, configuring each and loading its trainable weights.
Checkpoints are read with ``weights_only=True``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lmm.config import TrainConfig, config_from_dict, config_to_dict
from lmm.model import LMM, check_checkpoint_keys

log = logging.getLogger(__name__)


def stage_checkpoint(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "checkpoints" / stage / "last.ckpt"


def read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        # mmap: reading a 7B stage checkpoint for its step count must not pull every tensor into memory.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path} cannot be read ({str(err).splitlines()[0]})") from None


def build_model(config: TrainConfig) -> LMM:
    model = LMM(config.encoder, config.projector, config.llm)
    model.run_config = config_to_dict(config)
    return model


def load_stage_weights(model: LMM, path: Path, stage: str) -> dict[str, Any]:
    """Load a stage's trainable weights into a model already configured for that stage."""
    checkpoint = read_checkpoint(path)
    state = checkpoint["state_dict"]
    check_checkpoint_keys(model, state, stage)
    model.load_state_dict(state, strict=False)
    return checkpoint


def load_run(run_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[LMM, TrainConfig]:
    """Rebuild the trained model of a run directory (all stages that have a checkpoint), in eval mode."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    config = config_from_dict(OmegaConf.to_container(OmegaConf.load(config_path), resolve=True))
    model = build_model(config)
    loaded = []
    for name in config.run_stages:
        path = stage_checkpoint(run_dir, name)
        model.configure_stage(name, config.stages[name])
        if not path.is_file():
            break
        load_stage_weights(model, path, name)
        loaded.append(name)
    if not loaded:
        raise FileNotFoundError(f"{run_dir} has no stage checkpoint under checkpoints/<stage>/last.ckpt")
    log.info("loaded run %s (stages %s)", run_dir, ", ".join(loaded))
    return model.to(map_location).eval(), config
