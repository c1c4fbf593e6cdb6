"""Building a run's parts from its config: the model, and the data module of one stage."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from datamodules.shards import ShardDataModule
from lmm.batch import collate
from lmm.config import TrainConfig
from lmm.model import LMM


def build_model(config: TrainConfig) -> LMM:
    """The LMM a config describes, frozen weights loaded from their files or rebuilt from their seeds."""
    model = LMM(config.encoder, config.projector, config.llm)
    model.run_config = config
    return model


def stage_data_dir(config: TrainConfig, stage: str) -> Path:
    """A stage's shard folder: ``stages.<stage>.data``, relative to ``data.root`` unless absolute."""
    data = Path(config.stages[stage].data)
    return data if data.is_absolute() else Path(config.data.root) / data


def build_datamodule(
    config: TrainConfig, model: LMM, stage: str, sample_log: Path | None = None
) -> ShardDataModule:
    """The stage's training stream: its shards encoded with the stage's template by ``model``'s tokenizer,
    laid out for ``trainer.devices x trainer.num_nodes`` ranks; ``sample_log``: where to record sample keys."""
    settings = config.stages[stage]
    return ShardDataModule(
        stage_data_dir(config, stage),
        model.sample_encoder(settings),
        partial(collate, pad_token_id=model.llm.tokenizer.pad_token_id),
        settings.micro_batch_size,
        num_workers=config.data.num_workers,
        seed=config.seed,
        shuffle_buffer=config.data.shuffle_buffer,
        world_size=config.trainer.ranks,
        sample_log=sample_log,
        decode_min_side=config.data.decode_min_side,
    )
