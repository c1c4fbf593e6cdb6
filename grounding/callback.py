"""``GroundingCallback``: measure grounding while a model trains, and log it to TensorBoard.

Every ``every_n_steps`` optimizer steps and at the end of each stage, the callback runs batched
attend-and-segment on a GCG-format validation set (images, COCO instances JSON, COCO captions JSON with
``labels``), sharded across ranks, gathers the predictions on rank 0 and computes GLaMM's GCG metrics (AP50,
greedy mIoU, mask recall) plus phrase pointing accuracy (is each phrase's attention peak inside the object
it names). Scalars go to TensorBoard under ``grounding/``, a few overlays (the demo's drawing) under
``grounding/overlay_<i>``, and the history to ``runs/<name>/grounding/metrics.json`` and as a plot to
``runs/<name>/grounding/curve.png``. The model is reached
through ``groundable(pl_module)``, a function the wiring passes in that returns a
``grounding.protocol.GroundableModel`` for the stage being trained (its template and image aspect), so this
module never needs to know the model's class. ``grounding.evaluator.GroundingEvaluator`` is the evaluation
itself (predict, then metrics).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image

from grounding.attend import GroundedResponse
from grounding.config import GroundingEvalConfig
from grounding.evaluator import GroundingEvaluator, GroundingSet
from grounding.protocol import GroundableModel

log = logging.getLogger(__name__)


class GroundingCallback(L.Callback):
    """Grounding metrics of the model being trained, every ``config.every_n_steps`` steps and at stage ends."""

    def __init__(
        self,
        config: GroundingEvalConfig,
        data_root: Path,
        out_dir: Path,
        groundable: Callable[[L.LightningModule], GroundableModel],
    ) -> None:
        self.config = config
        self.groundable = groundable
        self.evaluator = GroundingEvaluator(config, data_root)
        self.out_dir = Path(out_dir)
        self._last_step: int | None = None
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        history = self.out_dir / "metrics.json"
        if not self.history and history.is_file():
            self.history = json.loads(history.read_text())  # a resumed run keeps its curve

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        n = self.config.every_n_steps
        step = trainer.global_step
        if n and step and step % n == 0 and step != self._last_step and self._active(pl_module):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active(pl_module) and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    def _active(self, pl_module: L.LightningModule) -> bool:
        stages = self.config.stages
        return stages is None or getattr(pl_module, "stage_name", None) in stages

    # ------------------------------------------------------------------------------------------ evaluate
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any] | None:
        self._last_step = trainer.global_step
        start = time.perf_counter()
        data = self.evaluator.data
        rank, world = trainer.global_rank, trainer.world_size
        was_training = pl_module.training
        pl_module.eval()
        try:
            local = self.evaluator.predict(self.groundable(pl_module), data.gt.eval_ids[rank::world])
        finally:
            pl_module.train(was_training)
        gathered = _gather(local, world)
        if rank != 0:
            return None
        metrics = self.evaluator.metrics(gathered)
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        self._log(trainer, pl_module, data, gathered, metrics)
        return metrics

    def _log(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        data: GroundingSet,
        results: dict[Any, GroundedResponse],
        metrics: dict[str, Any],
    ) -> None:
        from grounding.overlay import draw_overlay

        step = trainer.global_step
        scalars = {
            f"grounding/{k}": float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and v is not None
        }
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            experiment = getattr(logger, "experiment", None)
            if experiment is None or not hasattr(experiment, "add_image"):
                continue
            for i, iid in enumerate(data.gt.eval_ids[: self.config.overlays]):
                r = results[iid]
                panel = draw_overlay(
                    Image.open(data.files[iid]),
                    r.caption,
                    r.phrases,
                    r.points,
                    r.masks,
                    r.maps,
                    view=r.view,
                    display_size=192,
                    image_maps=r.image_maps(self.config.remove_corner) if r.shifted else None,
                )
                experiment.add_image(f"grounding/overlay_{i}", np.asarray(panel), step, dataformats="HWC")
        record = {"stage": getattr(pl_module, "stage_name", None), "step": step, **metrics}
        self.history.append(record)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "metrics.json").write_text(json.dumps(self.history, indent=1))
        from grounding.curve_plot import plot_grounding_curve

        plot_grounding_curve(self.history, self.out_dir / "curve.png")
        log.info(
            "grounding at %s step %d: %s",
            record["stage"],
            step,
            ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)),
        )


def _gather(local: dict[Any, GroundedResponse], world: int) -> dict[Any, GroundedResponse]:
    if world == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return local
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, local)
    merged: dict[Any, GroundedResponse] = {}
    for part in parts:
        merged.update(part)
    return merged
