"""Mask encodings and evaluation file formats: COCO RLE helpers and readers/writers for GCG, PNG and RES data.
Every grounding metric in this package works on COCO run-length encodings (compressed RLE dicts whose
``counts`` is a ``str``, so they serialise to JSON as they are). This module turns what callers hold (boolean
numpy/torch ``HxW`` arrays, compressed or uncompressed RLE dicts, COCO polygons) into that one form, computes
IoU matrices and intersection/union counts through ``pycocotools.mask``, and reads the on-disk formats the
evaluation CLI consumes: GLaMM's GranD-f GCG ground truth (COCO instances JSON + COCO captions JSON with
``labels``) and its one-JSON-per-image predictions (mbzuai-oryx/groundingLMM, eval/gcg/infer.py and
eval/gcg/evaluate.py), the panoptic narrative grounding annotations with COCO panoptic PNGs (BCV-
Uniandes/PNG), and the minimal referring-segmentation format documented at :func:`load_res_file`. Bad input
raises :class:`GroundingInputError` with a one-line message naming the file or object and what was expected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

RLE = dict[str, Any]
"""A compressed COCO RLE: ``{"size": [h, w], "counts": str}``."""

ImageId = int | str
MaskLike = np.ndarray | torch.Tensor | Mapping[str, Any]


class GroundingInputError(ValueError):
    """Malformed evaluation input; the message is one line naming the file or object and what was expected."""


# --------------------------------------------------------------------------------------------------------------
# RLE helpers
# --------------------------------------------------------------------------------------------------------------


def mask_to_rle(mask: np.ndarray | torch.Tensor, *, name: str = "mask") -> RLE:
    """Encode one boolean ``HxW`` mask (numpy or torch; any dtype, nonzero = inside) as a compressed RLE."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise GroundingInputError(f"{name}: expected a 2-D HxW mask, got shape {tuple(arr.shape)}")
    rle = mask_utils.encode(np.asfortranarray(arr != 0, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _compressed_total(counts: str) -> int | None:
    """Total run length of a compressed RLE string (pycocotools' ``rleFrString``), or None if it is invalid.

    Checked before any decode: pycocotools' C decoder writes past its buffer when the runs add up to more
    than ``h * w``.
    """
    runs: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return None
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            return None
        runs.append(x)
    return sum(runs)


def to_rle(
    mask: MaskLike | Sequence[Sequence[float]], *, name: str = "mask", size: Sequence[int] | None = None
) -> RLE:
    """Normalise one mask to a compressed RLE with ``str`` counts.

    Accepts a boolean ``HxW`` numpy/torch array, a compressed RLE (``counts`` str or bytes), an uncompressed
    RLE (``counts`` a list of ints, as GLaMM's ``mask_to_rle_numpy`` writes), or a COCO polygon list (which
    needs ``size=(h, w)``; the parts are merged like ``pycocotools.coco.COCO.annToRLE``).
    """
    if isinstance(mask, (np.ndarray, torch.Tensor)):
        return mask_to_rle(mask, name=name)
    if isinstance(mask, Mapping):
        if "size" not in mask or "counts" not in mask:
            raise GroundingInputError(
                f"{name}: expected an RLE dict with 'size' and 'counts', got keys {sorted(mask)}"
            )
        sz = mask["size"]
        if not (
            isinstance(sz, (list, tuple)) and len(sz) == 2 and all(isinstance(v, int) and v >= 0 for v in sz)
        ):
            raise GroundingInputError(
                f"{name}: expected RLE 'size' [height, width] of non-negative ints, got {sz!r}"
            )
        counts = mask["counts"]
        h, w = int(sz[0]), int(sz[1])
        if isinstance(counts, list):
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != h * w:
                raise GroundingInputError(
                    f"{name}: uncompressed RLE counts must be non-negative ints summing to {h}x{w}"
                )
            rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
            return {"size": [h, w], "counts": rle["counts"].decode("ascii")}
        if isinstance(counts, bytes):
            counts = counts.decode("ascii")
        if not isinstance(counts, str):
            raise GroundingInputError(
                f"{name}: RLE 'counts' must be a string or a list of ints, got {type(counts).__name__}"
            )
        total = _compressed_total(counts)
        if total is None or total != h * w:
            got = "an invalid string" if total is None else f"{total} pixels"
            raise GroundingInputError(
                f"{name}: corrupt compressed RLE (expected {h}x{w}={h * w} pixels, got {got})"
            )
        return {"size": [h, w], "counts": counts}
    if isinstance(mask, list):
        if size is None:
            raise GroundingInputError(f"{name}: a polygon segmentation needs the image size")
        h, w = int(size[0]), int(size[1])
        try:
            rle = mask_utils.merge(mask_utils.frPyObjects(mask, h, w))
        except Exception as exc:
            raise GroundingInputError(f"{name}: invalid polygon segmentation ({exc})") from None
        return {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    raise GroundingInputError(
        f"{name}: expected a boolean HxW array or a COCO RLE dict, got {type(mask).__name__}"
    )


def to_rles(
    masks: Iterable[MaskLike] | np.ndarray | torch.Tensor | None, *, name: str = "masks"
) -> list[RLE]:
    """Normalise a collection of masks (a sequence of masks, or an ``NxHxW`` array/tensor) to compressed RLEs."""
    if masks is None:
        return []
    if isinstance(masks, (np.ndarray, torch.Tensor)):
        if masks.ndim != 3:
            raise GroundingInputError(
                f"{name}: expected an NxHxW stack of masks, got shape {tuple(masks.shape)}"
            )
        return [mask_to_rle(m, name=f"{name}[{i}]") for i, m in enumerate(masks)]
    if isinstance(masks, Mapping):
        raise GroundingInputError(f"{name}: expected a list of masks, got a single dict")
    return [to_rle(m, name=f"{name}[{i}]") for i, m in enumerate(masks)]


def _coco(rle: RLE) -> dict[str, Any]:
    return {"size": rle["size"], "counts": rle["counts"].encode("ascii")}


def decode_rle(rle: RLE) -> np.ndarray:
    """Decode a compressed RLE to a boolean ``HxW`` numpy array."""
    return mask_utils.decode(_coco(rle)).astype(bool)


def rle_area(rle: RLE) -> int:
    """Number of pixels inside the mask."""
    return int(mask_utils.area(_coco(rle)))


def _check_sizes(a: Sequence[RLE], b: Sequence[RLE], what: str) -> None:
    sizes = {tuple(r["size"]) for r in list(a) + list(b)}
    if len(sizes) > 1:
        raise GroundingInputError(
            f"{what}: masks of one image must share one size, got sizes {sorted(sizes)}"
        )


def iou_matrix(rows: Sequence[RLE], cols: Sequence[RLE], *, what: str = "masks") -> np.ndarray:
    """Pairwise IoU, shape ``(len(rows), len(cols))`` in float64.

    Equal to GLaMM's ``compute_iou`` (eval/utils.py: ``sum(and) / sum(or)``) except that two empty masks get
    0 instead of NaN (pycocotools' convention).
    """
    _check_sizes(rows, cols, what)
    if len(rows) == 0 or len(cols) == 0:
        return np.zeros((len(rows), len(cols)), dtype=np.float64)
    out = mask_utils.iou([_coco(r) for r in rows], [_coco(c) for c in cols], [0] * len(cols))
    return np.asarray(out, dtype=np.float64).reshape(len(rows), len(cols))


def intersection_union(a: RLE, b: RLE, *, what: str = "masks") -> tuple[int, int]:
    """Pixel counts ``(|a & b|, |a | b|)`` of two masks of the same size."""
    _check_sizes([a], [b], what)
    inter = int(mask_utils.area(mask_utils.merge([_coco(a), _coco(b)], intersect=True)))
    return inter, rle_area(a) + rle_area(b) - inter


def empty_rle(height: int, width: int) -> RLE:
    """The all-background mask of the given size."""
    return mask_to_rle(np.zeros((height, width), dtype=bool))


# --------------------------------------------------------------------------------------------------------------
# JSON helpers
# --------------------------------------------------------------------------------------------------------------


def read_json(path: str | Path, what: str) -> Any:
    """Load a JSON file; a missing or malformed file raises a one-line :class:`GroundingInputError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GroundingInputError(f"{p}: {what} file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GroundingInputError(f"{p}: cannot read {what} file ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise GroundingInputError(
            f"{p}: malformed JSON in {what} file ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None


def _require(obj: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, Mapping) or key not in obj:
        raise GroundingInputError(f"{where}: missing required key {key!r}")
    val = obj[key]
    types = typ if isinstance(typ, tuple) else (typ,)
    if not isinstance(val, types) or (isinstance(val, bool) and bool not in types):
        names = "/".join(t.__name__ for t in types)
        raise GroundingInputError(f"{where}: {key!r} must be {names}, got {type(val).__name__}")
    return val


# --------------------------------------------------------------------------------------------------------------
# GCG (GLaMM's GranD-f format)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class GCGImage:
    """Ground truth of one GCG image.

    ``gt_masks`` are all instance annotations of the image in file order (GLaMM's mIoU and recall use all of
    them); ``gt_categories`` / ``gt_iscrowd`` align with them (GLaMM's AP only counts category 1).
    ``labels`` are the GT phrases of the first caption annotation (GLaMM: ``loadAnns(...)[0]['labels']``) and
    ``captions`` every caption annotation of the image (the METEOR/CIDEr references).
    """

    image_id: ImageId
    height: int
    width: int
    gt_masks: list[RLE] = field(default_factory=list)
    gt_categories: list[int] = field(default_factory=list)
    gt_iscrowd: list[bool] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    file_name: str | None = None  # the image file (GT mask file's ``file_name``), when given


@dataclass
class GCGGroundTruth:
    """GranD-f style ground truth.

    ``images`` holds every image of the instances file; ``eval_ids`` are the images of the captions file in its
    order: GLaMM's evaluation set for mIoU, recall and captions (eval/gcg/evaluate.py ``all_images_ids``),
    while its AP runs over every image of the instances file (COCOeval's default ``imgIds``).
    """

    images: dict[ImageId, GCGImage]
    eval_ids: list[ImageId]


@dataclass
class GCGPrediction:
    """One image's grounded caption: the caption, its phrases, and one RLE mask per phrase (GLaMM's order)."""

    image_id: ImageId
    caption: str
    phrases: list[str]
    pred_masks: list[RLE]


def load_gcg_ground_truth(mask_file: str | Path, caption_file: str | Path) -> GCGGroundTruth:
    """Read GLaMM's GCG ground truth: a COCO instances JSON (RLE masks) and a COCO captions JSON with ``labels``."""
    mdata = read_json(mask_file, "GT mask (COCO instances)")
    cdata = read_json(caption_file, "GT caption (COCO captions)")
    for data, path in ((mdata, mask_file), (cdata, caption_file)):
        if not isinstance(data, Mapping):
            raise GroundingInputError(f"{path}: expected a COCO JSON object with 'images' and 'annotations'")
        _require(data, "images", list, str(path))
        _require(data, "annotations", list, str(path))

    images: dict[ImageId, GCGImage] = {}
    for i, img in enumerate(mdata["images"]):
        where = f"{mask_file}: images[{i}]"
        iid = _require(img, "id", (int, str), where)
        h = _require(img, "height", int, where)
        w = _require(img, "width", int, where)
        if iid in images:
            raise GroundingInputError(f"{where}: duplicate image id {iid!r}")
        images[iid] = GCGImage(image_id=iid, height=h, width=w, file_name=img.get("file_name"))
    for i, ann in enumerate(mdata["annotations"]):
        where = f"{mask_file}: annotations[{i}]"
        iid = _require(ann, "image_id", (int, str), where)
        if iid not in images:
            raise GroundingInputError(f"{where}: image_id {iid!r} is not in 'images'")
        img = images[iid]
        seg = _require(ann, "segmentation", (dict, list), where)
        rle = to_rle(seg, name=f"{where}.segmentation", size=(img.height, img.width))
        if rle["size"] != [img.height, img.width]:
            raise GroundingInputError(
                f"{where}: mask size {rle['size']} differs from the image size {[img.height, img.width]}"
            )
        img.gt_masks.append(rle)
        img.gt_categories.append(int(ann.get("category_id", 1)))
        img.gt_iscrowd.append(bool(ann.get("iscrowd", 0)))

    eval_ids: list[ImageId] = []
    for i, img in enumerate(cdata["images"]):
        iid = _require(img, "id", (int, str), f"{caption_file}: images[{i}]")
        if iid not in images:
            raise GroundingInputError(
                f"{caption_file}: image {iid!r} has no entry in the GT mask file {mask_file}"
            )
        if iid in eval_ids:
            raise GroundingInputError(f"{caption_file}: duplicate image id {iid!r}")
        eval_ids.append(iid)
    seen_labels: set[ImageId] = set()
    for i, ann in enumerate(cdata["annotations"]):
        where = f"{caption_file}: annotations[{i}]"
        iid = _require(ann, "image_id", (int, str), where)
        if iid not in images or iid not in eval_ids:
            raise GroundingInputError(f"{where}: image_id {iid!r} is not in 'images'")
        caption = _require(ann, "caption", str, where)
        images[iid].captions.append(caption)
        if iid not in seen_labels:  # GLaMM takes the first caption annotation's labels
            labels = _require(ann, "labels", list, where)
            if not all(isinstance(s, str) for s in labels):
                raise GroundingInputError(f"{where}: 'labels' must be a list of strings")
            images[iid].labels = list(labels)
            seen_labels.add(iid)
    for iid in eval_ids:
        if not images[iid].captions:
            raise GroundingInputError(f"{caption_file}: image {iid!r} has no caption annotation")
    return GCGGroundTruth(images=images, eval_ids=eval_ids)


def gcg_prediction_path(pred_dir: str | Path, image_id: ImageId) -> Path:
    """GLaMM's file naming: ``{pred_dir}/{image_id}.json`` (eval/gcg/evaluate.py), ``image_id`` from the captions GT."""
    return Path(pred_dir) / f"{image_id}.json"


def parse_gcg_prediction(obj: Any, image_id: ImageId, where: str) -> GCGPrediction:
    """Validate one prediction object.

    Accepts GLaMM's flat ``{image_id, caption, phrases, pred_masks}`` and, like GLaMM's reader (which takes the
    value of the first key when it holds the fields), ``{"<name>": {caption, phrases, pred_masks}}``.
    """
    if not isinstance(obj, Mapping):
        raise GroundingInputError(f"{where}: expected a JSON object with caption, phrases and pred_masks")
    if "caption" not in obj and len(obj) >= 1:
        first = next(iter(obj.values()))
        if isinstance(first, Mapping) and "caption" in first:
            obj = first
    caption = _require(obj, "caption", str, where)
    phrases = _require(obj, "phrases", list, where)
    if not all(isinstance(p, str) for p in phrases):
        raise GroundingInputError(f"{where}: 'phrases' must be a list of strings")
    masks = _require(obj, "pred_masks", list, where)
    return GCGPrediction(
        image_id=image_id,
        caption=caption,
        phrases=list(phrases),
        pred_masks=[to_rle(m, name=f"{where}: pred_masks[{k}]") for k, m in enumerate(masks)],
    )


def read_gcg_prediction(path: str | Path, image_id: ImageId) -> GCGPrediction:
    """Read one GLaMM prediction file."""
    return parse_gcg_prediction(read_json(path, "GCG prediction"), image_id, str(path))


def write_gcg_prediction(path: str | Path, prediction: GCGPrediction) -> None:
    """Write one prediction in GLaMM's format (eval/gcg/infer.py ``result_dict``), atomically: a run killed
    mid-write leaves no half file that a resumed run would take for a finished image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(
        {
            "image_id": prediction.image_id,
            "caption": prediction.caption,
            "phrases": list(prediction.phrases),
            "pred_masks": [to_rle(m) for m in prediction.pred_masks],
        }
    )
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_gcg_predictions(
    pred_dir: str | Path, image_ids: Iterable[ImageId]
) -> tuple[dict[ImageId, GCGPrediction], list[ImageId]]:
    """Read ``{pred_dir}/{image_id}.json`` for each id; returns the predictions and the ids without a file."""
    d = Path(pred_dir)
    if not d.is_dir():
        raise GroundingInputError(f"{d}: prediction directory not found")
    preds: dict[ImageId, GCGPrediction] = {}
    missing: list[ImageId] = []
    for iid in image_ids:
        p = gcg_prediction_path(d, iid)
        if not p.is_file():
            missing.append(iid)
            continue
        preds[iid] = read_gcg_prediction(p, iid)
    return preds, missing


# --------------------------------------------------------------------------------------------------------------
# PNG (panoptic narrative grounding)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PNGPhrase:
    """One evaluated noun phrase: its GT mask is the union of its panoptic segments."""

    narrative_index: int
    utterance: str
    segment_ids: list[int]
    plural: bool
    isthing: bool
    mask: RLE


@dataclass
class PNGImage:
    """The evaluated phrases of every narrative of one image, narratives in annotation-file order."""

    image_id: int
    height: int
    width: int
    phrases: list[PNGPhrase]


def rgb_to_panoptic_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG colour to segment id: ``R + 256 * G + 256**2 * B`` (int64, no uint8 overflow)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise GroundingInputError(f"panoptic PNG: expected an HxWx3 RGB image, got shape {rgb.shape}")
    rgb = rgb[..., :3].astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def load_png_ground_truth(
    annotation_file: str | Path,
    panoptic_json: str | Path,
    panoptic_dir: str | Path,
    *,
    plural_from: str = "segments",
) -> list[PNGImage]:
    """Read PNG narratives (``png_coco_val2017.json``) with COCO panoptic ground truth.

    Evaluated phrases follow the PNG repo (data/pre_process.py, baseline/test_net.py): segments with
    ``noun`` true and a non-empty ``segment_ids``; the GT mask is the union of the segments. ``plural_from``:
    ``"segments"`` (PNG's test_net.py: plural iff more than one segment, ``ann_types == 2``) or ``"flag"`` (the
    annotation's ``plural`` field). Thing/stuff is the category of the phrase's *last* segment, as PNG's
    dataloader overwrites ``ann_categories[i + 1]`` per segment.
    """
    if plural_from not in ("segments", "flag"):
        raise GroundingInputError(f"plural_from: expected 'segments' or 'flag', got {plural_from!r}")
    narratives = read_json(annotation_file, "PNG narrative annotations")
    if isinstance(narratives, Mapping) and "annotations" in narratives:
        narratives = narratives["annotations"]
    if not isinstance(narratives, list):
        raise GroundingInputError(f"{annotation_file}: expected a list of narratives")
    pan = read_json(panoptic_json, "COCO panoptic")
    if not isinstance(pan, Mapping):
        raise GroundingInputError(f"{panoptic_json}: expected a COCO panoptic JSON object")
    src = str(panoptic_json)
    cats = {
        _require(c, "id", int, f"{src}: categories"): bool(c.get("isthing", 0))
        for c in _require(pan, "categories", list, src)
    }
    pan_imgs = {_require(im, "id", int, f"{src}: images"): im for im in _require(pan, "images", list, src)}
    pan_anns = {
        _require(a, "image_id", int, f"{src}: annotations"): a
        for a in _require(pan, "annotations", list, src)
    }

    from PIL import Image  # local import: only PNG evaluation needs pillow

    out: dict[int, PNGImage] = {}
    id_maps: dict[int, np.ndarray] = {}
    narrative_counter: dict[int, int] = {}
    for n, narr in enumerate(narratives):
        where = f"{annotation_file}: narratives[{n}]"
        raw_iid = _require(narr, "image_id", (int, str), where)
        try:
            iid = int(raw_iid)
        except ValueError:
            raise GroundingInputError(f"{where}: image_id {raw_iid!r} is not an integer") from None
        if iid not in pan_anns or iid not in pan_imgs:
            raise GroundingInputError(f"{where}: image {iid} has no entry in {panoptic_json}")
        ann = pan_anns[iid]
        segs_info = {
            _require(s, "id", int, f"{src}: image {iid} segments_info"): s
            for s in ann.get("segments_info", [])
        }
        if iid not in id_maps:
            png_path = Path(panoptic_dir) / _require(
                ann, "file_name", str, f"{src}: annotation of image {iid}"
            )
            try:
                with Image.open(png_path) as im:
                    id_maps[iid] = rgb_to_panoptic_id(np.asarray(im.convert("RGB")))
            except (OSError, ValueError) as exc:
                raise GroundingInputError(f"{png_path}: cannot read panoptic PNG ({exc})") from None
            h, w = id_maps[iid].shape
            out[iid] = PNGImage(image_id=iid, height=h, width=w, phrases=[])
        k = narrative_counter.get(iid, 0)
        narrative_counter[iid] = k + 1
        idmap = id_maps[iid]
        for j, seg in enumerate(_require(narr, "segments", list, where)):
            sw = f"{where}.segments[{j}]"
            ids = _require(seg, "segment_ids", list, sw)
            if not seg.get("noun", True) or len(ids) == 0:
                continue
            try:
                int_ids = [int(s) for s in ids]
            except (TypeError, ValueError):
                raise GroundingInputError(f"{sw}: segment_ids must be integers or integer strings") from None
            for s in int_ids:
                if s not in segs_info:
                    raise GroundingInputError(
                        f"{sw}: segment id {s} is not in image {iid}'s panoptic segments_info"
                    )
            isthing = cats.get(segs_info[int_ids[-1]].get("category_id"), False)
            plural = len(int_ids) > 1 if plural_from == "segments" else bool(seg.get("plural", False))
            out[iid].phrases.append(
                PNGPhrase(
                    narrative_index=k,
                    utterance=str(seg.get("utterance", "")),
                    segment_ids=int_ids,
                    plural=plural,
                    isthing=isthing,
                    mask=mask_to_rle(np.isin(idmap, int_ids)),
                )
            )
    return list(out.values())


def png_prediction_path(pred_dir: str | Path, image_id: int) -> Path:
    """PNG predictions: ``{pred_dir}/{image_id}.json`` (the integer COCO id, no zero padding)."""
    return Path(pred_dir) / f"{image_id}.json"


def read_png_prediction(path: str | Path, image: PNGImage) -> list[RLE | None]:
    """Read one PNG prediction file.

    Format (defined here): ``{"image_id": int, "pred_masks": [RLE or null, ...]}`` with one entry per
    evaluated phrase of the image (see :func:`load_png_ground_truth`), all narratives of the image
    concatenated in annotation-file order. ``null`` means no prediction for that phrase (IoU 0).
    """
    obj = read_json(path, "PNG prediction")
    masks = _require(obj, "pred_masks", list, str(path))
    if len(masks) != len(image.phrases):
        raise GroundingInputError(
            f"{path}: expected {len(image.phrases)} pred_masks (one per evaluated phrase), got {len(masks)}"
        )
    out: list[RLE | None] = []
    for k, m in enumerate(masks):
        if m is None:
            out.append(None)
            continue
        rle = to_rle(m, name=f"{path}: pred_masks[{k}]")
        if rle["size"] != [image.height, image.width]:
            raise GroundingInputError(
                f"{path}: pred_masks[{k}] has size {rle['size']}, expected {[image.height, image.width]}"
            )
        out.append(rle)
    return out


# --------------------------------------------------------------------------------------------------------------
# Referring expression segmentation
# --------------------------------------------------------------------------------------------------------------


def load_res_file(path: str | Path, key: str) -> dict[str, RLE]:
    """Read a referring-segmentation file: ``{key: [{"id": str|int, "segmentation": RLE}, ...]}``.

    The ground truth uses ``key="expressions"`` (one entry per referring expression; other fields such as
    ``"text"`` or ``"image_id"`` are allowed and ignored) and predictions ``key="predictions"``. Ids are
    matched as strings. Returns ``{str(id): RLE}`` in file order.
    """
    obj = read_json(path, "referring segmentation")
    items = _require(obj, key, list, str(path))
    out: dict[str, RLE] = {}
    for i, item in enumerate(items):
        where = f"{path}: {key}[{i}]"
        eid = str(_require(item, "id", (int, str), where))
        if eid in out:
            raise GroundingInputError(f"{where}: duplicate id {eid!r}")
        out[eid] = to_rle(_require(item, "segmentation", dict, where), name=f"{where}.segmentation")
    return out
