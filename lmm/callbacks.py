"""The Lightning callbacks of a training stage that are the project's own (beyond Lightning's stock ones).

``RequeueAtStep`` saves a requeue checkpoint at a step boundary after SLURM's warning signal
(``lmm.slurm``); ``SaveRecord`` remembers the step of the most recent checkpoint save, so the stage end can
tell whether the final step is already on disk from a record every rank keeps alike.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L

from lmm.slurm import RequeueSignal, requeue_job, slurm_job_id

log = logging.getLogger(__name__)


class SaveRecord(L.Callback):
    """The global step of the most recent checkpoint save of this trainer (-1: none yet).

    ``on_save_checkpoint`` runs on every rank for every save (periodic, last, requeue), so the record is the
    same on all ranks, even where they do not share a disk; the file on disk could not tell them that.
    """

    def __init__(self) -> None:
        self.step = -1

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.step = trainer.global_step


class RequeueAtStep(L.Callback):
    """Saves ``hpc_ckpt_<n>.ckpt`` in ``folder`` and runs ``scontrol requeue`` at the first optimizer step
    after ``flag`` was raised; every rank saves at the same step."""

    def __init__(self, flag: RequeueSignal, folder: Path) -> None:
        self.flag = flag
        self.folder = Path(folder)
        self.requeued = False
        self.step_at_start = -1
        self.first_step_logged = False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, batch_idx: int
    ) -> None:
        self.step_at_start = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step_at_start:
            return  # inside a gradient accumulation window
        if not self.first_step_logged:
            self.first_step_logged = True
            log.info(
                "first optimizer step of this process done: step %d at %.3f", trainer.global_step, time.time()
            )
        pending = self.flag.received_at is not None
        if trainer.world_size > 1:  # every rank must save at the same step
            pending = trainer.strategy.reduce_boolean_decision(pending, all=False)
        if not pending or self.requeued:
            return
        old = sorted(self.folder.glob("hpc_ckpt_*.ckpt"))
        number = 1 + max((int(p.stem.rsplit("_", 1)[1]) for p in old), default=0)
        path = self.folder / f"hpc_ckpt_{number}.ckpt"
        trainer.save_checkpoint(path)
        for logger in trainer.loggers:
            logger.save()
        self.requeued = True
        trainer.should_stop = True
        for checkpoint in trainer.checkpoint_callbacks:  # no second copy as last.ckpt at train end
            checkpoint.save_last = False
        if not trainer.is_global_zero:
            return
        for p in old:
            p.unlink(missing_ok=True)
        job = slurm_job_id()
        log.info("saved %s at step %d; requeueing SLURM job %s", path, trainer.global_step, job)
        requeue_job(job)
