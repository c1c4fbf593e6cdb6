"""Offline grounding evaluation: the ``python -m grounding.evaluate {gcg,png,res}`` CLI and its in-memory twins.
``gcg`` reproduces GLaMM's GranD-f grounded-conversation-generation evaluation (mbzuai-oryx/groundingLMM,
eval/gcg/evaluate.py): AP50, greedy mIoU and mask recall from :mod:`grounding.metrics`, METEOR and CIDEr from
pycocoevalcap (PTB tokenizer and METEOR 1.5 through Java). ``png`` computes panoptic narrative grounding
average recall (BCV-Uniandes/PNG) for overall/things/stuff/singular/plural phrases, and ``res`` referring-
segmentation gIoU/cIoU. :func:`evaluate_gcg`, :func:`evaluate_png` and :func:`evaluate_res` take in-memory
ground truth and predictions and return exactly the dict the CLI writes, so a training callback and the CLI
report identical numbers. Each subcommand prints a table and writes a JSON file of fractions in [0, 1] (CIDEr
is pycocoevalcap's raw CIDEr-D value, which can exceed 1). Malformed input stops with a one-line ``error:``
naming the file and what was expected (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
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
    load_gcg_ground_truth,
    load_gcg_predictions,
    load_png_ground_truth,
    load_res_file,
    png_prediction_path,
    read_png_prediction,
)
from grounding.metrics import PNG_GROUPS, GCGMaskRecall, GreedyMIoU, MaskAP50, PNGAverageRecall, ReferringIoU
from grounding.text_similarity import PhraseSimilarity, SimilarityFn

__all__ = ["caption_scores", "evaluate_gcg", "evaluate_png", "evaluate_res", "main"]

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


def _check_prediction(pred: GCGPrediction, img: GCGImage, where: str) -> None:
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
        _check_prediction(pred, gt.images[iid], f"prediction for image {iid!r}")
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


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}  ({100 * v:.1f})"
    return str(v)


def _print_table(title: str, rows: Sequence[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(title)
    print(f"{'metric'.ljust(width)}  value  (x100)")
    for k, v in rows:
        print(f"{k.ljust(width)}  {_fmt(v)}")


def _write_json(path: str | Path, obj: Mapping[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _run_gcg(args: argparse.Namespace) -> None:
    gt = load_gcg_ground_truth(args.gt_mask, args.gt_caption)
    preds, _missing = load_gcg_predictions(args.pred_dir, gt.eval_ids)
    for iid, pred in preds.items():
        _check_prediction(pred, gt.images[iid], f"{Path(args.pred_dir) / f'{iid}.json'}")
    result = evaluate_gcg(
        gt, preds, PhraseSimilarity(args.text_model), caption_metrics=not args.no_caption_metrics
    )
    _print_table(
        f"GCG: {result['n_images']} images, {result['n_missing']} without a prediction file",
        [
            ("AP50", result["ap50"]),
            ("mIoU", result["miou"]),
            ("recall", result["recall"]),
            ("METEOR", result["meteor"]),
            ("CIDEr", result["cider"]),
        ],
    )
    _write_json(args.out, result)


def _run_png(args: argparse.Namespace) -> None:
    images = load_png_ground_truth(
        args.annotations, args.panoptic_json, args.panoptic_dir, plural_from=args.plural_from
    )
    preds: dict[int, list[RLE | None]] = {}
    for img in images:
        p = png_prediction_path(args.pred_dir, img.image_id)
        if p.is_file():
            preds[img.image_id] = read_png_prediction(p, img)
    result = evaluate_png(images, preds)
    _print_table(
        f"PNG: {result['n_images']} images, {result['n_phrases']['overall']} phrases, {result['n_missing']} without a prediction file",
        [(f"AR {g}", result[f"ar_{g}"]) for g in PNG_GROUPS],
    )
    _write_json(args.out, result)


def _run_res(args: argparse.Namespace) -> None:
    result = evaluate_res(load_res_file(args.gt, "expressions"), load_res_file(args.pred, "predictions"))
    _print_table(
        f"RES: {result['n_expressions']} expressions, {result['n_missing']} without a prediction",
        [("gIoU", result["giou"]), ("cIoU", result["ciou"])],
    )
    _write_json(args.out, result)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m grounding.evaluate`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m grounding.evaluate",
        description="Grounding evaluation: GLaMM GCG, panoptic narrative grounding, referring segmentation.",
    )
    sub = parser.add_subparsers(dest="task", required=True)

    g = sub.add_parser("gcg", help="GLaMM GranD-f GCG: AP50, mIoU, recall, METEOR, CIDEr")
    g.add_argument(
        "--pred-dir",
        required=True,
        help="one {image_id}.json per image: {image_id, caption, phrases, pred_masks: [RLE]}",
    )
    g.add_argument("--gt-mask", required=True, help="COCO instances JSON with RLE masks (category 1)")
    g.add_argument(
        "--gt-caption",
        required=True,
        help="COCO captions JSON whose annotations carry 'labels' and 'caption'",
    )
    g.add_argument(
        "--text-model",
        required=True,
        help="local folder of the phrase-similarity encoder (bert-base-uncased for GLaMM)",
    )
    g.add_argument("--no-caption-metrics", action="store_true", help="skip METEOR/CIDEr (no Java needed)")
    g.add_argument("--out", required=True, help="output JSON")
    g.set_defaults(run=_run_gcg)

    p = sub.add_parser("png", help="panoptic narrative grounding average recall")
    p.add_argument("--annotations", required=True, help="png_coco_val2017.json (narratives)")
    p.add_argument("--panoptic-json", required=True, help="COCO panoptic JSON (panoptic_val2017.json)")
    p.add_argument("--panoptic-dir", required=True, help="folder of the COCO panoptic PNGs")
    p.add_argument(
        "--pred-dir",
        required=True,
        help="one {image_id}.json per image: {image_id, pred_masks: [RLE or null per evaluated phrase]}",
    )
    p.add_argument(
        "--plural-from",
        choices=("segments", "flag"),
        default="segments",
        help="plural = more than one segment (PNG's test_net.py, default) or the annotation's 'plural' flag",
    )
    p.add_argument("--out", required=True, help="output JSON")
    p.set_defaults(run=_run_png)

    r = sub.add_parser("res", help="referring segmentation gIoU / cIoU")
    r.add_argument("--gt", required=True, help='{"expressions": [{"id", "segmentation": RLE}, ...]}')
    r.add_argument("--pred", required=True, help='{"predictions": [{"id", "segmentation": RLE}, ...]}')
    r.add_argument("--out", required=True, help="output JSON")
    r.set_defaults(run=_run_res)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except GroundingInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
