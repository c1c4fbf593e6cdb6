"""``python -m grounding reproduce res``: referring expression segmentation with attend-and-segment.

RefCOCO (unc), RefCOCO+ (unc) and RefCOCOg (umd) in the REFER layout (``grounding.refcoco_data``: the refs
pickle is read by the restricted unpickler, or the same content as JSON). Per sentence, as the reference
(Shengcao-Cao/groundLMM ``aas/infer_attn_res.py`` + ``aas/res.py``): the prompt ``Describe the "{}" in the
image.``, greedy generation with the attention capture; every step's map (the stop step's included) minus their
mean; the point is the argmax of the maximum over the first 8 steps' maps put on the image (``--point
first_tokens``, ``res.py``) or of the map of the token after the first "is" (``--point after_is``,
``upper_bound_res.py``); the mask is the highest-scoring proposal containing the point (``--proposals``: the
reference used Co-DETR's instance masks), or SAM's (the refiner) without proposals. One prediction file per
sentence (``OUT/predictions/<sent_id>.json``, atomic; a rerun resumes). Reports gIoU, cIoU and, with proposals,
their upper bound (per expression the proposal with the best IoU).
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
from grounding.config import AttendConfig, Peak
from grounding.refcoco_data import REFER_DATASETS, Proposals, ReferringExpression
from grounding.res_grounding import POINT_MODES

__all__ = ["RES_PROMPT", "add_res_parser", "ground_expressions", "run_res"]

#: The reference's question for one referring expression.
RES_PROMPT = 'Describe the "{}" in the image.'
SPLITS = ("val", "testA", "testB", "test")
#: ``aas/infer_attn_res.py``'s generation limit (1024 new tokens; GCG's is 512); the rest is GCG's.
RES_SETTINGS = dataclasses.replace(PAPER_SETTINGS, max_new_tokens=1024)
COLUMNS = (("giou", "gIoU"), ("ciou", "cIoU"))


def prediction_path(pred_dir: Path, sent_id: int) -> Path:
    return pred_dir / f"{sent_id}.json"


def expression_point(
    tokenizer: Any,
    stop_ids: Sequence[int],
    ids: list[int],
    rows: Any,
    view: Any,
    mode: str,
    first_tokens: int,
    peak: Peak = "image",
) -> tuple[tuple[int, int] | None, Any]:
    """The point of one response and the ``(H, W)`` map it is the argmax of (None, None without one);
    ``peak`` as ``AttendConfig.peak``."""
    import torch

    from grounding.res_grounding import row_after_word
    from grounding.segment import argmax_point, normalize_response_maps, rows_including_stop

    _, n_rows = rows_including_stop(ids, stop_ids)
    if n_rows == 0:
        return None, None
    normalised = normalize_response_maps(view.to_grid(rows[:n_rows]), n_rows)
    within = view.peak_region(peak)
    if mode == "first_tokens":
        upsampled = torch.stack([view.render(m) for m in normalised[:first_tokens]]).amax(dim=0)
        return argmax_point(upsampled, within), upsampled
    index = row_after_word([tokenizer.decode([t]) for t in ids[:n_rows]], "is")
    if index is None:
        return None, None
    upsampled = view.render(normalised[index])
    return argmax_point(upsampled, within), upsampled


def ground_expressions(
    pipeline: Any,
    expressions: Sequence[ReferringExpression],
    image_dir: Path,
    proposals: dict[int, Proposals] | None,
    mode: str,
    first_tokens: int,
) -> list[dict[str, Any]]:
    """One batch of expressions -> per expression ``{sent_id, image_id, point, proposal, segmentation}``."""
    import numpy as np
    from PIL import Image

    from grounding.coco_io import empty_rle, mask_to_rle
    from grounding.res_grounding import select_proposal

    images = []
    for e in expressions:
        with Image.open(image_dir / e.file_name) as image:
            images.append(image.convert("RGB"))
    prompts = [RES_PROMPT.format(e.sentence) for e in expressions]
    model = pipeline.model
    out = []
    for e, image, maps in zip(expressions, images, pipeline.generate_maps(images, prompts), strict=True):
        point, upsampled = expression_point(
            model.tokenizer,
            model.stop_token_ids,
            maps.ids,
            maps.rows,
            maps.view,
            mode,
            first_tokens,
            pipeline.config.peak,
        )
        chosen = None
        if point is None:
            segmentation = empty_rle(e.height, e.width)
        elif proposals is not None:
            candidates = proposals[e.image_id].masks if e.image_id in proposals else []
            chosen = select_proposal(candidates, point)
            segmentation = empty_rle(e.height, e.width) if chosen is None else candidates[chosen]
        else:
            (mask,) = pipeline.refiner(np.asarray(image), [point], [upsampled])
            segmentation = mask_to_rle(np.asarray(mask, dtype=bool))
        out.append(
            {
                "sent_id": e.sent_id,
                "image_id": e.image_id,
                "point": None if point is None else [int(point[0]), int(point[1])],
                "proposal": chosen,
                "segmentation": segmentation,
            }
        )
    return out


def _work(
    settings: AttendConfig,
    expressions: dict[int, ReferringExpression],
    image_dir: Path,
    proposals_file: Path | None,
    proposal_images: list[int] | None,
    mode: str,
    first_tokens: int,
    pred_dir: Path,
    args: argparse.Namespace,
    todo: list[int],
    progress: Any,
) -> None:
    from grounding.attend import AttendAndSegment
    from grounding.refcoco_data import load_proposals
    from grounding.segment import ThresholdRefiner

    proposals = None if proposals_file is None else load_proposals(proposals_file, proposal_images)
    model = load_for_work(args)
    refiner = ThresholdRefiner() if proposals is not None else None  # proposals: SAM is never asked
    pipeline = AttendAndSegment(model, settings, refiner=refiner, device=args.device)
    progress(0)
    for first in range(0, len(todo), settings.batch_size):
        chunk = [expressions[i] for i in todo[first : first + settings.batch_size]]
        for record in ground_expressions(pipeline, chunk, image_dir, proposals, mode, first_tokens):
            write_json_atomic(prediction_path(pred_dir, record["sent_id"]), record)
        progress(len(chunk))


def _proposal_images(path: Path | None) -> list[int] | None:
    from grounding.coco_io import read_json

    if path is None:
        return None
    data = read_json(path, "instances file of the proposals' images")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ReproduceError(
            f"{path}: expected a COCO JSON with a list 'images' (the proposals' image order)"
        )
    return [int(im["id"]) for im in data["images"]]


def upper_bound(
    expressions: Sequence[ReferringExpression], proposals: dict[int, Proposals]
) -> dict[str, Any]:
    """gIoU / cIoU of the best proposal per expression (the proposals' upper bound)."""
    from grounding.evaluate import evaluate_res
    from grounding.res_grounding import best_proposal

    best = {}
    for e in expressions:
        candidates = proposals[e.image_id].masks if e.image_id in proposals else []
        k = best_proposal(e.mask, candidates)
        if k is not None:
            best[str(e.sent_id)] = candidates[k]
    return evaluate_res({str(e.sent_id): e.mask for e in expressions}, best)


def run_res(args: argparse.Namespace) -> dict[str, Any]:
    from grounding.evaluate import evaluate_res
    from grounding.refcoco_data import REFER_SPLITS, load_proposals, load_refcoco, locate_refcoco

    if args.model is not None and args.weights is None:
        raise ReproduceError(f"--model {args.model} needs --weights")
    if args.split not in REFER_SPLITS[args.dataset]:
        raise ReproduceError(f"--split {args.split}: {args.dataset} has {list(REFER_SPLITS[args.dataset])}")
    if args.proposals is None and args.refiner is None and args.sam_checkpoint is None:
        raise ReproduceError("give --proposals FILE (the reference's Co-DETR masks), or --sam / --refiner")
    if args.proposals is not None and not args.proposals.is_file():
        raise ReproduceError(f"--proposals {args.proposals}: file not found")
    if args.first_tokens < 1:
        raise ReproduceError(f"--first-tokens must be >= 1, got {args.first_tokens}")
    if not args.images.is_dir():
        raise ReproduceError(f"--images {args.images}: not a folder")
    settings = single_map(
        attend_settings(args, RES_SETTINGS if args.run is None else base_settings(args)), "RES"
    )
    if args.proposals is None and settings.refiner == "sam" and not Path(settings.sam_checkpoint).is_file():
        raise ReproduceError(f"--sam {settings.sam_checkpoint}: file not found")
    print(f"settings: {describe(settings)}")
    files = locate_refcoco(args.refcoco, args.dataset)
    expressions = load_refcoco(files.refs, files.instances, args.split)
    by_id = {e.sent_id: e for e in expressions}
    ids = select_ids([e.sent_id for e in expressions], args)
    if args.limit is not None:
        ids = ids[: args.limit]
        print(f"--limit {args.limit}: {len(ids)} expressions only (not comparable with the paper's numbers)")
    chosen = [by_id[i] for i in ids]
    missing = sorted({e.file_name for e in chosen if not (args.images / e.file_name).is_file()})
    if missing:
        raise ReproduceError(f"--images {args.images}: {len(missing)} images not found (first: {missing[0]})")
    proposal_images = _proposal_images(args.proposal_images)
    proposals = None
    if args.proposals is not None:  # read now: a bad file stops before any model loads
        proposals = load_proposals(args.proposals, proposal_images)
    out = Path(args.out)
    recorded = {
        **model_source(args),
        "dataset": args.dataset,
        "split": args.split,
        **dataclasses.asdict(settings),
        "sam_checkpoint": absolute(settings.sam_checkpoint),
        "point": args.point,
        "first_tokens": args.first_tokens,
        "proposals": absolute(args.proposals),
    }
    pred_dir = predictions_folder(out, recorded)
    todo = pending(ids, functools.partial(prediction_path, pred_dir), "expressions")
    timing: dict[str, Any] = {"images": 0}
    if todo:
        work = functools.partial(
            _work,
            settings,
            by_id,
            args.images,
            args.proposals,
            proposal_images,
            args.point,
            args.first_tokens,
            pred_dir,
        )
        timing = run_work(args, todo, work, pred_dir, f"{args.dataset} {args.split}", settings.batch_size)

    found = read_predictions(ids, functools.partial(prediction_path, pred_dir), "segmentation")
    predictions = {str(i): segmentation for i, segmentation in found.items()}
    result = evaluate_res({str(e.sent_id): e.mask for e in chosen}, predictions)
    name = args.model or f"run {Path(args.run).name}"
    rows = [(f"measured: {name}", result)]
    if proposals is not None:
        result["upper_bound"] = upper_bound(chosen, proposals)
        rows.append(("proposals' upper bound", result["upper_bound"]))
    print_rows(
        f"{args.dataset} {args.split}, {len(chosen)} expressions ({result['n_missing']} without a prediction), "
        f"point {args.point}",
        COLUMNS,
        rows,
    )
    report = {**result, "dataset": args.dataset, "split": args.split, "model": name, "timing": timing}
    write_report(out, report)
    return report


def add_res_parser(sub: Any) -> None:
    r = sub.add_parser("res", help="referring expression segmentation on RefCOCO/+/g: gIoU, cIoU")
    add_model_arguments(r)
    r.add_argument(
        "--refcoco", required=True, type=Path, help="folder of <dataset>/refs(unc|umd).p + instances.json"
    )
    r.add_argument("--dataset", required=True, choices=sorted(REFER_DATASETS))
    r.add_argument("--split", required=True, choices=SPLITS)
    r.add_argument("--images", required=True, type=Path, help="the COCO train2014 images folder")
    r.add_argument(
        "--proposals",
        type=Path,
        default=None,
        help="instance proposals (pickle or JSON; the reference's co_detr_retrain_inference_results.pkl); "
        "without it the refiner (--sam) makes the masks",
    )
    r.add_argument(
        "--proposal-images",
        type=Path,
        default=None,
        help="COCO JSON whose 'images' order the per-image proposals (instances_refcoco_valtest.json)",
    )
    r.add_argument(
        "--point",
        choices=POINT_MODES,
        default="first_tokens",
        help="first_tokens: max over the first steps' maps (res.py); after_is: the token after the first 'is'",
    )
    r.add_argument("--first-tokens", type=int, default=8, help="steps in the max (res.py: 8)")
    r.add_argument("--out", required=True, type=Path)
    r.add_argument(
        "--limit", type=int, default=None, help="only the first N expressions (smoke tests, timing)"
    )
    add_parallel_arguments(r)
    add_attend_arguments(
        r, "the reference's: greedy, up to 1024 new tokens, every layer", exclude=("grid_shifts",)
    )
    r.set_defaults(handler=run_res)
