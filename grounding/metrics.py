"""Grounding metrics as torchmetrics ``Metric`` classes that stay exact under DDP, with GLaMM's and PNG's quirks.
What is here: GCG mask recall, greedy mIoU and class-agnostic AP50 exactly as GLaMM's GranD-f evaluation
computes them (mbzuai-oryx/groundingLMM, eval/gcg/evaluate.py and eval/utils.py), pointing accuracy (this
project's definition), referring-segmentation gIoU/cIoU as GLaMM's eval/referring_seg/infer_and_evaluate.py
(LISA's formulas), and panoptic narrative grounding average recall as BCV-Uniandes/PNG
baseline/utils/meters.py ``average_accuracy``. Each metric has a pure-numpy core function (used by the tests
and usable on its own) and a ``Metric`` wrapper whose states are either tensors reduced with ``"sum"`` or list
states that concatenate, so merging ranks that saw different numbers of images gives the same result as one
process that saw them all. Sum states cannot see a repeated image: a ``DistributedSampler`` that pads the
last batch with duplicates (Lightning's default) counts those images twice; :class:`MaskAP50` drops exact
duplicates by image id. Masks come in as boolean ``HxW`` numpy/torch arrays or COCO RLE dicts.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor
from torchmetrics import Metric

from grounding.coco_io import (
    RLE,
    GroundingInputError,
    ImageId,
    MaskLike,
    decode_rle,
    intersection_union,
    iou_matrix,
    to_rle,
    to_rles,
)
from grounding.text_similarity import SimilarityFn

__all__ = [
    "PNG_GROUPS",
    "GCGMaskRecall",
    "GreedyMIoU",
    "MaskAP50",
    "PhrasePointingAccuracy",
    "PNGAverageRecall",
    "PointingAccuracy",
    "ReferringIoU",
    "coco_ap50",
    "gcg_recall_matches",
    "greedy_iou_pairs",
    "greedy_miou",
    "png_average_recall",
    "png_thresholds",
]

# --------------------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------------------


def greedy_iou_pairs(iou: np.ndarray) -> list[tuple[int, int, float]]:
    """GLaMM's greedy one-to-one pairing (eval/gcg/evaluate.py ``compute_miou``).

    Repeatedly take the largest remaining entry, record ``(row, col, iou)``, delete its row and column, until
    the largest remaining entry is 0 or nothing remains. Ties go to the first entry in row-major order
    (``np.argmax``), so the orientation of the matrix matters: GLaMM's mIoU passes prediction rows x GT columns.
    """
    m = np.array(iou, dtype=np.float64, copy=True)
    if m.ndim != 2:
        raise GroundingInputError(f"iou: expected a 2-D matrix, got shape {m.shape}")
    rows = list(range(m.shape[0]))
    cols = list(range(m.shape[1]))
    pairs: list[tuple[int, int, float]] = []
    while m.size > 0 and np.max(m) > 0:
        r, c = np.unravel_index(np.argmax(m, axis=None), m.shape)
        pairs.append((rows[r], cols[c], float(m[r, c])))
        m = np.delete(np.delete(m, r, axis=0), c, axis=1)
        del rows[r]
        del cols[c]
    return pairs


def greedy_miou(iou_pred_gt: np.ndarray) -> float:
    """Per-image mIoU as GLaMM: mean of the greedily paired IoUs (``pred x GT`` matrix), 0.0 when none pair.

    Unpaired predictions and unpaired GT masks do not count as zeros (GLaMM's definition).
    """
    pairs = greedy_iou_pairs(iou_pred_gt)
    return float(np.mean([p[2] for p in pairs])) if pairs else 0.0


def gcg_recall_matches(
    iou_gt_pred: np.ndarray, sim_gt_pred: np.ndarray, iou_threshold: float = 0.5, text_threshold: float = 0.5
) -> int:
    """Number of GT phrases GLaMM counts as recalled in one image (eval/gcg/evaluate.py ``find_best_matches``).

    ``iou_gt_pred`` is GT masks x predicted masks; ``sim_gt_pred`` is GT labels x predicted phrases. Loop: take
    the highest remaining IoU (``np.argmax``: ties to the lowest GT index, then the lowest prediction index);
    stop at the first pair with ``IoU < iou_threshold`` or ``similarity < text_threshold`` (so IoU exactly 0.5
    counts); otherwise count it and zero its row and column in both matrices. Quirk kept: when the chosen pair
    has no phrase (more masks than phrases on either side) GLaMM's ``text_sims[idx]`` raises ``IndexError``,
    which its caller catches and prints, so that image contributes no matches at all; this returns 0 then.
    """
    if iou_threshold <= 0 or text_threshold <= 0:
        raise GroundingInputError("thresholds: GLaMM's loop only terminates for positive thresholds")
    ious = np.array(iou_gt_pred, dtype=np.float64, copy=True)
    sims = np.array(sim_gt_pred, dtype=np.float64, copy=True)
    if ious.ndim != 2 or sims.ndim != 2:
        raise GroundingInputError(
            f"recall: expected 2-D IoU and similarity matrices, got shapes {ious.shape} and {sims.shape}"
        )
    matched = 0
    while ious.size > 0:
        i, j = np.unravel_index(np.argmax(ious), ious.shape)
        if ious[i, j] < iou_threshold:
            break
        if i >= sims.shape[0] or j >= sims.shape[1]:
            return 0  # GLaMM: IndexError inside find_best_matches, caught per image -> no true positives
        if sims[i, j] < text_threshold:
            break
        matched += 1
        ious[i, :] = 0
        ious[:, j] = 0
        sims[i, :] = 0
        sims[:, j] = 0
    return matched


def png_thresholds() -> np.ndarray:
    """PNG's IoU grid (baseline/utils/meters.py): ``np.arange(0, 1, 0.00001)``, 100000 points, 1.0 excluded."""
    return np.arange(0, 1, 0.00001)


def _png_histogram(ious: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``hist[k]`` = number of IoUs that pass exactly the first ``k`` thresholds (``iou >= t_i`` for i < k)."""
    k = np.searchsorted(thresholds, np.asarray(ious, dtype=np.float64), side="right")
    return np.bincount(k, minlength=len(thresholds) + 1).astype(np.int64)


def _png_aa_from_histogram(hist: np.ndarray, thresholds: np.ndarray) -> float:
    """PNG's ``average_accuracy`` from a pass-count histogram, term by term in PNG's order.

    ``accuracy[i] = #(iou >= t_i) / n``; ``AA = sum_{i < N-1} |t_{i+1} - t_i| * accuracy[i]`` (a left Riemann sum
    that never uses the last threshold, so a perfect score is 0.99999), accumulated left to right.
    """
    hist = np.asarray(hist, dtype=np.int64)
    n = int(hist.sum())
    if n == 0:
        return float("nan")  # PNG divides by len(ious) == 0
    passing = n - np.cumsum(hist)[: len(thresholds)]  # passing[i] = #(k > i) = #(iou >= t_i)
    accuracy = passing / n
    terms = np.abs(thresholds[1:] - thresholds[:-1]) * accuracy[:-1]
    return float(np.add.accumulate(terms)[-1]) if len(terms) else 0.0


def png_average_recall(ious: Sequence[float] | np.ndarray) -> float:
    """PNG average recall of a list of per-phrase IoUs (NaN for an empty list, as PNG's 0/0)."""
    t = png_thresholds()
    return _png_aa_from_histogram(_png_histogram(np.asarray(ious, dtype=np.float64), t), t)


def coco_ap50(images: Sequence[dict[str, Any]]) -> float:
    """Class-agnostic mask AP at IoU 0.5 with pycocotools, exactly GLaMM's AP (eval/gcg/evaluate.py).

    ``images``: ``{"id", "size": [h, w], "gt": [RLE], "crowd": [bool], "dt": [RLE]}`` with unique ids of one
    type. Every mask is category 1, every prediction has score 1.0; ``COCOeval(..., "segm")`` with
    ``params.catIds = [1]`` and ``stats[1]``. Because all scores tie, order matters: COCOeval keeps the file
    order within an image (stable mergesort) and walks images in sorted-id order (``params.imgIds =
    sorted(getImgIds())``); only the first 100 predictions of an image count (``maxDets``). Returns 0.0 when
    there is no prediction (GLaMM's ``loadRes`` would fail) or no GT (COCOeval's -1).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = [im["id"] for im in images]
    if len({type(i) for i in ids}) > 1:
        raise GroundingInputError("AP50: image ids must all be int or all be str (pycocotools sorts them)")
    gt_anns: list[dict[str, Any]] = []
    dets: list[dict[str, Any]] = []
    for im in images:
        for rle, crowd in zip(im["gt"], im["crowd"], strict=True):
            coco_rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
            gt_anns.append(
                {
                    "id": len(gt_anns) + 1,
                    "image_id": im["id"],
                    "category_id": 1,
                    "segmentation": rle,
                    "area": float(mask_utils.area(coco_rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(coco_rle)],
                    "iscrowd": int(bool(crowd)),
                }
            )
        dets.extend(
            {"image_id": im["id"], "category_id": 1, "segmentation": rle, "score": 1.0} for rle in im["dt"]
        )
    if not dets or not gt_anns:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": [{"id": im["id"], "height": im["size"][0], "width": im["size"][1]} for im in images],
            "annotations": gt_anns,
            "categories": [{"id": 1, "name": "object"}],
        }
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "segm")
        ev.params.catIds = [1]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap = float(ev.stats[1])
    return max(ap, 0.0)


# --------------------------------------------------------------------------------------------------------------
# Helpers for metric states
# --------------------------------------------------------------------------------------------------------------


def _masks(masks: Any, name: str) -> list[RLE]:
    return to_rles(masks, name=name)


def _phrases(phrases: Any, name: str) -> list[str]:
    if (
        isinstance(phrases, str)
        or not isinstance(phrases, Sequence)
        or not all(isinstance(p, str) for p in phrases)
    ):
        raise GroundingInputError(f"{name}: expected a list of strings")
    return list(phrases)


_SEPARATOR = -1.0


def _encode_record(obj: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A JSON record as a 1-D float tensor of its UTF-8 bytes followed by a -1 separator.

    Float (the metric's dtype) rather than uint8 because torchmetrics fills an empty list state with an empty
    tensor of ``self.dtype`` before ``all_gather``; every rank must gather the same dtype.
    """
    raw = np.frombuffer(json.dumps(obj, separators=(",", ":")).encode("utf-8"), dtype=np.uint8)
    out = torch.empty(raw.size + 1, dtype=dtype, device=device)
    out[:-1] = torch.from_numpy(raw.astype(np.float32))
    out[-1] = _SEPARATOR
    return out


def _decode_records(state: Tensor | list[Tensor]) -> list[Any]:
    if isinstance(state, list):
        if not state:
            return []
        state = torch.cat([s.reshape(-1) for s in state])
    values = state.detach().to("cpu", torch.float64).numpy()
    if values.size == 0:
        return []
    ends = np.flatnonzero(values == _SEPARATOR)
    records = []
    start = 0
    for end in ends:
        records.append(json.loads(values[start:end].astype(np.uint8).tobytes().decode("utf-8")))
        start = end + 1
    return records


def _json_id(image_id: Any) -> ImageId:
    if isinstance(image_id, (np.integer, torch.Tensor)):
        image_id = int(image_id)
    if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
        raise GroundingInputError(f"image_id: expected an int or a str, got {type(image_id).__name__}")
    return image_id


def _point_in_mask(point: Sequence[float] | None, rle: RLE, where: str) -> bool:
    """Whether an ``(x, y)`` point (pixels, floored; None = no point) lies inside a GT mask."""
    if point is None:
        return False
    if len(point) != 2:
        raise GroundingInputError(f"{where}: expected (x, y), got {point!r}")
    x, y = math.floor(float(point[0])), math.floor(float(point[1]))
    h, w = rle["size"]
    return bool(0 <= x < w and 0 <= y < h and decode_rle(rle)[y, x])


def _similarities(
    similarity: SimilarityFn | None,
    gt_phrases: list[str],
    pred_phrases: list[str],
    matrix: np.ndarray | Tensor | None,
    what: str,
) -> np.ndarray:
    """The (GT phrases x predicted phrases) similarity matrix: given, computed, or zeros when one side is empty."""
    if matrix is not None:
        sims = np.asarray(matrix.detach().cpu() if isinstance(matrix, Tensor) else matrix, dtype=np.float64)
    elif not gt_phrases or not pred_phrases:
        sims = np.zeros((len(gt_phrases), len(pred_phrases)))
    elif similarity is None:
        raise GroundingInputError(f"{what}: no similarity model given and no similarity_matrix passed")
    else:
        sims = np.asarray(similarity(gt_phrases, pred_phrases), dtype=np.float64)
    if sims.shape != (len(gt_phrases), len(pred_phrases)):
        raise GroundingInputError(
            f"similarity_matrix: expected shape {(len(gt_phrases), len(pred_phrases))}, got {sims.shape}"
        )
    return sims


class _Base(Metric):
    is_differentiable = False
    higher_is_better = True
    full_state_update = False


# --------------------------------------------------------------------------------------------------------------
# GCG metrics
# --------------------------------------------------------------------------------------------------------------


class GreedyMIoU(_Base):
    """GLaMM's GCG mIoU: per image the greedy-paired mean IoU (0 if nothing pairs), then the mean over images.

    States: ``iou_sum`` (float64, sum) and ``n_images`` (sum). Call :meth:`update` once per image, including
    images without predictions (they score 0, as in GLaMM).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("iou_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_images", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(
        self,
        pred_masks: Sequence[MaskLike] | Tensor | np.ndarray,
        gt_masks: Sequence[MaskLike] | Tensor | np.ndarray,
    ) -> None:
        """Add one image: its predicted masks and its GT masks (any order; GLaMM pairs prediction rows x GT columns)."""
        pred = _masks(pred_masks, "pred_masks")
        gt = _masks(gt_masks, "gt_masks")
        value = greedy_miou(iou_matrix(pred, gt, what="GreedyMIoU.update"))
        self.iou_sum += torch.tensor(value, dtype=torch.float64, device=self.iou_sum.device)
        self.n_images += 1

    def compute(self) -> Tensor:
        """Mean over images (0.0 for no images, as GLaMM)."""
        if int(self.n_images) == 0:
            return torch.tensor(0.0, dtype=torch.float64)
        return self.iou_sum / self.n_images


class GCGMaskRecall(_Base):
    """GLaMM's GCG mask recall: matched GT phrases / GT phrases, pooled over the data set.

    Args:
        similarity: phrase similarity ``(gt_phrases, pred_phrases) -> matrix``, e.g.
            :class:`grounding.text_similarity.PhraseSimilarity` (kept as a plain attribute, never a submodule).
            May be None if every :meth:`update` passes ``similarity_matrix``.
        iou_threshold: GLaMM 0.5 (a pair passes with IoU >= threshold).
        text_threshold: GLaMM 0.5 (a pair passes with similarity >= threshold).

    States: ``matched`` and ``total`` (int64, sum). ``total`` adds the number of GT *labels* (GLaMM:
    ``actual_positives += len(gt_labels)``), not of GT masks.
    """

    def __init__(
        self,
        similarity: SimilarityFn | None = None,
        iou_threshold: float = 0.5,
        text_threshold: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.similarity = similarity
        self.iou_threshold = float(iou_threshold)
        self.text_threshold = float(text_threshold)
        self.add_state("matched", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(
        self,
        gt_masks: Sequence[MaskLike] | Tensor | np.ndarray,
        pred_masks: Sequence[MaskLike] | Tensor | np.ndarray,
        gt_phrases: Sequence[str],
        pred_phrases: Sequence[str],
        similarity_matrix: np.ndarray | Tensor | None = None,
    ) -> None:
        """Add one image. ``similarity_matrix`` (GT phrases x predicted phrases) overrides ``self.similarity``."""
        gt = _masks(gt_masks, "gt_masks")
        pred = _masks(pred_masks, "pred_masks")
        gt_p = _phrases(gt_phrases, "gt_phrases")
        pred_p = _phrases(pred_phrases, "pred_phrases")
        ious = iou_matrix(gt, pred, what="GCGMaskRecall.update")
        sims = _similarities(self.similarity, gt_p, pred_p, similarity_matrix, "GCGMaskRecall")
        self.matched += gcg_recall_matches(ious, sims, self.iou_threshold, self.text_threshold)
        self.total += len(gt_p)

    def compute(self) -> Tensor:
        """Pooled recall (0.0 when there are no GT phrases, as GLaMM)."""
        if int(self.total) == 0:
            return torch.tensor(0.0, dtype=torch.float64)
        return self.matched.to(torch.float64) / self.total.to(torch.float64)


class MaskAP50(_Base):
    """GLaMM's class-agnostic mask AP50 via pycocotools (see :func:`coco_ap50`).

    The state is a list of per-image records (image id, GT RLEs, crowd flags, predicted RLEs in order) packed
    as float tensors, concatenated across ranks; AP is computed once at the end on all images, sorted by id as
    COCOeval does, so the result does not depend on update or rank order. An image id seen twice with
    identical content (e.g. a ``DistributedSampler`` padding duplicate) counts once; with different content it
    is an error.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("records", default=[], dist_reduce_fx="cat")

    def update(
        self,
        image_id: ImageId,
        gt_masks: Sequence[MaskLike] | Tensor | np.ndarray,
        pred_masks: Sequence[MaskLike] | Tensor | np.ndarray,
        gt_iscrowd: Sequence[bool] | None = None,
    ) -> None:
        """Add one image: its GT masks (category 1) and its predicted masks in the model's phrase order."""
        iid = _json_id(image_id)
        gt = _masks(gt_masks, "gt_masks")
        dt = _masks(pred_masks, "pred_masks")
        sizes = {tuple(r["size"]) for r in gt + dt}
        if len(sizes) > 1:
            raise GroundingInputError(
                f"MaskAP50.update: image {iid!r} has masks of different sizes {sorted(sizes)}"
            )
        crowd = [False] * len(gt) if gt_iscrowd is None else [bool(c) for c in gt_iscrowd]
        if len(crowd) != len(gt):
            raise GroundingInputError(f"gt_iscrowd: expected {len(gt)} flags, got {len(crowd)}")
        size = list(next(iter(sizes))) if sizes else [0, 0]
        rec = {
            "id": iid,
            "size": size,
            "gt": [r["counts"] for r in gt],
            "crowd": crowd,
            "dt": [r["counts"] for r in dt],
        }
        self.records.append(_encode_record(rec, self.dtype, self.device))

    def compute(self) -> Tensor:
        """AP at IoU 0.5 (COCOeval ``stats[1]``), float64."""
        by_id: dict[Any, dict[str, Any]] = {}
        for rec in _decode_records(self.records):
            key = (type(rec["id"]).__name__, rec["id"])
            if key in by_id:
                if by_id[key] != rec:
                    raise GroundingInputError(
                        f"MaskAP50: image {rec['id']!r} was updated twice with different masks"
                    )
                continue
            by_id[key] = rec
        images = []
        for rec in by_id.values():
            size = rec["size"]
            images.append(
                {
                    "id": rec["id"],
                    "size": size,
                    "gt": [{"size": size, "counts": c} for c in rec["gt"]],
                    "crowd": rec["crowd"],
                    "dt": [{"size": size, "counts": c} for c in rec["dt"]],
                }
            )
        return torch.tensor(coco_ap50(images), dtype=torch.float64)


class PointingAccuracy(_Base):
    """Fraction of GT phrases whose matched prediction's point lies inside the GT mask (this project's metric).

    Matching is the same greedy IoU pairing as GLaMM's mIoU (:func:`greedy_iou_pairs` on prediction x GT, pairs
    with IoU 0 never match). A GT phrase scores a hit when it is paired with a prediction whose point
    ``(x, y)`` (x = column, y = row, pixel units, floored) falls inside its GT mask; an unpaired GT phrase, a
    paired prediction without a point (None) or with a point outside the image is a miss. Denominator: the
    number of GT phrases (masks), so extra predictions cost nothing here (mIoU/AP cover them).
    States: ``hits`` and ``total`` (int64, sum).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(
        self,
        gt_masks: Sequence[MaskLike] | Tensor | np.ndarray,
        pred_masks: Sequence[MaskLike] | Tensor | np.ndarray,
        pred_points: Sequence[Sequence[float] | None],
    ) -> None:
        """Add one image: GT masks, predicted masks and one ``(x, y)`` point (or None) per predicted mask."""
        gt = _masks(gt_masks, "gt_masks")
        pred = _masks(pred_masks, "pred_masks")
        points = list(pred_points)
        if len(points) != len(pred):
            raise GroundingInputError(
                f"pred_points: expected {len(pred)} points (one per predicted mask), got {len(points)}"
            )
        pairs = greedy_iou_pairs(iou_matrix(pred, gt, what="PointingAccuracy.update"))
        self.hits += sum(_point_in_mask(points[p], gt[g], f"pred_points[{p}]") for p, g, _ in pairs)
        self.total += len(gt)

    def compute(self) -> Tensor:
        """Pooled accuracy (0.0 with no GT phrases)."""
        if int(self.total) == 0:
            return torch.tensor(0.0, dtype=torch.float64)
        return self.hits.to(torch.float64) / self.total.to(torch.float64)


class PhrasePointingAccuracy(PointingAccuracy):
    """Pointing accuracy with phrases matched by text: does the phrase's peak point land on the named object?

    Per image, GT phrases and predicted phrases are paired greedily by phrase similarity (highest first, each
    used once, pairs below ``text_threshold`` never match); a GT phrase scores a hit when its paired prediction's
    point ``(x, y)`` (floored) lies inside the GT mask. Unlike :class:`PointingAccuracy`, which pairs by mask
    IoU, a point on the wrong object cannot be credited to that object, so this measures whether attention
    finds what the text names, independently of the refiner. Denominator: the number of GT phrases. A random
    point scores the mean GT mask area fraction (the chance level).

    Every GT phrase that is not a hit lands in one of three bins (:meth:`breakdown`), which tell apart what
    to fix: ``other_object`` (paired, the point lies on another GT object of the image: attention found the
    wrong thing), ``elsewhere`` (paired, the point is on no GT object, or there is no point) and
    ``unpaired`` (no predicted phrase names it: the text is what failed). States: ``hits``, ``other_object``,
    ``elsewhere`` and ``total`` (sum); unpaired = total minus the others.
    """

    def __init__(
        self, similarity: SimilarityFn | None = None, text_threshold: float = 0.5, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.similarity = similarity
        self.text_threshold = float(text_threshold)
        self.add_state("other_object", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("elsewhere", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(  # type: ignore[override]
        self,
        gt_masks: Sequence[MaskLike] | Tensor | np.ndarray,
        gt_phrases: Sequence[str],
        pred_phrases: Sequence[str],
        pred_points: Sequence[Sequence[float] | None],
        similarity_matrix: np.ndarray | Tensor | None = None,
    ) -> None:
        """Add one image. ``similarity_matrix`` (GT phrases x predicted phrases) overrides ``self.similarity``."""
        gt = _masks(gt_masks, "gt_masks")
        gt_p = _phrases(gt_phrases, "gt_phrases")
        pred_p = _phrases(pred_phrases, "pred_phrases")
        points = list(pred_points)
        if len(gt_p) != len(gt):
            raise GroundingInputError(f"gt_phrases: expected {len(gt)} (one per GT mask), got {len(gt_p)}")
        if len(points) != len(pred_p):
            raise GroundingInputError(
                f"pred_points: expected {len(pred_p)} (one per phrase), got {len(points)}"
            )
        sims = _similarities(self.similarity, gt_p, pred_p, similarity_matrix, "PhrasePointingAccuracy")
        sims = np.where(sims >= self.text_threshold, sims, -np.inf)
        while sims.size and np.isfinite(sims.max()):
            g, p = np.unravel_index(int(np.argmax(sims)), sims.shape)
            sims[g, :] = -np.inf
            sims[:, p] = -np.inf
            if _point_in_mask(points[p], gt[g], f"pred_points[{p}]"):
                self.hits += 1
            elif any(_point_in_mask(points[p], gt[k], f"pred_points[{p}]") for k in range(len(gt)) if k != g):
                self.other_object += 1
            else:
                self.elsewhere += 1
        self.total += len(gt)

    def breakdown(self) -> dict[str, float]:
        """Fractions of the GT phrases: ``hit`` (= :meth:`compute`), ``other_object``, ``elsewhere`` and
        ``unpaired``; they sum to 1 (all 0.0 with no GT phrases)."""
        total = int(self.total)
        if total == 0:
            return dict.fromkeys(("hit", "other_object", "elsewhere", "unpaired"), 0.0)
        hits, other, elsewhere = int(self.hits), int(self.other_object), int(self.elsewhere)
        return {
            "hit": hits / total,
            "other_object": other / total,
            "elsewhere": elsewhere / total,
            "unpaired": (total - hits - other - elsewhere) / total,
        }


# --------------------------------------------------------------------------------------------------------------
# Referring segmentation
# --------------------------------------------------------------------------------------------------------------


class ReferringIoU(_Base):
    """Referring-segmentation gIoU and cIoU as GLaMM/LISA compute them (eval/referring_seg/infer_and_evaluate.py).

    gIoU = mean over expressions of ``I / (U + 1e-5)``, with an expression whose prediction and GT are both
    empty (U = 0) scoring 1.0 ("no-object target"); cIoU = ``sum(I) / (sum(U) + 1e-10)``. States: exact
    integer ``intersection``/``union`` sums, ``iou_sum`` (float64) and ``n`` (all summed).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("intersection", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("union", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("iou_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(
        self,
        pred_masks: Sequence[MaskLike] | Tensor | np.ndarray,
        gt_masks: Sequence[MaskLike] | Tensor | np.ndarray,
    ) -> None:
        """Add expressions: ``pred_masks[i]`` is the prediction for the expression whose GT is ``gt_masks[i]``."""
        pred = _masks(pred_masks, "pred_masks")
        gt = _masks(gt_masks, "gt_masks")
        if len(pred) != len(gt):
            raise GroundingInputError(
                f"ReferringIoU.update: expected one prediction per GT mask, got {len(pred)} and {len(gt)}"
            )
        iou_sum = 0.0
        for k, (p, g) in enumerate(zip(pred, gt, strict=True)):
            inter, union = intersection_union(p, g, what=f"ReferringIoU.update expression {k}")
            iou_sum += inter / (union + 1e-5) + (1.0 if union == 0 else 0.0)
            self.intersection += inter
            self.union += union
        self.iou_sum += torch.tensor(iou_sum, dtype=torch.float64, device=self.iou_sum.device)
        self.n += len(gt)

    def compute(self) -> dict[str, Tensor]:
        """``{"giou", "ciou"}`` (0.0 when no expression was added)."""
        n = int(self.n)
        giou = self.iou_sum / n if n else torch.tensor(0.0, dtype=torch.float64)
        ciou = self.intersection.to(torch.float64) / (self.union.to(torch.float64) + 1e-10)
        return {"giou": giou, "ciou": ciou}


# --------------------------------------------------------------------------------------------------------------
# Panoptic narrative grounding
# --------------------------------------------------------------------------------------------------------------

PNG_GROUPS = ("overall", "things", "stuff", "singular", "plural")


class PNGAverageRecall(_Base):
    """PNG average recall (BCV-Uniandes/PNG baseline/utils/meters.py ``average_accuracy``) for five groups.

    The state is an exact, fixed-size histogram per group (``overall, things, stuff, singular, plural``):
    bin ``k`` counts phrases whose IoU is >= exactly the first ``k`` of PNG's 100000 thresholds. Summing
    histograms across ranks is exact and the curve/integral is PNG's. IoUs are exact binary-mask IoUs at full
    resolution (PNG's baseline resizes masks through 256x256 first; that is a property of its model
    pipeline, not of the metric). A missing prediction (None) has IoU 0.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._thresholds = png_thresholds()
        self.add_state(
            "hist",
            default=torch.zeros(len(PNG_GROUPS), len(self._thresholds) + 1, dtype=torch.int64),
            dist_reduce_fx="sum",
        )

    def update(
        self,
        pred_masks: Sequence[MaskLike | None],
        gt_masks: Sequence[MaskLike] | Tensor | np.ndarray,
        isthing: Sequence[bool],
        plural: Sequence[bool],
    ) -> None:
        """Add phrases: prediction (or None), GT mask (union of the phrase's segments), thing flag, plural flag."""
        gt = _masks(gt_masks, "gt_masks")
        if not (len(pred_masks) == len(gt) == len(isthing) == len(plural)):
            raise GroundingInputError(
                f"PNGAverageRecall.update: pred_masks, gt_masks, isthing and plural must have one entry per phrase, "
                f"got {len(pred_masks)}, {len(gt)}, {len(isthing)}, {len(plural)}"
            )
        ious = np.zeros(len(gt), dtype=np.float64)
        for k, (p, g) in enumerate(zip(pred_masks, gt, strict=True)):
            if p is None:
                continue
            inter, union = intersection_union(
                to_rle(p, name=f"pred_masks[{k}]"), g, what=f"PNGAverageRecall.update phrase {k}"
            )
            ious[k] = inter / union if union else 0.0
        thing = np.asarray([bool(v) for v in isthing], dtype=bool)
        plur = np.asarray([bool(v) for v in plural], dtype=bool)
        groups = [np.ones(len(gt), dtype=bool), thing, ~thing, ~plur, plur]
        hist = np.stack([_png_histogram(ious[g], self._thresholds) for g in groups])
        self.hist += torch.from_numpy(hist).to(self.hist.device)

    def compute(self) -> dict[str, Tensor]:
        """Average recall per group (NaN for a group without phrases) plus ``n_<group>`` phrase counts."""
        hist = self.hist.detach().cpu().numpy()
        out: dict[str, Tensor] = {}
        for g, name in enumerate(PNG_GROUPS):
            out[name] = torch.tensor(_png_aa_from_histogram(hist[g], self._thresholds), dtype=torch.float64)
            out[f"n_{name}"] = torch.tensor(int(hist[g].sum()), dtype=torch.int64)
        return out
