"""COCO instance segmentation with attend-and-segment: ground truth, result records, segm AP and point accuracy.

As the reference's first release evaluates it (Shengcao-Cao/groundLMM ``aas/instance_seg.py`` and
``aas/eval_instance_seg.py``): every kept noun phrase of the detailed description becomes one detection (or
three with ``--more-masks``: every SAM multimask output, scored by SAM's predicted IoU; masks with no pixel are
dropped) of the category it was matched to (:mod:`grounding.category_match`), written as COCO results; AP is
pycocotools' ``COCOeval(gt, dt, "segm")`` with its default parameters (all categories, 10 IoU thresholds,
area ranges, 100 detections); point accuracy is the fraction of detections whose point lies in the union of
the image's GT masks of the detection's category (a detection of a category without GT there is a miss).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from grounding.coco_io import GroundingInputError, decode_rle, mask_to_rle, read_json, to_rle

__all__ = [
    "COCO_STATS",
    "CocoInstances",
    "InstanceImage",
    "evaluate_instances",
    "instance_records",
    "load_coco_instances",
    "point_accuracy",
    "write_coco_instances",
]

#: Names of ``COCOeval.stats`` for segm, in order.
COCO_STATS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar1", "ar10", "ar100", "ar_small",
              "ar_medium", "ar_large")  # fmt: skip


@dataclass(frozen=True)
class InstanceImage:
    image_id: int
    file_name: str
    height: int
    width: int
    #: Ids of the categories with at least one GT instance in the image, sorted.
    category_ids: tuple[int, ...]


@dataclass(frozen=True)
class CocoInstances:
    """A COCO instances file (``instances_val2017.json``) as the instance evaluation reads it."""

    path: Path
    images: list[InstanceImage]
    #: Category id -> name, sorted by id (the reference sorts categories by id before matching).
    categories: dict[int, str]

    def present_categories(self, image: InstanceImage) -> list[tuple[int, str]]:
        """``(id, name)`` of the categories in ``image``'s ground truth, by id: the candidates of its phrases."""
        return [(c, self.categories[c]) for c in image.category_ids]


def _int(obj: Any, key: str, where: str) -> int:
    if not isinstance(obj, Mapping) or key not in obj:
        raise GroundingInputError(f"{where}: missing required key {key!r}")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise GroundingInputError(f"{where}: {key!r} must be an integer, got {value!r}")
    return value


def load_coco_instances(path: str | Path) -> CocoInstances:
    """Read and check a COCO instances JSON (ids, sizes, categories of every annotation); masks stay encoded."""
    path = Path(path)
    data = read_json(path, "COCO instances")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, Mapping) or not isinstance(data.get(key), list):
            raise GroundingInputError(f"{path}: expected a COCO instances JSON with a list {key!r}")
    categories = {}
    for k, cat in enumerate(data["categories"]):
        where = f"{path}: categories[{k}]"
        if not isinstance(cat.get("name"), str):
            raise GroundingInputError(f"{where}: 'name' must be a string")
        categories[_int(cat, "id", where)] = cat["name"]
    present: dict[int, set[int]] = {}
    entries = {}
    for k, im in enumerate(data["images"]):
        where = f"{path}: images[{k}]"
        iid = _int(im, "id", where)
        if iid in entries:
            raise GroundingInputError(f"{where}: duplicate image id {iid}")
        if not isinstance(im.get("file_name"), str):
            raise GroundingInputError(f"{where}: 'file_name' must be a string")
        entries[iid] = (im["file_name"], _int(im, "height", where), _int(im, "width", where))
        present[iid] = set()
    for k, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{k}]"
        iid, cid = _int(ann, "image_id", where), _int(ann, "category_id", where)
        if iid not in entries:
            raise GroundingInputError(f"{where}: image_id {iid} is not in 'images'")
        if cid not in categories:
            raise GroundingInputError(f"{where}: category_id {cid} is not in 'categories'")
        if "segmentation" not in ann:
            raise GroundingInputError(f"{where}: missing required key 'segmentation'")
        present[iid].add(cid)
    images = [
        InstanceImage(iid, name, h, w, tuple(sorted(present[iid]))) for iid, (name, h, w) in entries.items()
    ]
    return CocoInstances(path=path, images=images, categories=dict(sorted(categories.items())))


def write_coco_instances(
    path: str | Path,
    images: Sequence[Mapping[str, Any]],
    annotations: Sequence[Mapping[str, Any]],
    categories: Sequence[Mapping[str, Any]],
) -> Path:
    """Write a COCO instances JSON; annotations' masks may be boolean arrays (encoded as RLE here) or COCO
    segmentations, and get ``id``, ``area``, ``bbox`` and ``iscrowd`` when missing."""
    from pycocotools import mask as mask_utils

    out = []
    for k, ann in enumerate(annotations):
        ann = dict(ann)
        if isinstance(ann.get("segmentation"), np.ndarray):
            ann["segmentation"] = mask_to_rle(ann["segmentation"])
        coco = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode("ascii")}
        ann.setdefault("id", k + 1)
        ann.setdefault("area", float(mask_utils.area(coco)))
        ann.setdefault("bbox", [float(v) for v in mask_utils.toBbox(coco)])
        ann.setdefault("iscrowd", 0)
        out.append(ann)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"images": list(images), "annotations": out, "categories": list(categories)}
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


def instance_records(
    image_id: int,
    phrase: str,
    category_id: int,
    category_name: str,
    masks: Sequence[Any],
    point: tuple[int, int] | None,
) -> list[dict[str, Any]]:
    """COCO result records of one phrase: one per kept mask (``ScoredMask``-like: ``.mask``, ``.score``) with at
    least one pixel, in the reference's fields (``id`` is left to the writer of the whole file)."""
    records = []
    for kept in masks:
        mask = np.asarray(kept.mask, dtype=bool)
        if not mask.any():
            continue
        record = {
            "image_id": image_id,
            "category_id": int(category_id),
            "category_name": category_name,
            "noun_phrase": phrase,
            "segmentation": mask_to_rle(mask),
            "score": float(kept.score),
            "iscrowd": 0,
            "area": int(mask.sum()),
        }
        if point is not None:
            record["point"] = [int(point[0]), int(point[1])]
        records.append(record)
    return records


def _gt_unions(data: Mapping[str, Any]) -> dict[tuple[int, int], np.ndarray]:
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    unions: dict[tuple[int, int], np.ndarray] = {}
    for ann in data["annotations"]:
        size = sizes[ann["image_id"]]
        mask = decode_rle(to_rle(ann["segmentation"], name="GT segmentation", size=size))
        key = (ann["image_id"], ann["category_id"])
        unions[key] = unions[key] | mask if key in unions else mask
    return unions


def point_accuracy(gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> float | None:
    """The reference's point accuracy over the detections that carry a ``point`` (None if none does)."""
    unions = _gt_unions(gt)
    hits = total = 0
    for det in results:
        if det.get("point") is None:
            continue
        x, y = (int(v) for v in det["point"])
        union = unions.get((det["image_id"], det["category_id"]))
        total += 1
        hits += int(union is not None and 0 <= y < union.shape[0] and 0 <= x < union.shape[1] and union[y, x])
    return hits / total if total else None


def evaluate_instances(gt_file: str | Path, results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """pycocotools segm evaluation of ``results`` (COCO result records) plus point accuracy.

    Returns ``COCO_STATS`` (fractions; 0.0 with no detection, where pycocotools' ``loadRes`` cannot run and
    -1 where COCOeval has no GT of an area range), ``point_accuracy``, ``n_detections`` and ``n_images``.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_data = read_json(gt_file, "COCO instances")
    ids = {im["id"] for im in gt_data["images"]}
    unknown = sorted({r["image_id"] for r in results} - ids)
    if unknown:
        raise GroundingInputError(f"results: image ids not in {gt_file}: {unknown[:5]}")
    out: dict[str, Any] = dict.fromkeys(COCO_STATS, 0.0)
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = gt_data
            gt.createIndex()
            detections = [{k: v for k, v in r.items() if k != "id"} for r in results]
            evaluator = COCOeval(gt, gt.loadRes(detections), "segm")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        out = {name: float(v) for name, v in zip(COCO_STATS, evaluator.stats, strict=True)}
    out["point_accuracy"] = point_accuracy(gt_data, results)
    out["n_detections"] = len(results)
    out["n_images"] = len(ids)
    return out
