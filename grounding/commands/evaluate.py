"""``python -m grounding evaluate {gcg,png,res}``: grounding metrics of prediction files against ground truth.

Reads the files, calls ``grounding.evaluate`` and prints a table; writes a JSON file of fractions in [0, 1]
(CIDEr is pycocoevalcap's raw CIDEr-D value, which can exceed 1). Malformed input stops with a one-line
``error:`` naming the file and what was expected (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from grounding.coco_io import (
    RLE,
    GroundingInputError,
    load_gcg_ground_truth,
    load_gcg_predictions,
    load_png_ground_truth,
    load_res_file,
    png_prediction_path,
    read_png_prediction,
)
from grounding.evaluate import check_prediction, evaluate_gcg, evaluate_png, evaluate_res
from grounding.metrics import PNG_GROUPS
from grounding.text_similarity import PhraseSimilarity


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
        check_prediction(pred, gt.images[iid], f"{Path(args.pred_dir) / f'{iid}.json'}")
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
