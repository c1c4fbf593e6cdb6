"""The paper's GCG table in one command: ``python -m grounding.reproduce gcg --model {llava-1.5,difflmm,hf-llava,
hf-llava-next} --weights ... --sam CHECKPOINT --granddf DIR --split {val,test} --out DIR --text-model PATH``.

It reads GranD-f's evaluation split in GLaMM's layout (``DIR/GranDf/annotations/val_test/{split}_gcg_coco_mask_gt
.json`` and ``{split}_gcg_coco_caption_gt.json``, images in ``DIR/GranDf_HA_images/val_test/``), loads the model
from its released weights, runs batched attend-and-segment (greedy, up to 512 new tokens, SAM ViT-H point
prompts) with a progress bar, writes one GLaMM-format prediction per image (``OUT/predictions/<image_id>.json``,
written atomically), evaluates them with ``grounding.evaluate.evaluate_gcg`` (AP50, mIoU, mask recall,
METEOR, CIDEr) and prints the measured numbers beside the paper's (DESIGN.md section 1). Rerunning the same
command resumes: images whose prediction file exists are not redone, and a run whose settings differ from
the ones recorded in ``OUT/settings.json`` stops instead of mixing predictions. ``granddf-from-shapes`` lays
a shapes-world validation set out as GranD-f, for smoke tests of the whole path without the real data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grounding.cli import add_grouping_arguments
from grounding.coco_io import GCGGroundTruth, GroundingInputError, gcg_prediction_path, read_json

__all__ = ["PAPER", "GranDfSplit", "granddf_from_shapes", "locate_granddf", "main"]

MODELS = ("llava-1.5", "difflmm", "hf-llava", "hf-llava-next")
SPLITS = ("val", "test")
DEFAULT_PROMPT = "Describe the image in detail."

#: DESIGN.md section 1 (GranD-f GCG, GLaMM's protocol), in percent: row -> (label, split -> metric -> value).
PAPER: dict[str, tuple[str, dict[str, dict[str, float]]]] = {
    "glamm": (
        "GLaMM (grounding supervision)",
        {
            "val": {"meteor": 16.2, "miou": 66.3, "recall": 41.8},
            "test": {"meteor": 15.8, "miou": 65.6, "recall": 40.8},
        },
    ),
    "llava-1.5": (
        "LLaVA-1.5-7B + a&s",
        {
            "val": {"meteor": 18.6, "miou": 58.0, "recall": 44.2},
            "test": {"meteor": 18.3, "miou": 59.3, "recall": 42.7},
        },
    ),
    "llava-next": (
        "LLaVA-NeXT + a&s",
        {
            "val": {"meteor": 15.6, "miou": 64.5, "recall": 45.6},
            "test": {"meteor": 15.6, "miou": 65.6, "recall": 44.2},
        },
    ),
    "difflmm": (
        "DiffLMM-7B + a&s",
        {
            "val": {"meteor": 18.4, "miou": 61.2, "recall": 46.6},
            "test": {"meteor": 18.2, "miou": 62.1, "recall": 44.2},
        },
    ),
}
#: Which paper row each --model reproduces (hf-llava is LLaVA-1.5 converted to transformers' format).
PAPER_ROW = {
    "llava-1.5": "llava-1.5",
    "hf-llava": "llava-1.5",
    "hf-llava-next": "llava-next",
    "difflmm": "difflmm",
}
#: Settings that change predictions; a resumed run must repeat them.
SETTINGS_KEYS = (
    "model",
    "weights",
    "base",
    "sd",
    "clip",
    "split",
    "prompt",
    "max_new_tokens",
    "refiner",
    "sam",
    "sam_type",
    "spacy_model",
    "combine",
    "phrase_tokens",
    "layers",
    "template",
    "dtype",
    "diffusion_noise",
)

ANNOTATIONS = Path("GranDf") / "annotations" / "val_test"
IMAGES = Path("GranDf_HA_images") / "val_test"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class ReproduceError(Exception):
    """A problem with the inputs; reported as one ``error:`` line (exit status 2)."""


# ------------------------------------------------------------------------------------------------ GranD-f


@dataclass
class GranDfSplit:
    """One GranD-f evaluation split: the two GT files, and the image file of every caption-GT image id."""

    split: str
    mask_file: Path
    caption_file: Path
    image_dir: Path
    images: dict[Any, Path]


def locate_granddf(root: str | Path, split: str) -> GranDfSplit:
    """Find GLaMM's GranD-f files under ``root`` (the folder holding ``GranDf/`` and ``GranDf_HA_images/``).

    Image files come from the caption GT's ``file_name`` when present, else ``<id>.jpg`` (GLaMM's infer.py names
    predictions after the image file's stem, which is the GT image id).
    """
    root = Path(root)
    if split not in SPLITS:
        raise ReproduceError(f"--split {split!r} is not one of {SPLITS}")
    annotations = root / ANNOTATIONS
    image_dir = root / IMAGES
    mask_file = annotations / f"{split}_gcg_coco_mask_gt.json"
    caption_file = annotations / f"{split}_gcg_coco_caption_gt.json"
    for path in (mask_file, caption_file, image_dir):
        if not path.exists():
            raise ReproduceError(
                f"--granddf {root}: {path.relative_to(root)} not found (GLaMM's GranD-f layout)"
            )
    captions = read_json(caption_file, "GT caption (COCO captions)")
    if not isinstance(captions, dict) or not isinstance(captions.get("images"), list):
        raise ReproduceError(f"{caption_file}: expected a COCO captions JSON with 'images'")
    images: dict[Any, Path] = {}
    for entry in captions["images"]:
        image_id = entry.get("id")
        candidates = [image_dir / str(entry["file_name"])] if entry.get("file_name") else []
        candidates += [image_dir / f"{image_id}{suffix}" for suffix in IMAGE_SUFFIXES]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ReproduceError(
                f"{image_dir}: no image file for GT image {image_id!r} (tried {candidates[0].name})"
            )
        images[image_id] = found
    return GranDfSplit(split, mask_file, caption_file, image_dir, images)


def granddf_from_shapes(world: str | Path, root: str | Path, quality: int = 95) -> Path:
    """Lay a shapes world's GCG validation set out as GranD-f under ``root`` (both splits hold the same images).

    Image ids become the file stems (GranD-f style string ids) and images JPEG files, as in GranDf_HA_images.
    """
    from PIL import Image

    world, root = Path(world), Path(root)
    masks = read_json(world / "val" / "gcg_masks.json", "shapes GCG masks")
    captions = read_json(world / "val" / "gcg_captions.json", "shapes GCG captions")
    (root / IMAGES).mkdir(parents=True, exist_ok=True)
    (root / ANNOTATIONS).mkdir(parents=True, exist_ok=True)
    new_id = {}
    for entry in masks["images"]:
        stem = Path(entry["file_name"]).stem
        new_id[entry["id"]] = stem
        with Image.open(world / "val" / "images" / entry["file_name"]) as image:
            image.convert("RGB").save(root / IMAGES / f"{stem}.jpg", quality=quality)

    def convert(data: dict) -> dict:
        images = [{**e, "id": new_id[e["id"]], "file_name": f"{new_id[e['id']]}.jpg"} for e in data["images"]]
        annotations = [{**a, "image_id": new_id[a["image_id"]]} for a in data["annotations"]]
        return {**data, "images": images, "annotations": annotations}

    for split in SPLITS:
        for name, data in (("mask", masks), ("caption", captions)):
            path = root / ANNOTATIONS / f"{split}_gcg_coco_{name}_gt.json"
            path.write_text(json.dumps(convert(data)), encoding="utf-8")
    return root


def _subset(gt: GCGGroundTruth, ids: Sequence[Any]) -> GCGGroundTruth:
    keep = set(ids)
    return GCGGroundTruth(
        images={k: v for k, v in gt.images.items() if k in keep},
        eval_ids=[i for i in gt.eval_ids if i in keep],
    )


# ------------------------------------------------------------------------------------------------ models


def _dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_groundable_model(args: argparse.Namespace) -> Any:
    """The ``GroundableModel`` for ``--model`` (the one place this CLI imports ``lmm``, lazily)."""
    dtype = _dtype(args.dtype, args.device)
    common = dict(dtype=dtype, device=args.device, attn_implementation=args.attn)
    if args.model in ("hf-llava", "hf-llava-next"):
        from grounding.hf_models import load_hf_llava

        kind = "llava" if args.model == "hf-llava" else "llava_next"
        try:
            return load_hf_llava(args.weights, kind=kind, template=args.template, **common)
        except (FileNotFoundError, ValueError) as err:
            raise ReproduceError(str(err).splitlines()[0]) from None
    from lmm.llava_checkpoint import CheckpointError, LlavaGrounding, load_difflmm, load_llava15

    try:
        if args.model == "llava-1.5":
            return LlavaGrounding(load_llava15(args.weights, clip=args.clip, **common))
        model = load_difflmm(
            args.weights, base=args.base, sd=args.sd, clip=args.clip, noise=args.diffusion_noise, **common
        )
    except (CheckpointError, FileNotFoundError) as err:
        raise ReproduceError(str(err).splitlines()[0]) from None
    return LlavaGrounding(model)


def _refiner(args: argparse.Namespace) -> Any:
    from grounding.segment import build_refiner

    if args.refiner == "sam":
        if args.sam is None:
            raise ReproduceError("--refiner sam (the paper's) needs --sam CHECKPOINT (sam_vit_h_4b8939.pth)")
        return build_refiner("sam", checkpoint=args.sam, model_type=args.sam_type, device=args.device)
    return build_refiner("threshold")


# ------------------------------------------------------------------------------------------------ run


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    values = {key: getattr(args, key) for key in SETTINGS_KEYS}
    return {k: (str(v.resolve()) if isinstance(v, Path) else v) for k, v in values.items()}


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to add predictions made with other settings to a folder that already holds some."""
    path = out / "settings.json"
    has_predictions = any((out / "predictions").glob("*.json"))
    if path.is_file() and has_predictions:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        for key in SETTINGS_KEYS:
            if recorded.get(key) != settings[key]:
                raise ReproduceError(
                    f"{out} holds predictions made with {key}={recorded.get(key)!r}, this run has "
                    f"{settings[key]!r}; use another --out (or delete {out / 'predictions'})"
                )
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def _write_atomic(path: Path, prediction: Any) -> None:
    from grounding.coco_io import write_gcg_prediction

    tmp = path.with_name(f".{path.name}.tmp")
    write_gcg_prediction(tmp, prediction)
    os.replace(tmp, path)


def ground_images(args: argparse.Namespace, data: GranDfSplit, ids: Sequence[Any], pred_dir: Path) -> dict:
    """Ground every image of ``ids`` without a prediction file; returns timing of the work done."""
    from PIL import Image
    from tqdm import tqdm

    from grounding.attend import AttendAndSegment

    todo = [i for i in ids if not gcg_prediction_path(pred_dir, i).is_file()]
    print(
        f"{len(ids)} images in GranD-f {data.split}: {len(ids) - len(todo)} already done, {len(todo)} to ground"
    )
    if not todo:
        return {"images": 0}
    refiner = _refiner(args)
    model = load_groundable_model(args)
    pipeline = AttendAndSegment(
        model,
        refiner,
        spacy_model=args.spacy_model,
        combine=args.combine,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        phrase_tokens=args.phrase_tokens,
        layers=args.layers,
    )
    pred_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tqdm(total=len(todo), desc=f"grounding {data.split}", unit="img") as bar:
        for first in range(0, len(todo), args.batch_size):
            chunk = todo[first : first + args.batch_size]
            pictures = []
            for image_id in chunk:
                with Image.open(data.images[image_id]) as image:
                    pictures.append(image.convert("RGB"))
            for image_id, result in zip(chunk, pipeline(pictures, args.prompt), strict=True):
                _write_atomic(gcg_prediction_path(pred_dir, image_id), result.to_gcg(image_id))
            bar.update(len(chunk))
    seconds = time.perf_counter() - start
    rate = 60.0 * len(todo) / max(seconds, 1e-9)
    timing = {
        "images": len(todo),
        "seconds": seconds,
        "images_per_minute": rate,
        "batch_size": args.batch_size,
    }
    peak = ""
    if str(args.device).startswith("cuda"):
        import torch

        timing["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30  # weights included
        peak = f", peak GPU memory {timing['peak_gpu_gib']:.1f} GiB"
    print(
        f"grounded {len(todo)} images in {seconds:.1f} s ({rate:.2f} images/min at batch {args.batch_size}{peak})"
    )
    return timing


def _fmt(value: float | None, scale: float = 100.0) -> str:
    return "-" if value is None else f"{value * scale:.1f}"


def print_table(result: dict[str, Any], model: str, split: str) -> None:
    """Measured metrics (percent; CIDEr as pycocoevalcap's raw x100) beside the paper's rows."""
    ours_row = PAPER[PAPER_ROW[model]]
    rows = [
        (
            "measured: " + model,
            {k: result.get(k) for k in ("ap50", "miou", "recall", "meteor", "cider")},
            100.0,
        )
    ]
    rows += [(f"paper: {label}", values[split], 1.0) for label, values in (ours_row, PAPER["glamm"])]
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

    if args.model != "llava-1.5" and args.model != "difflmm" and args.clip is not None:
        raise ReproduceError(
            f"--clip is for llava-1.5 and difflmm; {args.model} folders hold their own tower"
        )
    if args.model != "difflmm" and (args.base is not None or args.sd is not None):
        raise ReproduceError("--base and --sd are DiffLMM's (base Vicuna and SD-1.5 folders)")
    if not Path(args.text_model).is_dir():
        raise ReproduceError(
            f"--text-model {args.text_model}: not a local model folder (bert-base-uncased for GLaMM)"
        )
    if args.refiner == "sam" and (args.sam is None or not Path(args.sam).is_file()):
        raise ReproduceError(
            "--refiner sam (the paper's) needs --sam CHECKPOINT (sam_vit_h_4b8939.pth)"
            if args.sam is None
            else f"--sam {args.sam}: file not found"
        )
    if not args.no_caption_metrics and shutil.which("java") is None:
        raise ReproduceError(
            "java not found: METEOR/CIDEr need it (install a JRE or pass --no-caption-metrics)"
        )
    if args.spacy_model is None:
        from grounding.cli import default_spacy_model

        args.spacy_model = default_spacy_model()  # resolved now, so settings.json records the real one
    data = locate_granddf(args.granddf, args.split)
    gt = load_gcg_ground_truth(data.mask_file, data.caption_file)
    ids = list(gt.eval_ids)
    if args.limit is not None:
        ids = ids[: args.limit]
        gt = _subset(gt, ids)
        print(
            f"--limit {args.limit}: evaluating {len(ids)} images only (not comparable with the paper's numbers)"
        )
    out = Path(args.out)
    _check_settings(out, _settings(args))
    pred_dir = out / "predictions"
    timing = ground_images(args, data, ids, pred_dir)

    predictions, _missing = load_gcg_predictions(pred_dir, ids) if pred_dir.is_dir() else ({}, ids)
    result = evaluate_gcg(gt, predictions, args.text_model, caption_metrics=not args.no_caption_metrics)
    print_table(result, args.model, args.split)
    label, values = PAPER[PAPER_ROW[args.model]]
    report = {
        **result,
        "split": args.split,
        "model": args.model,
        "paper": {label: values[args.split], PAPER["glamm"][0]: PAPER["glamm"][1][args.split]},
        "timing": timing,
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    print(f"wrote {out / 'metrics.json'}")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m grounding.reproduce", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser(
        "gcg", help="GranD-f grounded conversation generation, from weights to the paper's table"
    )
    g.add_argument("--model", required=True, choices=MODELS)
    g.add_argument(
        "--weights",
        required=True,
        type=Path,
        help="llava-1.5: the llava-v1.5-7b folder; difflmm: the LoRA run folder (adapter + non_lora_trainables.bin); "
        "hf-llava / hf-llava-next: a llava-hf folder",
    )
    g.add_argument("--base", type=Path, default=None, help="difflmm: the base vicuna-7b-v1.5 folder")
    g.add_argument("--sd", type=Path, default=None, help="difflmm: the stable-diffusion-v1-5 folder")
    g.add_argument(
        "--clip", type=Path, default=None, help="llava-1.5 / difflmm: the clip-vit-large-patch14-336 folder"
    )
    g.add_argument("--sam", type=Path, default=None, help="SAM checkpoint (sam_vit_h_4b8939.pth)")
    g.add_argument("--sam-type", default="vit_h", help="vit_h (the paper) | vit_l | vit_b")
    g.add_argument(
        "--refiner", choices=("sam", "threshold"), default="sam", help="threshold: no SAM (smoke tests only)"
    )
    g.add_argument("--granddf", required=True, type=Path, help="folder holding GranDf/ and GranDf_HA_images/")
    g.add_argument("--split", required=True, choices=SPLITS)
    g.add_argument("--out", required=True, type=Path)
    g.add_argument(
        "--text-model", required=True, type=Path, help="phrase-similarity encoder folder (bert-base-uncased)"
    )
    g.add_argument("--no-caption-metrics", action="store_true", help="skip METEOR/CIDEr (no Java needed)")
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--spacy-model", default=None, help="default: en_core_web_lg if installed (the paper's)")
    add_grouping_arguments(g)
    g.add_argument(
        "--template", choices=("vicuna_v1", "chat"), default="vicuna_v1", help="hf models: prompt format"
    )
    g.add_argument("--diffusion-noise", choices=("stochastic", "fixed"), default="stochastic", help="difflmm")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    g.add_argument("--attn", default="sdpa", help="attention implementation of the language model")
    g.add_argument("--limit", type=int, default=None, help="only the first N images (smoke tests, timing)")
    g.set_defaults(run=run_gcg)

    s = sub.add_parser("granddf-from-shapes", help="lay a shapes world's GCG val set out as GranD-f")
    s.add_argument(
        "--world", required=True, type=Path, help="a shapes world folder (python -m datamodules.shapes)"
    )
    s.add_argument("--out", required=True, type=Path)
    s.set_defaults(run=lambda a: print(f"GranD-f layout written to {granddf_from_shapes(a.world, a.out)}"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if getattr(args, "device", "unset") is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if getattr(args, "dtype", None) == "auto":
        args.dtype = str(_dtype("auto", args.device)).removeprefix("torch.")
    try:
        args.run(args)
    except (ReproduceError, GroundingInputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
