"""``python -m grounding reproduce png``: panoptic narrative grounding with attend-and-segment, as the reference runs it.

Reads the PNG narratives and COCO panoptic val2017 in the reference's ``data/coco`` layout
(``grounding.png_data.locate_png``). Per narrative (Shengcao-Cao/groundLMM ``aas/infer_attn_png.py`` +
``aas/png.py``): the prompt "Describe the image in detail." with the image, the narrative teacher-forced as the
response (each utterance encoded alone without special tokens, concatenated), one forward pass; the map of a
caption token is the attention of the query at its own position (``grounding.teacher_forcing``); the caption's
mean map is subtracted; each evaluated segment's map is its tokens' ``first`` (the reference's default), ``max``
or ``mean``; its argmax on the image is the point; the mask is the predicted panoptic segment under the point
(``--panoptic-pred``: a folder of panoptic PNGs, the reference used OpenSeeD's) or the refiner's (SAM). One
prediction file per narrative (``OUT/predictions/<index:012d>.json``: points and RLE masks, written atomically;
a rerun resumes), then average recall over IoU thresholds: overall, things, stuff, singular, plural.
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
from grounding.png_data import PNGFiles, PNGNarrative
from grounding.png_grounding import AGGREGATIONS

__all__ = ["add_png_parser", "ground_narratives", "run_png"]

#: Average recall columns (the reference prints overall, things and stuff; singular/plural are PNG's).
COLUMNS = (
    ("ar_overall", "AR"),
    ("ar_things", "things"),
    ("ar_stuff", "stuff"),
    ("ar_singular", "singular"),
    ("ar_plural", "plural"),
)


def prediction_path(pred_dir: Path, index: int) -> Path:
    """The reference's sample name: the narrative's index in the file, ``f"{index:012d}"``."""
    return pred_dir / f"{index:012d}.json"


def ground_narratives(
    model: Any,
    settings: AttendConfig,
    narratives: Sequence[PNGNarrative],
    files: PNGFiles,
    aggregation: str,
    panoptic_pred: Path | None,
    refiner: Any = None,
) -> list[dict[str, Any]]:
    """One batch of narratives -> per narrative ``{index, image_id, points, pred_masks}`` (one per evaluated
    segment). ``refiner``: an ``AttendAndSegment`` whose refiner makes the masks when ``panoptic_pred`` is None."""
    import numpy as np
    from PIL import Image

    from grounding.coco_io import mask_to_rle
    from grounding.png_data import panoptic_prediction_path, read_panoptic_ids, segment_at
    from grounding.png_grounding import aggregate_segment_maps, teacher_forced_caption
    from grounding.sam_prompts import remove_corner
    from grounding.segment import argmax_point, normalize_maps
    from grounding.teacher_forcing import teacher_forced_rows

    images = []
    for n in narratives:
        with Image.open(files.image_dir / n.file_name) as image:
            images.append(image.convert("RGB"))
    captions = [
        teacher_forced_caption(model.tokenizer, [s.utterance for s in n.segments]) for n in narratives
    ]
    batch = model.prepare(images, [settings.prompt] * len(images))
    rows = teacher_forced_rows(
        model,
        batch,
        [c.token_ids for c in captions],
        settings.layers,
        settings.register_tokens,
        settings.attribute_mixing,
    )
    out = []
    for narrative, image, caption, (token_rows, view) in zip(narratives, images, captions, rows, strict=True):
        if view.image_size != (image.height, image.width):
            raise ReproduceError(
                f"the model's layout is for a {view.image_size} image, not {image.size[::-1]}"
            )
        evaluated = narrative.evaluated
        if not evaluated:
            out.append(
                {"index": narrative.index, "image_id": narrative.image_id, "points": [], "pred_masks": []}
            )
            continue
        normalised = normalize_maps(view.to_grid(token_rows))  # the caption's mean map subtracted
        grids = aggregate_segment_maps(
            normalised, [caption.segment_ranges[k] for k in evaluated], aggregation
        )
        if panoptic_pred is None:
            points, _, scored = refiner.segment(image, list(grids), view)
            masks = [np.asarray(kept[-1].mask, dtype=bool) for kept in scored]
        else:
            if settings.remove_corner:
                grids = remove_corner(grids)
            within = view.peak_region(settings.peak)
            points = [argmax_point(view.render(g), within) for g in grids]
            id_map = read_panoptic_ids(panoptic_prediction_path(panoptic_pred, narrative.file_name))
            if id_map.shape != (image.height, image.width):
                raise ReproduceError(
                    f"{panoptic_prediction_path(panoptic_pred, narrative.file_name)}: size {id_map.shape} "
                    f"differs from the image's {(image.height, image.width)}"
                )
            masks = [segment_at(id_map, p) for p in points]
        out.append(
            {
                "index": narrative.index,
                "image_id": narrative.image_id,
                "points": [[int(x), int(y)] for x, y in points],
                "pred_masks": [mask_to_rle(m) for m in masks],
            }
        )
    return out


def _work(
    settings: AttendConfig,
    narratives: dict[int, PNGNarrative],
    files: PNGFiles,
    aggregation: str,
    panoptic_pred: Path | None,
    pred_dir: Path,
    args: argparse.Namespace,
    todo: list[int],
    progress: Any,
) -> None:
    """One process's share: load the model, ground ``todo`` (narrative indices) batch by batch."""
    from grounding.attend import AttendAndSegment
    from grounding.segment import ThresholdRefiner

    model = load_for_work(args)
    # With panoptic predictions the refiner is never asked: do not load SAM for nothing.
    pipeline = AttendAndSegment(
        model, settings, refiner=ThresholdRefiner() if panoptic_pred else None, device=args.device
    )
    progress(0)
    for first in range(0, len(todo), settings.batch_size):
        chunk = [narratives[i] for i in todo[first : first + settings.batch_size]]
        for record in ground_narratives(model, settings, chunk, files, aggregation, panoptic_pred, pipeline):
            write_json_atomic(prediction_path(pred_dir, record["index"]), record)
        progress(len(chunk))


def run_png(args: argparse.Namespace) -> dict[str, Any]:
    from grounding.evaluate import evaluate_png
    from grounding.png_data import load_png_narratives, locate_png, png_ground_truth, png_predictions_by_image

    if args.model is not None and args.weights is None:
        raise ReproduceError(f"--model {args.model} needs --weights")
    panoptic_pred = args.panoptic_pred
    if panoptic_pred is None and args.refiner is None and args.sam_checkpoint is None:
        raise ReproduceError("give --panoptic-pred DIR (the reference's OpenSeeD PNGs), or --sam / --refiner")
    if panoptic_pred is not None and not Path(panoptic_pred).is_dir():
        raise ReproduceError(f"--panoptic-pred {panoptic_pred}: not a folder")
    settings = single_map(attend_settings(args, base_settings(args)), "PNG")
    if panoptic_pred is None and settings.refiner == "sam" and not Path(settings.sam_checkpoint).is_file():
        raise ReproduceError(f"--sam {settings.sam_checkpoint}: file not found")
    print(f"settings: {describe(settings)}")
    files = locate_png(args.coco)
    narratives = load_png_narratives(
        files.narratives, files.panoptic_json, files.panoptic_dir, files.image_dir
    )
    by_index = {n.index: n for n in narratives}
    indices = select_ids([n.index for n in narratives], args)
    if args.limit is not None:
        indices = indices[: args.limit]
        print(
            f"--limit {args.limit}: {len(indices)} narratives only (not comparable with the paper's numbers)"
        )
    chosen = [by_index[i] for i in indices]
    out = Path(args.out)
    recorded = {
        **model_source(args),
        **dataclasses.asdict(settings),
        "sam_checkpoint": absolute(settings.sam_checkpoint),
        "aggregation": args.aggregation,
        "masks": "panoptic prediction" if panoptic_pred else settings.refiner,
        "panoptic_pred": absolute(panoptic_pred),
    }
    pred_dir = predictions_folder(out, recorded)
    todo = pending(indices, functools.partial(prediction_path, pred_dir), "narratives")
    timing: dict[str, Any] = {"images": 0}
    if todo:
        work = functools.partial(_work, settings, by_index, files, args.aggregation, panoptic_pred, pred_dir)
        timing = run_work(args, todo, work, pred_dir, "PNG narratives", settings.batch_size)

    predictions = read_predictions(indices, functools.partial(prediction_path, pred_dir), "pred_masks")
    gt = png_ground_truth(chosen, files.panoptic_dir)
    result = evaluate_png(gt, png_predictions_by_image(chosen, predictions))
    name = args.model or f"run {Path(args.run).name}"
    print_rows(
        f"PNG val2017, {len(chosen)} narratives ({len(chosen) - len(predictions)} without a prediction), "
        f"aggregation {args.aggregation}",
        COLUMNS,
        [(f"measured: {name}", result)],
    )
    report = {**result, "model": name, "n_narratives": len(chosen), "timing": timing}
    write_report(out, report)
    return report


def add_png_parser(sub: Any) -> None:
    p = sub.add_parser("png", help="panoptic narrative grounding (teacher-forced maps), average recall")
    add_model_arguments(p)
    p.add_argument(
        "--coco",
        required=True,
        type=Path,
        help="data/coco: annotations/png_coco_val2017.json, annotations/panoptic_val2017(.json), val2017/",
    )
    p.add_argument(
        "--panoptic-pred",
        type=Path,
        default=None,
        help="folder of predicted panoptic PNGs named like the images (the reference: OpenSeeD's); "
        "without it the refiner (--sam) makes the masks",
    )
    p.add_argument("--aggregation", choices=AGGREGATIONS, default="first", help="a segment's tokens' maps")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument(
        "--limit", type=int, default=None, help="only the first N narratives (smoke tests, timing)"
    )
    add_parallel_arguments(p)
    add_attend_arguments(
        p, "the reference's: the detailed-description prompt, every layer", exclude=("grid_shifts",)
    )
    p.set_defaults(handler=run_png)
