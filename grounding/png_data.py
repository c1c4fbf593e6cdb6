"""Panoptic narrative grounding data as attend-and-segment evaluates it: narratives, COCO panoptic masks, predictions.

Files (the layout the reference's scripts use, ``aas/png.py`` and ``aas/infer_attn_png.py`` in Shengcao-Cao/
groundLMM, after F-LMM): ``png_coco_val2017.json``, a list of narratives ``{image_id, caption, segments: [{
utterance, segment_ids, plural, noun}]}`` whose utterances concatenate to the caption; COCO panoptic val2017
(``panoptic_val2017.json`` with ``images``, ``annotations[].segments_info`` and ``categories[].isthing``, plus
one PNG per image whose colour encodes the segment id as ``R + 256 G + 256^2 B``); the COCO images.

One sample is one narrative (the reference names its outputs by the narrative's index in the file). The
evaluated segments are those with a non-empty ``segment_ids``; each one's ground truth is the union of its
segments. Thing/stuff and plural follow the reference (``aas/png.py``): ``plural`` is the annotation's flag,
``isthing`` is the category's flag for a single segment and true for several (F-LMM's PNGDataset instead
takes the thing flag from the category only when ``plural`` is false; they differ only for a plural flag on a
single segment). The predicted mask of a segment is the predicted panoptic segment under its point, read from
a folder of panoptic prediction PNGs named like the images (``<stem>.png``, as OpenSeeD writes them).

:func:`write_png_dataset` writes the same layout from in-memory images and id maps (tests build tiny sets
from the shapes world with it). Malformed input raises a one-line :class:`GroundingInputError` naming the
file, before any image is decoded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from grounding.coco_io import (
    RLE,
    GroundingInputError,
    PNGImage,
    PNGPhrase,
    mask_to_rle,
    read_json,
    rgb_to_panoptic_id,
)

__all__ = [
    "PNGFiles",
    "PNGNarrative",
    "PNGSegment",
    "PanopticImage",
    "gt_masks",
    "load_png_narratives",
    "locate_png",
    "panoptic_id_to_rgb",
    "panoptic_prediction_path",
    "png_ground_truth",
    "png_predictions_by_image",
    "read_panoptic_ids",
    "segment_at",
    "write_png_dataset",
]


@dataclass(frozen=True)
class PNGFiles:
    """Where a PNG evaluation's files are (see :func:`locate_png`)."""

    narratives: Path
    panoptic_json: Path
    panoptic_dir: Path
    image_dir: Path


def locate_png(root: str | Path) -> PNGFiles:
    """The reference's layout under ``root`` (its ``data/coco``): ``annotations/png_coco_val2017.json``,
    ``annotations/panoptic_val2017.json``, ``annotations/panoptic_val2017/`` and ``val2017/``."""
    root = Path(root)
    files = PNGFiles(
        narratives=root / "annotations" / "png_coco_val2017.json",
        panoptic_json=root / "annotations" / "panoptic_val2017.json",
        panoptic_dir=root / "annotations" / "panoptic_val2017",
        image_dir=root / "val2017",
    )
    for path in (files.narratives, files.panoptic_json, files.panoptic_dir, files.image_dir):
        if not path.exists():
            raise GroundingInputError(
                f"{root}: {path.relative_to(root)} not found (the PNG layout of data/coco)"
            )
    return files


@dataclass(frozen=True)
class PNGSegment:
    """One segment of a narrative: an utterance and the panoptic segments it names (none for most words)."""

    utterance: str
    segment_ids: tuple[int, ...]
    plural: bool
    noun: bool
    #: Thing (True) or stuff; None for a segment that is not evaluated.
    isthing: bool | None

    @property
    def evaluated(self) -> bool:
        return bool(self.segment_ids)


@dataclass(frozen=True)
class PNGNarrative:
    """One narrative: the sample of teacher-forced PNG grounding."""

    #: Position in the narratives file (the reference's sample name, ``f"{index:012d}"``).
    index: int
    image_id: int
    #: The COCO image file (``val2017/<file_name>``) and the GT panoptic PNG (``panoptic_val2017/<png>``).
    file_name: str
    panoptic_file: str
    height: int
    width: int
    caption: str
    segments: tuple[PNGSegment, ...]

    @property
    def evaluated(self) -> list[int]:
        """Indices of the segments that are evaluated (non-empty ``segment_ids``), in order."""
        return [k for k, s in enumerate(self.segments) if s.evaluated]


def _as_int(value: Any, where: str, what: str) -> int:
    if isinstance(value, bool):
        raise GroundingInputError(f"{where}: {what} must be an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise GroundingInputError(f"{where}: {what} must be an integer, got {value!r}") from None


def _mapping(obj: Any, where: str, keys: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise GroundingInputError(f"{where}: expected an object with {', '.join(keys)}")
    for key in keys:
        if key not in obj:
            raise GroundingInputError(f"{where}: missing required key {key!r}")
    return obj


def _list(obj: Any, where: str) -> list[Any]:
    if not isinstance(obj, list):
        raise GroundingInputError(f"{where}: expected a list, got {type(obj).__name__}")
    return obj


def load_png_narratives(
    narratives_file: str | Path,
    panoptic_json: str | Path,
    panoptic_dir: str | Path | None = None,
    image_dir: str | Path | None = None,
) -> list[PNGNarrative]:
    """Read and check PNG narratives against COCO panoptic; nothing is decoded yet.

    ``panoptic_dir`` (default: ``panoptic_json`` without ``.json``, as the reference) and ``image_dir``, when
    given, are checked to hold every file a narrative needs.
    """
    narratives_file, panoptic_json = Path(narratives_file), Path(panoptic_json)
    data = read_json(narratives_file, "PNG narratives")
    if isinstance(data, Mapping) and "annotations" in data:
        data = data["annotations"]
    if not isinstance(data, list):
        raise GroundingInputError(f"{narratives_file}: expected a list of narratives")
    pan = _mapping(
        read_json(panoptic_json, "COCO panoptic"), str(panoptic_json), ("images", "annotations", "categories")
    )
    src = str(panoptic_json)
    isthing = {}
    for k, cat in enumerate(_list(pan["categories"], f"{src}: categories")):
        cat = _mapping(cat, f"{src}: categories[{k}]", ("id",))
        isthing[_as_int(cat["id"], f"{src}: categories[{k}]", "id")] = bool(cat.get("isthing", 0))
    images = {}
    for k, im in enumerate(_list(pan["images"], f"{src}: images")):
        where = f"{src}: images[{k}]"
        im = _mapping(im, where, ("id", "file_name", "height", "width"))
        images[_as_int(im["id"], where, "id")] = im
    segments_info: dict[int, dict[int, int]] = {}
    png_names: dict[int, str] = {}
    for k, ann in enumerate(_list(pan["annotations"], f"{src}: annotations")):
        where = f"{src}: annotations[{k}]"
        ann = _mapping(ann, where, ("image_id", "file_name", "segments_info"))
        iid = _as_int(ann["image_id"], where, "image_id")
        png_names[iid] = str(ann["file_name"])
        info = {}
        for j, seg in enumerate(_list(ann["segments_info"], f"{where}.segments_info")):
            seg = _mapping(seg, f"{where}.segments_info[{j}]", ("id", "category_id"))
            category = _as_int(seg["category_id"], f"{where}.segments_info[{j}]", "category_id")
            if category not in isthing:
                raise GroundingInputError(
                    f"{where}.segments_info[{j}]: category {category} is not in categories"
                )
            info[_as_int(seg["id"], f"{where}.segments_info[{j}]", "id")] = category
        segments_info[iid] = info
    pan_dir = Path(panoptic_dir) if panoptic_dir is not None else panoptic_json.with_suffix("")

    out = []
    for n, narr in enumerate(data):
        where = f"{narratives_file}: narratives[{n}]"
        narr = _mapping(narr, where, ("image_id", "segments"))
        iid = _as_int(narr["image_id"], where, "image_id")
        if iid not in images or iid not in segments_info:
            raise GroundingInputError(
                f"{where}: image {iid} has no image or annotation entry in {panoptic_json}"
            )
        segments = []
        for j, seg in enumerate(_list(narr["segments"], f"{where}.segments")):
            sw = f"{where}.segments[{j}]"
            seg = _mapping(seg, sw, ("utterance", "segment_ids"))
            if not isinstance(seg["utterance"], str):
                raise GroundingInputError(f"{sw}: 'utterance' must be a string")
            ids = tuple(
                _as_int(s, sw, "a segment id") for s in _list(seg["segment_ids"], f"{sw}.segment_ids")
            )
            for s in ids:
                if s not in segments_info[iid]:
                    raise GroundingInputError(
                        f"{sw}: segment id {s} is not in image {iid}'s panoptic segments_info"
                    )
            if ids and not seg["utterance"].strip():
                raise GroundingInputError(
                    f"{sw}: an evaluated segment needs a non-empty utterance (its tokens)"
                )
            thing = None
            if ids:
                thing = isthing[segments_info[iid][ids[0]]] if len(ids) == 1 else True
            segments.append(
                PNGSegment(
                    utterance=seg["utterance"],
                    segment_ids=ids,
                    plural=bool(seg.get("plural", False)),
                    noun=bool(seg.get("noun", bool(ids))),
                    isthing=thing,
                )
            )
        caption = "".join(s.utterance for s in segments)
        if "caption" in narr and not isinstance(narr["caption"], str):
            raise GroundingInputError(f"{where}: 'caption' must be a string")
        image = images[iid]
        narrative = PNGNarrative(
            index=n,
            image_id=iid,
            file_name=str(image["file_name"]),
            panoptic_file=png_names[iid],
            height=_as_int(image["height"], f"{src}: image {iid}", "height"),
            width=_as_int(image["width"], f"{src}: image {iid}", "width"),
            caption=str(narr.get("caption", caption)),
            segments=tuple(segments),
        )
        if not (pan_dir / narrative.panoptic_file).is_file():
            raise GroundingInputError(f"{where}: panoptic PNG {pan_dir / narrative.panoptic_file} not found")
        if image_dir is not None and not (Path(image_dir) / narrative.file_name).is_file():
            raise GroundingInputError(f"{where}: image {Path(image_dir) / narrative.file_name} not found")
        out.append(narrative)
    return out


def read_panoptic_ids(path: str | Path) -> np.ndarray:
    """A panoptic PNG as an ``(H, W)`` int64 map of segment ids (``R + 256 G + 256^2 B``)."""
    try:
        with Image.open(path) as im:
            return rgb_to_panoptic_id(np.asarray(im.convert("RGB")))
    except (OSError, ValueError) as err:
        raise GroundingInputError(f"{path}: cannot read panoptic PNG ({err})") from None


def panoptic_id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Inverse of :func:`~grounding.coco_io.rgb_to_panoptic_id`: ``(H, W)`` ids -> ``(H, W, 3)`` uint8 colours."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= 256**3:
        raise ValueError("panoptic segment ids must be in [0, 256**3)")
    return np.stack([ids % 256, ids // 256 % 256, ids // 256**2], axis=-1).astype(np.uint8)


def panoptic_prediction_path(folder: str | Path, image_file_name: str) -> Path:
    """The prediction PNG of an image: ``folder/<image file stem>.png`` (the reference's ``.jpg -> .png``)."""
    return Path(folder) / f"{Path(image_file_name).stem}.png"


def segment_at(id_map: np.ndarray, point: tuple[int, int]) -> np.ndarray:
    """The boolean mask of the segment under ``point = (x, y)`` (whatever its id, void included, as the reference)."""
    x, y = point
    height, width = id_map.shape
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"point {point} is outside the {width}x{height} panoptic map")
    return id_map == id_map[y, x]


def gt_masks(narrative: PNGNarrative, id_map: np.ndarray) -> list[np.ndarray]:
    """The ground truth of each evaluated segment of ``narrative``: the union of its segments (bool ``H x W``)."""
    if id_map.shape != (narrative.height, narrative.width):
        raise GroundingInputError(
            f"panoptic PNG {narrative.panoptic_file}: size {id_map.shape} differs from the image's "
            f"{(narrative.height, narrative.width)}"
        )
    return [np.isin(id_map, narrative.segments[k].segment_ids) for k in narrative.evaluated]


def png_ground_truth(narratives: Sequence[PNGNarrative], panoptic_dir: str | Path) -> list[PNGImage]:
    """Ground truth in :func:`grounding.evaluate.evaluate_png`'s form: per image, the evaluated segments of its
    narratives (file order), with the reference's thing and plural flags. Each panoptic PNG is read once."""
    by_image: dict[int, PNGImage] = {}
    id_maps: dict[int, np.ndarray] = {}
    for narrative in narratives:
        if narrative.image_id not in id_maps:
            id_maps[narrative.image_id] = read_panoptic_ids(Path(panoptic_dir) / narrative.panoptic_file)
            by_image[narrative.image_id] = PNGImage(narrative.image_id, narrative.height, narrative.width, [])
        masks = gt_masks(narrative, id_maps[narrative.image_id])
        for k, mask in zip(narrative.evaluated, masks, strict=True):
            segment = narrative.segments[k]
            by_image[narrative.image_id].phrases.append(
                PNGPhrase(
                    narrative_index=narrative.index,
                    utterance=segment.utterance,
                    segment_ids=list(segment.segment_ids),
                    plural=segment.plural,
                    isthing=bool(segment.isthing),
                    mask=mask_to_rle(mask),
                )
            )
    return list(by_image.values())


def png_predictions_by_image(
    narratives: Sequence[PNGNarrative], predictions: Mapping[int, Sequence[RLE | None]]
) -> dict[int, list[RLE | None]]:
    """Per-narrative predictions (narrative index -> one mask or None per evaluated segment) concatenated per
    image in file order, the form :func:`grounding.evaluate.evaluate_png` takes; a narrative without
    predictions contributes None (IoU 0) for each of its segments."""
    out: dict[int, list[RLE | None]] = {}
    for narrative in narratives:
        pred = predictions.get(narrative.index)
        n = len(narrative.evaluated)
        if pred is None:
            pred = [None] * n
        elif len(pred) != n:
            raise GroundingInputError(
                f"predictions for narrative {narrative.index}: expected {n} masks (one per evaluated segment), "
                f"got {len(pred)}"
            )
        out.setdefault(narrative.image_id, []).extend(pred)
    return out


# ------------------------------------------------------------------------------------------------ writing


@dataclass
class PanopticImage:
    """One image of a panoptic data set to write: its pixels, segment-id map and each segment's category."""

    image_id: int
    file_name: str
    image: Image.Image
    id_map: np.ndarray
    #: segment id -> category id, for every non-zero id in ``id_map``.
    segments: dict[int, int]


def write_png_dataset(
    root: str | Path,
    images: Sequence[PanopticImage],
    categories: Sequence[Mapping[str, Any]],
    narratives: Sequence[Mapping[str, Any]],
) -> PNGFiles:
    """Write the reference's layout (see :func:`locate_png`) under ``root``.

    ``categories`` are COCO panoptic categories (``id``, ``name``, ``isthing``); ``narratives`` are written as
    given (``image_id``, ``caption``, ``segments`` with ``utterance``, ``segment_ids``, ``plural``, ``noun``).
    """
    root = Path(root)
    files = PNGFiles(
        narratives=root / "annotations" / "png_coco_val2017.json",
        panoptic_json=root / "annotations" / "panoptic_val2017.json",
        panoptic_dir=root / "annotations" / "panoptic_val2017",
        image_dir=root / "val2017",
    )
    files.panoptic_dir.mkdir(parents=True, exist_ok=True)
    files.image_dir.mkdir(parents=True, exist_ok=True)
    pan_images, annotations = [], []
    for entry in images:
        height, width = entry.id_map.shape
        if (entry.image.width, entry.image.height) != (width, height):
            raise ValueError(
                f"image {entry.image_id}: id map {entry.id_map.shape} does not match the image size"
            )
        missing = set(np.unique(entry.id_map).tolist()) - set(entry.segments) - {0}
        if missing:
            raise ValueError(f"image {entry.image_id}: ids {sorted(missing)} have no category")
        png_name = f"{Path(entry.file_name).stem}.png"
        entry.image.convert("RGB").save(files.image_dir / entry.file_name)
        Image.fromarray(panoptic_id_to_rgb(entry.id_map)).save(files.panoptic_dir / png_name)
        pan_images.append(
            {"id": entry.image_id, "file_name": entry.file_name, "height": height, "width": width}
        )
        segments_info = []
        for segment_id, category_id in entry.segments.items():
            mask = entry.id_map == segment_id
            ys, xs = np.nonzero(mask)
            bbox = (
                [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
                if xs.size
                else [0] * 4
            )
            segments_info.append(
                {
                    "id": int(segment_id),
                    "category_id": int(category_id),
                    "iscrowd": 0,
                    "bbox": bbox,
                    "area": int(mask.sum()),
                }
            )
        annotations.append(
            {"image_id": entry.image_id, "file_name": png_name, "segments_info": segments_info}
        )
    files.panoptic_json.write_text(
        json.dumps({"images": pan_images, "annotations": annotations, "categories": list(categories)}),
        encoding="utf-8",
    )
    files.narratives.write_text(json.dumps(list(narratives)), encoding="utf-8")
    return files
