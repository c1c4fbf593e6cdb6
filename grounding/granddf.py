"""GranD-f, the GCG benchmark of the paper's main table: its files in GLaMM's layout, and the paper's numbers.

``locate_granddf`` finds an evaluation split (``DIR/GranDf/annotations/val_test/{split}_gcg_coco_mask_gt.json``
and ``{split}_gcg_coco_caption_gt.json``, images in ``DIR/GranDf_HA_images/val_test/``);
``granddf_from_shapes`` lays a shapes-world validation set out the same way, for tests of the whole path
without the real data. ``PAPER`` holds DESIGN.md section 1's rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grounding.coco_io import GroundingInputError, read_json

SPLITS = ("val", "test")

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

ANNOTATIONS = Path("GranDf") / "annotations" / "val_test"
IMAGES = Path("GranDf_HA_images") / "val_test"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


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
        raise GroundingInputError(f"--split {split!r} is not one of {SPLITS}")
    annotations = root / ANNOTATIONS
    image_dir = root / IMAGES
    mask_file = annotations / f"{split}_gcg_coco_mask_gt.json"
    caption_file = annotations / f"{split}_gcg_coco_caption_gt.json"
    for path in (mask_file, caption_file, image_dir):
        if not path.exists():
            raise GroundingInputError(
                f"--granddf {root}: {path.relative_to(root)} not found (GLaMM's GranD-f layout)"
            )
    captions = read_json(caption_file, "GT caption (COCO captions)")
    if not isinstance(captions, dict) or not isinstance(captions.get("images"), list):
        raise GroundingInputError(f"{caption_file}: expected a COCO captions JSON with 'images'")
    images: dict[Any, Path] = {}
    for entry in captions["images"]:
        image_id = entry.get("id")
        candidates = [image_dir / str(entry["file_name"])] if entry.get("file_name") else []
        candidates += [image_dir / f"{image_id}{suffix}" for suffix in IMAGE_SUFFIXES]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise GroundingInputError(
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
