"""Building a run's parts from its config: the model, and the data module of one stage."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

from datamodules.shards import ShardDataModule
from lmm.batch import collate
from lmm.config import TrainConfig
from lmm.model import LMM


def build_model(config: TrainConfig, init_dir: Path | None = None) -> LMM:
    """The LMM a config describes, frozen weights loaded from their files or rebuilt from their seeds, and the
    projector from ``init_dir`` (the run's ``init/``) when the run starts from a llava-hf folder."""
    model = LMM(config.encoder, config.projector, config.llm)
    if config.init.llava_hf is not None:
        from safetensors.torch import load_file

        from lmm.llava_hf_import import PROJECTOR_FILE

        if init_dir is None:
            raise ValueError("init.llava_hf is set: build_model needs the run's init folder")
        path = init_dir / PROJECTOR_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run train.py to unpack init.llava_hf first")
        model.projector.load_state_dict(load_file(str(path)), strict=True)
    model.run_config = config
    return model


def with_initial_weights(config: TrainConfig, init_dir: Path) -> TrainConfig:
    """``config`` with ``init.llava_hf`` unpacked into ``init_dir`` (the run's ``init/``, once) and its encoder,
    projector and llm sections naming the unpacked weights; unchanged without ``init.llava_hf``."""
    if config.init.llava_hf is None:
        return config
    from lmm.llava_hf_import import load_llava_hf_into_lmm

    parts = load_llava_hf_into_lmm(config.init.llava_hf, init_dir)
    return dataclasses.replace(config, encoder=parts.encoder, projector=parts.projector, llm=parts.llm)


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
        group_by_length=settings.group_by_length,
    )
