"""Offline grounding evaluation (the library behind ``python -m grounding evaluate {gcg,png,res}``).
``gcg`` reproduces GLaMM's GranD-f grounded-conversation-generation evaluation (mbzuai-oryx/groundingLMM,
eval/gcg/evaluate.py): AP50, greedy mIoU and mask recall from :mod:`grounding.metrics`, METEOR and CIDEr from
pycocoevalcap (PTB tokenizer and METEOR 1.5 through Java). ``png`` computes panoptic narrative grounding
average recall (BCV-Uniandes/PNG) for overall/things/stuff/singular/plural phrases, and ``res`` referring-
segmentation gIoU/cIoU. :func:`evaluate_gcg`, :func:`evaluate_png` and :func:`evaluate_res` take in-memory
ground truth and predictions and return exactly the dict the command writes, so a training callback and the CLI
report identical numbers. Each subcommand prints a table and writes a JSON file of fractions in [0, 1] (CIDEr
is pycocoevalcap's raw CIDEr-D value, which can exceed 1). Malformed input stops with a one-line ``error:``
naming the file and what was expected (exit status 2).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from grounding.coco_io import (
    RLE,
    GCGGroundTruth,
    GCGImage,
    GCGPrediction,
    GroundingInputError,
    ImageId,
    PNGImage,
    empty_rle,
)
from grounding.metrics import PNG_GROUPS, GCGMaskRecall, GreedyMIoU, MaskAP50, PNGAverageRecall, ReferringIoU
from grounding.text_similarity import PhraseSimilarity, SimilarityFn

__all__ = ["caption_scores", "evaluate_gcg", "evaluate_png", "evaluate_res"]

# Characters other than "\n" that Java's line reader also treats as line breaks; left in a caption they would
# shift pycocoevalcap's PTBTokenizer output lines against the image ids (it only replaces "\n").
_LINE_BREAKS = str.maketrans({"\r": " ", "\u0085": " ", "\u2028": " ", "\u2029": " "})


def caption_scores(
    references: Mapping[ImageId, Sequence[str]], candidates: Mapping[ImageId, str]
) -> dict[str, float]:
    """METEOR and CIDEr(-D) as pycocoevalcap's ``COCOEvalCap`` computes them (GLaMM's caption metrics).

    Both sides go through the PTB tokenizer (Java), then METEOR 1.5 (``-l en -norm``, corpus score from the
    jar) and CIDEr-D (document frequencies from these references). ``references`` fixes the image set and
    order; every image needs a candidate (use ``""`` for a missing prediction) and at least one reference.
    """
    if shutil.which("java") is None:
        raise GroundingInputError(
            "java: not found on PATH (METEOR and the PTB tokenizer need it); use --no-caption-metrics"
        )
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = list(references)
    if not ids:
        return {"meteor": 0.0, "cider": 0.0}
    for iid in ids:
        if iid not in candidates:
            raise GroundingInputError(f"captions: no candidate caption for image {iid!r}")
        if not references[iid]:
            raise GroundingInputError(f"captions: image {iid!r} has no reference caption")
    gts = {iid: [{"caption": str(c).translate(_LINE_BREAKS)} for c in references[iid]] for iid in ids}
    res = {iid: [{"caption": str(candidates[iid]).translate(_LINE_BREAKS)}] for iid in ids}
    tokenizer = PTBTokenizer()
    gts_tok = tokenizer.tokenize(gts)
    res_tok = tokenizer.tokenize(res)
    meteor = Meteor()
    try:
        meteor_score, _ = meteor.compute_score(gts_tok, res_tok)
    finally:
        with meteor.lock:
            meteor.meteor_p.stdin.close()
            meteor.meteor_p.kill()
            meteor.meteor_p.wait()
    cider_score, _ = Cider().compute_score(gts_tok, res_tok)
    return {"meteor": float(meteor_score), "cider": float(cider_score)}


def check_prediction(pred: GCGPrediction, img: GCGImage, where: str) -> None:
    for k, m in enumerate(pred.pred_masks):
        if list(m["size"]) != [img.height, img.width]:
            raise GroundingInputError(
                f"{where}: pred_masks[{k}] has size {m['size']}, expected {[img.height, img.width]} (the GT image size)"
            )


def evaluate_gcg(
    gt: GCGGroundTruth,
    predictions: Mapping[ImageId, GCGPrediction],
    similarity: SimilarityFn | str | Path,
    *,
    caption_metrics: bool = True,
) -> dict[str, Any]:
    """GLaMM's GCG evaluation from in-memory predictions; the dict the ``gcg`` CLI writes.

    ``predictions`` maps image ids of ``gt.eval_ids`` to predictions; an image without one counts as
    predicting nothing (empty caption, no phrases, no masks) and is counted in ``n_missing``. ``similarity``
    is a phrase-similarity callable or a local model folder for :class:`PhraseSimilarity`. Returns
    ``{"ap50", "miou", "recall", "meteor", "cider", "n_images", "n_missing"}`` (METEOR/CIDEr None when
    ``caption_metrics`` is False). Image sets as GLaMM: mIoU, recall and captions over the caption GT's
    images; AP over every image of the mask GT, category-1 GT masks only. This is a whole-data-set function:
    call it in one process with every prediction (e.g. gathered to rank 0); its metrics never sync across
    ranks. For sharded evaluation under DDP use the metric classes of :mod:`grounding.metrics` directly.
    """
    eval_set = set(gt.eval_ids)
    unknown = [iid for iid in predictions if iid not in eval_set]
    if unknown:
        raise GroundingInputError(f"predictions: image ids not in the GT caption file: {unknown[:5]!r}")
    for iid, pred in predictions.items():
        check_prediction(pred, gt.images[iid], f"prediction for image {iid!r}")
    sim: SimilarityFn = PhraseSimilarity(similarity) if isinstance(similarity, (str, Path)) else similarity

    ap = MaskAP50(sync_on_compute=False)
    for iid, img in gt.images.items():
        pred = predictions.get(iid)
        ap.update(
            iid,
            [m for m, c in zip(img.gt_masks, img.gt_categories, strict=True) if c == 1],
            pred.pred_masks if pred is not None else [],
            gt_iscrowd=[z for z, c in zip(img.gt_iscrowd, img.gt_categories, strict=True) if c == 1],
        )
    miou = GreedyMIoU(sync_on_compute=False)
    recall = GCGMaskRecall(sim, sync_on_compute=False)
    for iid in gt.eval_ids:
        img = gt.images[iid]
        pred = predictions.get(iid)
        pred_masks = pred.pred_masks if pred is not None else []
        miou.update(pred_masks, img.gt_masks)
        recall.update(img.gt_masks, pred_masks, img.labels, pred.phrases if pred is not None else [])

    result: dict[str, Any] = {
        "ap50": float(ap.compute()),
        "miou": float(miou.compute()),
        "recall": float(recall.compute()),
        "meteor": None,
        "cider": None,
        "n_images": len(gt.eval_ids),
        "n_missing": sum(1 for iid in gt.eval_ids if iid not in predictions),
    }
    if caption_metrics:
        refs = {iid: gt.images[iid].captions for iid in gt.eval_ids}
        cands = {iid: (predictions[iid].caption if iid in predictions else "") for iid in gt.eval_ids}
        result.update(caption_scores(refs, cands))
    return result


def evaluate_png(
    images: Sequence[PNGImage], predictions: Mapping[int, Sequence[RLE | None]]
) -> dict[str, Any]:
    """PNG average recall from in-memory predictions (``image_id -> one mask or None per evaluated phrase``).

    Returns ``{"ar_overall", "ar_things", "ar_stuff", "ar_singular", "ar_plural"}`` (None for a group without
    phrases), ``n_phrases`` per group, ``n_images`` and ``n_missing`` (images without predictions: IoU 0).
    """
    metric = PNGAverageRecall(sync_on_compute=False)
    missing = 0
    for img in images:
        pred = predictions.get(img.image_id)
        if pred is None:
            missing += 1
            pred = [None] * len(img.phrases)
        elif len(pred) != len(img.phrases):
            raise GroundingInputError(
                f"predictions for image {img.image_id}: expected {len(img.phrases)} masks, got {len(pred)}"
            )
        if not img.phrases:
            continue
        metric.update(
            list(pred),
            [p.mask for p in img.phrases],
            [p.isthing for p in img.phrases],
            [p.plural for p in img.phrases],
        )
    out = metric.compute()
    result: dict[str, Any] = {}
    for g in PNG_GROUPS:
        v = float(out[g])
        result[f"ar_{g}"] = None if math.isnan(v) else v
    result["n_phrases"] = {g: int(out[f"n_{g}"]) for g in PNG_GROUPS}
    result["n_images"] = len(images)
    result["n_missing"] = missing
    return result


def evaluate_res(gt: Mapping[str, RLE], predictions: Mapping[str, RLE]) -> dict[str, Any]:
    """Referring segmentation gIoU/cIoU; a GT expression without a prediction is scored with an empty mask."""
    unknown = [k for k in predictions if k not in gt]
    if unknown:
        raise GroundingInputError(f"predictions: ids not in the ground truth: {unknown[:5]!r}")
    metric = ReferringIoU(sync_on_compute=False)
    ids = list(gt)
    preds = [predictions[k] if k in predictions else empty_rle(*gt[k]["size"]) for k in ids]
    for k, p in zip(ids, preds, strict=True):
        if p["size"] != gt[k]["size"]:
            raise GroundingInputError(
                f"prediction {k!r}: mask size {p['size']} differs from the GT size {gt[k]['size']}"
            )
    if ids:
        metric.update(preds, [gt[k] for k in ids])
    out = metric.compute()
    return {
        "giou": float(out["giou"]),
        "ciou": float(out["ciou"]),
        "n_expressions": len(ids),
        "n_missing": sum(1 for k in ids if k not in predictions),
    }


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
