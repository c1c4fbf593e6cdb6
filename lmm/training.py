"""Training one stage of a run: its data stream, its Lightning Trainer, resume, and its final checkpoint.

Each stage gets its own Trainer, TensorBoard logger (``tensorboard/<stage>``) and checkpoint folder
(``checkpoints/<stage>``). A stage resumes from the newest of ``last.ckpt`` and a SLURM requeue checkpoint; a
stage whose checkpoint already holds its last step is loaded and skipped. Checkpoints are written atomically
(``AtomicCheckpointIO``) and hold only the weights the stage trains.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment

from datamodules.shards import SkippedSamplesLogger
from lmm.build import build_datamodule
from lmm.callbacks import RequeueAtStep, SaveRecord
from lmm.checkpoint_io import AtomicCheckpointIO, load_stage_weights, read_checkpoint
from lmm.config import TrainConfig
from lmm.model import LMM
from lmm.progress import StageProgress
from lmm.run_dir import RunDir
from lmm.shared_prefix import strategy_allows_sharing
from lmm.slurm import Requeued, RequeueSignal
from lmm.strategies import build_strategy

log = logging.getLogger(__name__)


def grounding_callbacks(config: TrainConfig) -> list[L.Callback]:
    """The training-time grounding evaluation (``grounding:``), when enabled."""
    if not config.grounding.enabled:
        return []
    from grounding.callback import GroundingCallback
    from lmm.groundable import LMMGrounding

    return [
        GroundingCallback(
            config.grounding,
            config.data.root,
            RunDir(config.run_dir).grounding_dir,
            groundable=LMMGrounding.for_current_stage,
        )
    ]


def run_stage(
    config: TrainConfig, model: LMM, name: str, requeue: RequeueSignal | None = None
) -> dict[str, Any]:
    """Train stage ``name`` of ``config`` on ``model`` (or load it, when already finished); returns its summary.

    Raises ``Requeued`` when the stage stopped to be requeued by SLURM.
    """
    run = RunDir(config.run_dir)
    stage = config.stages[name]
    model.configure_stage(name, stage)
    sharded = not strategy_allows_sharing(str(config.trainer.strategy))
    model.share_prefix = config.trainer.share_prefix and not sharded
    model.read_positions_only = config.trainer.read_positions_only and not sharded
    accumulate = stage.global_batch_size // (stage.micro_batch_size * config.trainer.ranks)
    datamodule = build_datamodule(
        config, model, name, sample_log=run.samples_dir(name) if config.data.record_samples else None
    )
    # The stream gives every rank the same known number of micro-batches per epoch.
    max_steps = stage.max_steps or math.ceil(stage.epochs * datamodule.batches_per_epoch / accumulate)

    resume = run.newest_checkpoint(name)
    if resume is not None:
        done_steps = read_checkpoint(resume).get("global_step", 0)
        if done_steps >= max_steps:
            log.info("stage %s already finished (%d steps): loading %s", name, done_steps, resume)
            load_stage_weights(model, resume, name)
            return {"stage": name, "skipped": True, "steps": done_steps}
        log.info("resuming stage %s from %s (step %d of %d)", name, resume, done_steps, max_steps)
    log.info(
        "stage %s: %d optimizer steps, global batch %d = %d micro x %d accumulation x %d ranks, data %s (%d samples)",
        name,
        max_steps,
        stage.global_batch_size,
        stage.micro_batch_size,
        accumulate,
        config.trainer.ranks,
        datamodule.index.path,
        datamodule.index.num_samples,
    )

    folder = run.checkpoint_dir(name)
    plugins: list = [] if "deepspeed" in str(config.trainer.strategy) else [AtomicCheckpointIO()]
    cluster_callbacks: list[L.Callback] = []
    if SLURMEnvironment.detect():
        # Lightning's SLURM environment (ranks, nodes, master address), with its own requeue handler off:
        # that one saves inside the signal handler, mid-step; ours saves at the next optimizer step.
        plugins.append(SLURMEnvironment(auto_requeue=False))
        if config.trainer.slurm_requeue and requeue is not None:
            cluster_callbacks.append(RequeueAtStep(requeue, folder))
    saves = SaveRecord()
    trainer = L.Trainer(
        accelerator=config.trainer.accelerator,
        devices=config.trainer.devices,
        num_nodes=config.trainer.num_nodes,
        strategy=build_strategy(config.trainer, model),
        precision=config.trainer.precision,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=config.trainer.gradient_clip_val,
        log_every_n_steps=config.trainer.log_every_n_steps,
        deterministic=config.trainer.deterministic,
        enable_progress_bar=False,  # StageProgress: steps of the stage, in a terminal and in a log
        default_root_dir=folder,  # where Lightning looks for hpc_ckpt_*.ckpt
        plugins=plugins,
        logger=TensorBoardLogger(
            save_dir=run.path, name="tensorboard", version=name, default_hp_metric=False
        ),
        callbacks=[
            ModelCheckpoint(
                dirpath=folder,
                filename="step-{step}",
                save_last=True,
                save_top_k=0,
                every_n_train_steps=stage.checkpoint_every_n_steps,
            ),
            saves,
            StageProgress(
                name,
                max_steps,
                config.trainer.progress_every_n_steps,
                bar=config.trainer.progress_bar and StageProgress.terminal(),
            ),
            LearningRateMonitor(logging_interval="step"),
            SkippedSamplesLogger(),
            *cluster_callbacks,
            *grounding_callbacks(config),
        ],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    if any(getattr(cb, "requeued", False) for cb in cluster_callbacks):
        raise Requeued(f"stage {name} saved a requeue checkpoint at step {trainer.global_step}")
    # ModelCheckpoint skips its train-end save_last when a periodic save already happened, so last.ckpt is
    # written here unless a save fell on the final step itself (at 7B scale a second write costs minutes).
    # The save record decides, not the file: every rank must reach the same answer (the save is a collective
    # under FSDP/DeepSpeed) even where nodes do not share a disk.
    if saves.step != trainer.global_step:
        trainer.save_checkpoint(run.last_checkpoint(name), weights_only=False)
    if trainer.is_global_zero:
        for old in run.requeue_checkpoints(name):  # superseded by last.ckpt
            old.unlink(missing_ok=True)
    loss = trainer.callback_metrics.get("train/loss")
    summary = {
        "stage": name,
        "steps": trainer.global_step,
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss": None if loss is None else round(float(loss), 4),
    }
    log.info("stage %s done: %s", name, summary)
    return summary
