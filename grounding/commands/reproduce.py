"""The paper's evaluations, one command each: ``python -m grounding reproduce {gcg,png,res,instance} (--run DIR |
--model {llava-1.5,difflmm,hf-*} --weights ...) --out DIR ...``, on every visible device, resumable image by image.

``gcg``: ``--sam CHECKPOINT --granddf DIR --split {val,test} --text-model PATH``.

It reads GranD-f's evaluation split in GLaMM's layout (``grounding.granddf``), loads the model from its
released weights, runs batched attend-and-segment with the paper's settings (greedy, up to 512 new tokens,
SAM ViT-H point prompts; every option of ``grounding.config.AttendConfig`` can be changed) with a progress
bar, writes one GLaMM-format prediction per image (``OUT/predictions/<image_id>.json``, written atomically),
evaluates them with ``grounding.evaluate.evaluate_gcg`` (AP50, mIoU, mask recall, METEOR, CIDEr) and prints
the measured numbers beside the paper's. Rerunning the same command resumes: images whose prediction file
exists are not redone, and a run whose settings differ from the ones recorded in ``OUT/settings.json`` stops
instead of mixing predictions. ``granddf-from-shapes`` lays a shapes-world validation set out as GranD-f.

The paper's other evaluations are sibling commands with the same model options, resumability, ``--ids`` and
``--processes`` (every GPU at once, ``grounding.commands.sharded``): ``png`` (panoptic narrative grounding,
``grounding.commands.reproduce_png``), ``res`` (RefCOCO/+/g referring segmentation,
``grounding.commands.reproduce_res``) and ``instance`` (COCO instance segmentation,
``grounding.commands.reproduce_instance``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grounding.coco_io import GCGGroundTruth, GroundingInputError, gcg_prediction_path, write_gcg_prediction
from grounding.commands.models import (
    add_model_arguments,
    model_source,
    resolve_device,
)
from grounding.commands.options import add_attend_arguments, attend_settings, describe
from grounding.commands.reproduce_common import (
    ReproduceError,
    absolute,
    base_settings,
    load_for_work,
    pending,
    predictions_folder,
    run_work,
    select_ids,
    write_report,
)
from grounding.commands.reproduce_instance import add_instance_parser
from grounding.commands.reproduce_png import add_png_parser
from grounding.commands.reproduce_res import add_res_parser
from grounding.commands.sharded import add_parallel_arguments
from grounding.config import AttendConfig
from grounding.granddf import PAPER, PAPER_ROW, SPLITS, GranDfSplit, granddf_from_shapes, locate_granddf


def _subset(gt: GCGGroundTruth, ids: Sequence[Any]) -> GCGGroundTruth:
    keep = set(ids)
    return GCGGroundTruth(
        images={k: v for k, v in gt.images.items() if k in keep},
        eval_ids=[i for i in gt.eval_ids if i in keep],
    )


def ground_images(
    args: argparse.Namespace, settings: AttendConfig, data: GranDfSplit, ids: Sequence[Any], pred_dir: Path
) -> dict:
    """Ground every image of ``ids`` without a prediction file, on every device at once
    (``grounding.commands.sharded``); returns timing of the work done."""
    import functools

    todo = pending(ids, functools.partial(gcg_prediction_path, pred_dir), f"images in GranD-f {data.split}")
    if not todo:
        return {"images": 0}
    work = functools.partial(_ground_gcg, settings, data, pred_dir)
    return run_work(args, todo, work, pred_dir, f"grounding {data.split}", settings.batch_size)


def _ground_gcg(
    settings: AttendConfig,
    data: GranDfSplit,
    pred_dir: Path,
    args: argparse.Namespace,
    todo: list[Any],
    progress: Any,
) -> None:
    """One process's share of GCG: load the model on ``args.device``, ground ``todo`` batch by batch."""
    from PIL import Image

    from grounding.attend import AttendAndSegment

    pipeline = AttendAndSegment(load_for_work(args), settings, device=args.device)
    progress(0)
    step = settings.batch_size
    for first in range(0, len(todo), step):
        chunk = todo[first : first + step]
        pictures = []
        for image_id in chunk:
            with Image.open(data.images[image_id]) as image:
                pictures.append(image.convert("RGB"))
        for image_id, result in zip(chunk, pipeline(pictures), strict=True):
            write_gcg_prediction(gcg_prediction_path(pred_dir, image_id), result.to_gcg(image_id))
        progress(len(chunk))


def _fmt(value: float | None, scale: float = 100.0) -> str:
    return "-" if value is None else f"{value * scale:.1f}"


def print_table(result: dict[str, Any], model: str, split: str) -> None:
    """Measured metrics (percent; CIDEr as pycocoevalcap's raw x100) beside the paper's rows."""
    rows = [
        (
            "measured: " + model,
            {k: result.get(k) for k in ("ap50", "miou", "recall", "meteor", "cider")},
            100.0,
        )
    ]
    paper_rows = ([PAPER[PAPER_ROW[model]]] if model in PAPER_ROW else []) + [PAPER["glamm"]]
    rows += [(f"paper: {label}", values[split], 1.0) for label, values in paper_rows]
    header = ["", "METEOR", "mIoU", "recall", "AP50", "CIDEr"]
    lines = [header]
    for label, values, scale in rows:
        lines.append(
            [label]
            + [_fmt(values.get(k), scale) for k in ("meteor", "miou", "recall")]
            + [_fmt(values.get(k), scale) for k in ("ap50", "cider")]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print(f"GranD-f {split} GCG, {result['n_images']} images ({result['n_missing']} without a prediction)")
    for line in lines:
        print(
            "  ".join(
                cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(line)
            )
        )


def run_gcg(args: argparse.Namespace) -> dict[str, Any]:
    from grounding.coco_io import load_gcg_ground_truth, load_gcg_predictions
    from grounding.evaluate import evaluate_gcg
    from grounding.phrases import default_spacy_model

    if args.model is not None and args.weights is None:
        raise ReproduceError(f"--model {args.model} needs --weights")
    if args.refiner is None and args.run is None:
        args.refiner = "sam"  # the paper's
    if args.refiner == "sam" and args.sam_checkpoint is None:
        raise ReproduceError("--refiner sam (the paper's) needs --sam CHECKPOINT (sam_vit_h_4b8939.pth)")
    settings = attend_settings(args, base_settings(args))
    if settings.refiner == "sam" and not Path(settings.sam_checkpoint).is_file():
        raise ReproduceError(f"--sam {settings.sam_checkpoint}: file not found")
    if settings.spacy_model is None:  # resolved now, so settings.json records the real one
        settings = dataclasses.replace(settings, spacy_model=default_spacy_model())
    if not Path(args.text_model).is_dir():
        raise ReproduceError(
            f"--text-model {args.text_model}: not a local model folder (bert-base-uncased for GLaMM)"
        )
    if not args.no_caption_metrics and shutil.which("java") is None:
        raise ReproduceError(
            "java not found: METEOR/CIDEr need it (install a JRE or pass --no-caption-metrics)"
        )
    print(f"settings: {describe(settings)}")
    data = locate_granddf(args.granddf, args.split)
    gt = load_gcg_ground_truth(data.mask_file, data.caption_file)
    ids = list(gt.eval_ids)
    ids = select_ids(ids, args)
    gt = _subset(gt, ids)
    if args.limit is not None:
        ids = ids[: args.limit]
        gt = _subset(gt, ids)
        print(
            f"--limit {args.limit}: evaluating {len(ids)} images only (not comparable with the paper's numbers)"
        )
    out = Path(args.out)
    recorded = {
        **model_source(args),
        "split": args.split,
        **dataclasses.asdict(settings),
        "sam_checkpoint": absolute(settings.sam_checkpoint),
    }
    pred_dir = predictions_folder(out, recorded)
    timing = ground_images(args, settings, data, ids, pred_dir)

    predictions, _missing = load_gcg_predictions(pred_dir, ids) if pred_dir.is_dir() else ({}, ids)
    result = evaluate_gcg(gt, predictions, args.text_model, caption_metrics=not args.no_caption_metrics)
    name = args.model or f"run {Path(args.run).name}"
    print_table(result, name, args.split)
    paper_rows = ([PAPER[PAPER_ROW[name]]] if name in PAPER_ROW else []) + [PAPER["glamm"]]
    report = {
        **result,
        "split": args.split,
        "model": name,
        "paper": {label: values[args.split] for label, values in paper_rows},
        "timing": timing,
    }
    write_report(out, report)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m grounding reproduce", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser(
        "gcg", help="GranD-f grounded conversation generation, from weights to the paper's table"
    )
    add_model_arguments(g)
    g.add_argument("--granddf", required=True, type=Path, help="folder holding GranDf/ and GranDf_HA_images/")
    g.add_argument("--split", required=True, choices=SPLITS)
    g.add_argument("--out", required=True, type=Path)
    g.add_argument(
        "--text-model", required=True, type=Path, help="phrase-similarity encoder folder (bert-base-uncased)"
    )
    g.add_argument("--no-caption-metrics", action="store_true", help="skip METEOR/CIDEr (no Java needed)")
    g.add_argument("--limit", type=int, default=None, help="only the first N images (smoke tests, timing)")
    add_parallel_arguments(g)
    add_attend_arguments(g, "the paper's: refiner sam (needs --sam), 512 new tokens, root/max grouping")
    g.set_defaults(handler=run_gcg)

    add_png_parser(sub)
    add_res_parser(sub)
    add_instance_parser(sub)

    s = sub.add_parser("granddf-from-shapes", help="lay a shapes world's GCG val set out as GranD-f")
    s.add_argument(
        "--world", required=True, type=Path, help="a shapes world folder (python -m datamodules.shapes)"
    )
    s.add_argument("--out", required=True, type=Path)
    s.set_defaults(
        handler=lambda a: print(f"GranD-f layout written to {granddf_from_shapes(a.world, a.out)}")
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if args.command in ("gcg", "png", "res", "instance"):
        resolve_device(args)
    try:
        args.handler(args)
    except (ReproduceError, GroundingInputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
