"""Tiny evaluation sets in the real formats, made from the synthetic shapes world (exact masks, known text).

For smoke tests of the PNG, RES and COCO-instance evaluations without the real data (DESIGN.md section 7):
each builder renders scenes of the shapes world's validation split (``datamodules.shapes.render_scene``) and
writes them in the layout the corresponding loader reads:
- :func:`png_from_shapes`: PNG narratives + COCO panoptic (every shape a thing of its kind's category, the
  rest one ``background`` stuff segment), plus ``panoptic_pred/`` holding the ground-truth panoptic PNGs as a
  perfect panoptic predictor; narratives are the shapes' detailed description, one noun segment per shape
  phrase, and with two or more shapes a plural segment naming all of them and a stuff segment.
- :func:`refcoco_from_shapes`: RefCOCO-style ``refs(unc).p`` / ``refs(umd).p`` pickles + ``instances.json``
  (one ref per shape, two sentences each, images spread over the dataset's evaluation splits), plus a
  proposals file in the reference's per-image form with ``instances_valtest.json`` giving its image order
  (per shape: the shape, the shape's top half with a higher score, and a low-scored background mask).
- :func:`coco_instances_from_shapes`: ``instances_val2017.json`` (categories = shape kinds) + ``val2017/``.
Words come from the shapes world's vocabulary, so its word tokenizer encodes them without ``<unk>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from grounding.coco_io import mask_to_rle
from grounding.png_data import PanopticImage, PNGFiles, write_png_dataset
from grounding.refcoco_data import REFER_DATASETS, REFER_SPLITS, Proposals, write_proposals, write_refcoco

__all__ = ["coco_instances_from_shapes", "png_from_shapes", "refcoco_from_shapes", "shape_categories"]

BACKGROUND_CATEGORY = {"id": 200, "name": "background", "isthing": 0}


def _scenes(n_images: int, seed: int) -> list[Any]:
    from datamodules.shapes import ShapesWorldConfig, render_scene

    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    config = ShapesWorldConfig(seed=seed)
    return [render_scene(seed, config, split="val", index=i) for i in range(n_images)]


def shape_categories() -> list[dict[str, Any]]:
    """One COCO category per shape kind (ids 1.. in the shapes world's order), all things."""
    from datamodules.config import KINDS

    return [
        {"id": k + 1, "name": kind, "supercategory": "shape", "isthing": 1} for k, kind in enumerate(KINDS)
    ]


def _category_id(kind: str) -> int:
    return next(c["id"] for c in shape_categories() if c["name"] == kind)


def png_from_shapes(root: str | Path, n_images: int = 4, seed: int = 0) -> PNGFiles:
    """Write a PNG evaluation set (see the module docstring) under ``root``; returns its files."""
    from datamodules.shapes import NUMBER_WORDS

    images, narratives = [], []
    for i, scene in enumerate(_scenes(n_images, seed)):
        image_id = i + 1
        width, height = scene.image.size
        background = 1000 * image_id
        id_map = np.full((height, width), background, dtype=np.int64)
        segments = {background: BACKGROUND_CATEGORY["id"]}
        ordered = scene.ordered
        ids = []
        for k, shape in enumerate(ordered):
            segment_id = background + k + 1
            id_map[shape.mask] = segment_id
            segments[segment_id] = _category_id(shape.kind)
            ids.append(segment_id)
        parts: list[dict[str, Any]] = []
        for k, shape in enumerate(ordered):
            lead = "" if k == 0 else " "
            phrase = shape.phrase[0].upper() + shape.phrase[1:]
            parts.append(_segment(lead + phrase, [ids[k]], plural=False))
            parts.append(_segment(f" is {shape.position}.", [], plural=False))
        if len(ordered) >= 2:
            parts.append(_segment(f" {NUMBER_WORDS[len(ordered)].capitalize()} shapes", ids, plural=True))
            parts.append(_segment(" are in the", [], plural=False))
            parts.append(_segment(" image", [background], plural=False))
            parts.append(_segment(".", [], plural=False))
        narratives.append(
            {"image_id": str(image_id), "caption": "".join(p["utterance"] for p in parts), "segments": parts}
        )
        images.append(PanopticImage(image_id, f"{image_id:012d}.jpg", scene.image, id_map, segments))
    files = write_png_dataset(root, images, [*shape_categories(), BACKGROUND_CATEGORY], narratives)
    predictions = Path(root) / "panoptic_pred"
    predictions.mkdir(parents=True, exist_ok=True)
    for png in files.panoptic_dir.iterdir():
        (predictions / png.name).write_bytes(png.read_bytes())
    return files


def _segment(utterance: str, ids: list[int], plural: bool) -> dict[str, Any]:
    return {"utterance": utterance, "segment_ids": [str(s) for s in ids], "plural": plural, "noun": bool(ids)}


def refcoco_from_shapes(root: str | Path, n_images: int = 6, seed: int = 0) -> Path:
    """Write RefCOCO, RefCOCO+ and RefCOCOg sets, images and proposals (see the module docstring) under ``root``.

    Layout: ``root/<dataset>/refs(...).p`` + ``instances.json``, ``root/train2014/<file_name>``,
    ``root/proposals.pkl`` aligned with the images of ``root/instances_valtest.json``.
    """
    root = Path(root)
    (root / "train2014").mkdir(parents=True, exist_ok=True)
    images, annotations, refs_by_image, proposals = [], [], [], []
    for i, scene in enumerate(_scenes(n_images, seed)):
        image_id = 100 + i
        width, height = scene.image.size
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        scene.image.convert("RGB").save(root / "train2014" / file_name, quality=95)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        refs, masks, scores = [], [], []
        for k, shape in enumerate(scene.ordered):
            ann_id = 1000 * image_id + k
            rle = mask_to_rle(shape.mask)
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": _category_id(shape.kind),
                    "segmentation": rle,
                    "area": int(shape.mask.sum()),
                    "bbox": _bbox(shape.mask),
                    "iscrowd": 0,
                }
            )
            refs.append((ann_id, shape))
            top_half = shape.mask.copy()
            rows = np.nonzero(shape.mask.any(axis=1))[0]
            top_half[rows[len(rows) // 2] :] = False
            masks += [rle, mask_to_rle(top_half)]
            scores += [0.8 - 0.01 * k, 0.9 - 0.01 * k]
        covered = np.any([s.mask for s in scene.shapes], axis=0)
        masks.append(mask_to_rle(~covered))
        scores.append(0.3)
        proposals.append(Proposals(masks=masks, scores=scores))
        refs_by_image.append(refs)
    categories = [{k: v for k, v in c.items() if k != "isthing"} for c in shape_categories()]
    instances = {"images": images, "annotations": annotations, "categories": categories}
    for dataset in REFER_DATASETS:
        splits = REFER_SPLITS[dataset]
        refs = []
        for i, image_refs in enumerate(refs_by_image):
            for ann_id, shape in image_refs:
                ref_id = len(refs) + 1
                sentences = [f"{shape.colour} {shape.kind}", f"{shape.size} {shape.colour} {shape.kind}"]
                refs.append(
                    {
                        "ref_id": ref_id,
                        "ann_id": ann_id,
                        "image_id": images[i]["id"],
                        "split": splits[i % len(splits)],
                        "category_id": _category_id(shape.kind),
                        "file_name": f"{Path(images[i]['file_name']).stem}_{ann_id}.jpg",
                        "sent_ids": [10 * ref_id + s for s in range(len(sentences))],
                        "sentences": [
                            {"sent_id": 10 * ref_id + s, "sent": text, "raw": text, "tokens": text.split()}
                            for s, text in enumerate(sentences)
                        ],
                    }
                )
        write_refcoco(root, dataset, refs, instances)
    write_proposals(root / "proposals.pkl", proposals)
    (root / "instances_valtest.json").write_text(json.dumps({"images": images}), encoding="utf-8")
    return root


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]


def coco_instances_from_shapes(root: str | Path, n_images: int = 4, seed: int = 0) -> Path:
    """Write ``root/annotations/instances_val2017.json`` and ``root/val2017/``; returns the JSON's path."""
    from grounding.coco_instances import write_coco_instances

    root = Path(root)
    (root / "val2017").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, scene in enumerate(_scenes(n_images, seed)):
        image_id = i + 1
        file_name = f"{image_id:012d}.jpg"
        scene.image.convert("RGB").save(root / "val2017" / file_name, quality=95)
        images.append(
            {"id": image_id, "file_name": file_name, "height": scene.image.height, "width": scene.image.width}
        )
        annotations += [
            {"image_id": image_id, "category_id": _category_id(s.kind), "segmentation": s.mask}
            for s in scene.ordered
        ]
    categories = [{k: v for k, v in c.items() if k != "isthing"} for c in shape_categories()]
    return write_coco_instances(
        root / "annotations" / "instances_val2017.json", images, annotations, categories
    )
