"""``python -m grounding reproduce instance``: COCO instance segmentation with attend-and-segment (first release).

As Shengcao-Cao/groundLMM ``aas/instance_seg.py`` + ``aas/eval_instance_seg.py`` run it: each image is described
("Describe the image in detail.", greedy, maps as in GCG); each noun phrase's root word is matched to the most
similar category among those present in the image's ground truth (``grounding.category_match``: spaCy word
vectors of ``en_core_web_lg`` as the reference, or a local text model), and the phrase is kept when the
similarity reaches ``--category-thresh`` (0.5 in the reference's command); the kept phrases' maps (``mean`` over
their tokens by default here, as this script did) are segmented by SAM, one detection per phrase scored by SAM's
predicted IoU, or three with ``--more-masks``. One file per image (``OUT/predictions/<image_id>.json``, atomic;
a rerun resumes); then the COCO results JSON, pycocotools segm AP and point accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grounding.commands.models import add_model_arguments, model_source
from grounding.commands.options import add_attend_arguments, attend_settings, describe
from grounding.commands.reproduce_common import (
    PAPER_SETTINGS,
    ReproduceError,
    absolute,
    base_settings,
    load_for_work,
    pending,
    predictions_folder,
    print_rows,
    read_predictions,
    run_work,
    select_ids,
    single_map,
    write_report,
)
from grounding.commands.sharded import add_parallel_arguments, write_json_atomic
from grounding.config import AttendConfig

__all__ = ["add_instance_parser", "ground_instances", "run_instance"]

#: The reference's instance script averages a phrase's token maps (its first release); the rest is GCG's.
INSTANCE_SETTINGS = dataclasses.replace(PAPER_SETTINGS, combine="mean")
COLUMNS = (("ap", "AP"), ("ap50", "AP50"), ("ap75", "AP75"), ("point_accuracy", "point acc."))


def prediction_path(pred_dir: Path, image_id: int) -> Path:
    return pred_dir / f"{image_id}.json"


def _similarity(matcher: str, model: str | None) -> Any:
    if matcher == "spacy":
        from grounding.category_match import SpacyVectorSimilarity

        return SpacyVectorSimilarity(model or "en_core_web_lg")
    from grounding.text_similarity import PhraseSimilarity

    return PhraseSimilarity(model)


def ground_instances(
    pipeline: Any, gt: Any, images: Sequence[Any], image_dir: Path, similarity: Any, threshold: float
) -> list[dict[str, Any]]:
    """One batch of ``InstanceImage`` -> per image ``{image_id, caption, detections: [COCO result records]}``."""
    from PIL import Image

    from grounding.category_match import match_category
    from grounding.coco_instances import instance_records

    pictures = []
    for im in images:
        with Image.open(image_dir / im.file_name) as picture:
            pictures.append(picture.convert("RGB"))
    out = []
    for im, picture, maps in zip(images, pictures, pipeline.generate_maps(pictures), strict=True):
        caption, phrases, _ = pipeline.phrases(maps.ids, maps.rows, maps.view)
        candidates = gt.present_categories(im)
        kept = []
        for phrase in phrases:
            match = match_category(phrase.root or phrase.text, candidates, similarity, threshold)
            if match is not None:
                kept.append((phrase, match))
        detections: list[dict[str, Any]] = []
        if kept:
            points, _, scored = pipeline.segment(picture, [p.map for p, _ in kept], maps.view)
            for (phrase, match), point, masks in zip(kept, points, scored, strict=True):
                detections += instance_records(
                    im.image_id, phrase.text, match.category_id, match.name, masks, point
                )
        out.append({"image_id": im.image_id, "caption": caption, "detections": detections})
    return out


def _work(
    settings: AttendConfig,
    gt: Any,
    image_dir: Path,
    matcher: str,
    matcher_model: str | None,
    threshold: float,
    pred_dir: Path,
    args: argparse.Namespace,
    todo: list[int],
    progress: Any,
) -> None:
    from grounding.attend import AttendAndSegment

    similarity = _similarity(matcher, matcher_model)
    pipeline = AttendAndSegment(load_for_work(args), settings, device=args.device)
    progress(0)
    by_id = {im.image_id: im for im in gt.images}
    for first in range(0, len(todo), settings.batch_size):
        chunk = [by_id[i] for i in todo[first : first + settings.batch_size]]
        for record in ground_instances(pipeline, gt, chunk, image_dir, similarity, threshold):
            write_json_atomic(prediction_path(pred_dir, record["image_id"]), record)
        progress(len(chunk))


def results_json(records_per_image: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """All detections as one COCO results list, ``id`` numbered from 1 in image order (the reference's counter)."""
    out = []
    for records in records_per_image:
        for record in records:
            out.append({"id": len(out) + 1, **record})
    return out


def run_instance(args: argparse.Namespace) -> dict[str, Any]:
    from grounding.coco_instances import evaluate_instances, load_coco_instances

    if args.model is not None and args.weights is None:
        raise ReproduceError(f"--model {args.model} needs --weights")
    if args.refiner is None and args.run is None:
        args.refiner = "sam"  # the reference's
    base = INSTANCE_SETTINGS if args.run is None else base_settings(args)
    settings = single_map(attend_settings(args, base), "instance segmentation")
    if settings.refiner == "sam" and not (
        settings.sam_checkpoint and Path(settings.sam_checkpoint).is_file()
    ):
        raise ReproduceError(
            f"--refiner sam (the reference's) needs --sam CHECKPOINT, got {settings.sam_checkpoint}"
        )
    if not 0.0 <= args.category_thresh <= 1.0:
        raise ReproduceError(f"--category-thresh must be in [0, 1], got {args.category_thresh}")
    if args.category_match == "text" and (args.text_model is None or not Path(args.text_model).is_dir()):
        raise ReproduceError(f"--category-match text needs --text-model FOLDER, got {args.text_model}")
    print(f"settings: {describe(settings)}")
    gt = load_coco_instances(args.annotations)
    missing = [im.file_name for im in gt.images if not (args.images / im.file_name).is_file()]
    if missing:
        raise ReproduceError(f"--images {args.images}: {len(missing)} images not found (first: {missing[0]})")
    ids = select_ids([im.image_id for im in gt.images], args)
    if args.limit is not None:
        ids = ids[: args.limit]
        print(f"--limit {args.limit}: {len(ids)} images only (not comparable with the paper's numbers)")
    matcher_model = args.spacy_vectors if args.category_match == "spacy" else str(args.text_model)
    out = Path(args.out)
    recorded = {
        **model_source(args),
        **dataclasses.asdict(settings),
        "sam_checkpoint": absolute(settings.sam_checkpoint),
        "category_match": args.category_match,
        "category_model": matcher_model,
        "category_thresh": args.category_thresh,
    }
    pred_dir = predictions_folder(out, recorded)
    by_id = {im.image_id: im for im in gt.images}
    # Images without any GT category cannot match a phrase (the reference skips them): no detections, no model.
    for i in ids:
        if not by_id[i].category_ids and not prediction_path(pred_dir, i).is_file():
            write_json_atomic(
                prediction_path(pred_dir, i), {"image_id": i, "caption": None, "detections": []}
            )
    todo = pending(ids, functools.partial(prediction_path, pred_dir), "images")
    timing: dict[str, Any] = {"images": 0}
    if todo:
        work = functools.partial(
            _work,
            settings,
            gt,
            args.images,
            args.category_match,
            matcher_model,
            args.category_thresh,
            pred_dir,
        )
        timing = run_work(args, todo, work, pred_dir, "COCO instances", settings.batch_size)

    detections = read_predictions(ids, functools.partial(prediction_path, pred_dir), "detections")
    results = results_json(list(detections.values()))
    results_file = out / "results.json"
    write_json_atomic(results_file, results)
    gt_file = args.annotations
    if len(ids) != len(gt.images):  # evaluate on the subset's images only
        gt_file = out / "instances_subset.json"
        _write_subset(args.annotations, set(ids), gt_file)
    result = evaluate_instances(gt_file, results)
    name = args.model or f"run {Path(args.run).name}"
    print_rows(
        f"COCO instances, {len(ids)} images, {result['n_detections']} detections"
        f"{' (3 masks per phrase)' if settings.more_masks else ''}",
        COLUMNS,
        [(f"measured: {name}", result)],
    )
    report = {**result, "model": name, "results": str(results_file), "timing": timing}
    write_report(out, report)
    return report


def _write_subset(path: Path, ids: set[int], out: Path) -> None:
    from grounding.coco_io import read_json

    data = read_json(path, "COCO instances")
    subset = {
        **data,
        "images": [im for im in data["images"] if im["id"] in ids],
        "annotations": [a for a in data["annotations"] if a["image_id"] in ids],
    }
    write_json_atomic(out, subset)


def add_instance_parser(sub: Any) -> None:
    c = sub.add_parser(
        "instance", help="COCO instance segmentation (category match + SAM): segm AP, point accuracy"
    )
    add_model_arguments(c)
    c.add_argument("--annotations", required=True, type=Path, help="instances_val2017.json")
    c.add_argument("--images", required=True, type=Path, help="the val2017 images folder")
    c.add_argument(
        "--category-match",
        choices=("spacy", "text"),
        default="spacy",
        help="root word vs category names: spaCy word vectors (the reference) or a local text model",
    )
    c.add_argument(
        "--spacy-vectors", default="en_core_web_lg", help="spaCy pipeline with word vectors (md / lg)"
    )
    c.add_argument(
        "--text-model", type=Path, default=None, help="text-model folder for --category-match text"
    )
    c.add_argument(
        "--category-thresh", type=float, default=0.5, help="least similarity kept (reference: 0.5)"
    )
    c.add_argument("--out", required=True, type=Path)
    c.add_argument("--limit", type=int, default=None, help="only the first N images (smoke tests, timing)")
    add_parallel_arguments(c)
    add_attend_arguments(
        c, "the reference's: refiner sam (needs --sam), mean over a phrase's tokens", exclude=("grid_shifts",)
    )
    c.set_defaults(handler=run_instance)
