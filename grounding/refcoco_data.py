"""RefCOCO / RefCOCO+ / RefCOCOg referring expressions and instance-proposal files, read without running pickles.

Annotations (the REFER layout the reference reads, Shengcao-Cao/groundLMM ``aas/infer_attn_res.py``):
``<root>/<dataset>/refs(unc).p`` (``refs(umd).p`` for RefCOCOg) and ``<root>/<dataset>/instances.json``. The refs
file is a pickled list of refs ``{ref_id, ann_id, image_id, split, sentences: [{sent_id, sent, ...}], ...}``;
``instances.json`` is COCO (images with ``file_name``, ``height``, ``width``; annotations with polygon or RLE
``segmentation``). Each sentence of a ref in the split is one sample whose ground truth is the mask of the
ref's annotation. The pickle is read by :mod:`grounding.safe_pickle` (plain data only), and the same content
as JSON (``refs(unc).json``, or any file starting with ``[``) is read as well.

Proposals (the instance masks a point picks from; the reference used Co-DETR's, retrained without RefCOCO's
val/test images): an mmdetection-style results file, pickle or JSON, in any of these forms:
- the reference's (``aas/res.py``): a list with one ``(anything, [RLE masks], scores)`` entry per image, in
  the order of an instances file's ``images``;
- mmdetection 2.x ``results.pkl``: one ``(bbox_results, segm_results)`` per image in that order, per class a
  ``(n, 5)`` box array whose last column is the score and a list of ``n`` RLE masks;
- mmdetection 3.x: ``[{"img_id", "pred_instances": {"masks": [RLE], "scores": [...]}}]``;
- COCO results JSON (mmdetection's ``.segm.json``): ``[{"image_id", "segmentation": RLE, "score"}]``.
Per image the masks are sorted by score, highest first; ties keep the later mask first, as the reference's
``np.argsort(scores)[::-1]`` does with a stable sort.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from grounding.coco_io import RLE, GroundingInputError, read_json, to_rle
from grounding.safe_pickle import load_plain_data

__all__ = [
    "REFER_DATASETS",
    "REFER_SPLITS",
    "Proposals",
    "RefFiles",
    "ReferringExpression",
    "load_proposals",
    "load_refcoco",
    "locate_refcoco",
    "write_proposals",
    "write_refcoco",
]

#: Dataset -> the refs file's "split by" (the reference's choice: unc for RefCOCO/+, umd for RefCOCOg).
REFER_DATASETS = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
#: The evaluation splits of each dataset.
REFER_SPLITS = {
    "refcoco": ("val", "testA", "testB"),
    "refcoco+": ("val", "testA", "testB"),
    "refcocog": ("val", "test"),
}


@dataclass(frozen=True)
class RefFiles:
    refs: Path
    instances: Path


def locate_refcoco(root: str | Path, dataset: str) -> RefFiles:
    """``<root>/<dataset>/refs(<split by>).p`` (or ``.json``) and ``<root>/<dataset>/instances.json``."""
    if dataset not in REFER_DATASETS:
        raise GroundingInputError(f"dataset {dataset!r} is not one of {sorted(REFER_DATASETS)}")
    folder = Path(root) / dataset
    stem = f"refs({REFER_DATASETS[dataset]})"
    refs = next((folder / f"{stem}{s}" for s in (".p", ".json") if (folder / f"{stem}{s}").is_file()), None)
    if refs is None:
        raise GroundingInputError(f"{folder}: neither {stem}.p nor {stem}.json found (the REFER layout)")
    instances = folder / "instances.json"
    if not instances.is_file():
        raise GroundingInputError(f"{folder}: instances.json not found (the REFER layout)")
    return RefFiles(refs=refs, instances=instances)


@dataclass(frozen=True)
class ReferringExpression:
    """One RES sample: a sentence of a ref, its image and the GT mask of the ref's annotation."""

    sent_id: int
    sentence: str
    ref_id: int
    ann_id: int
    image_id: int
    file_name: str
    height: int
    width: int
    mask: RLE = field(repr=False)


def _int(value: Any, where: str, key: str) -> int:
    if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)):
        raise GroundingInputError(f"{where}: {key!r} must be an integer, got {value!r}")
    return int(value)


def _get(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, Mapping) or key not in obj:
        raise GroundingInputError(f"{where}: missing required key {key!r}")
    return obj[key]


def load_refcoco(refs_file: str | Path, instances_file: str | Path, split: str) -> list[ReferringExpression]:
    """The samples of ``split``: refs in file order, each ref's sentences in order (the reference's order)."""
    refs = load_plain_data(refs_file, "RefCOCO refs")
    if not isinstance(refs, list):
        raise GroundingInputError(f"{refs_file}: expected a list of refs, got {type(refs).__name__}")
    instances = read_json(instances_file, "RefCOCO instances (COCO)")
    src = str(instances_file)
    images = {}
    for k, im in enumerate(_get(instances, "images", src)):
        where = f"{src}: images[{k}]"
        images[_int(_get(im, "id", where), where, "id")] = im
    annotations = {}
    for k, ann in enumerate(_get(instances, "annotations", src)):
        where = f"{src}: annotations[{k}]"
        annotations[_int(_get(ann, "id", where), where, "id")] = ann
    splits = set()
    samples: list[ReferringExpression] = []
    seen: set[int] = set()
    for r, ref in enumerate(refs):
        where = f"{refs_file}: refs[{r}]"
        ref_split = _get(ref, "split", where)
        splits.add(str(ref_split))
        if ref_split != split:
            continue
        ann_id = _int(_get(ref, "ann_id", where), where, "ann_id")
        image_id = _int(_get(ref, "image_id", where), where, "image_id")
        if ann_id not in annotations:
            raise GroundingInputError(f"{where}: ann_id {ann_id} is not in {instances_file}")
        ann = annotations[ann_id]
        if ann.get("image_id") != image_id:
            raise GroundingInputError(
                f"{where}: annotation {ann_id} belongs to image {ann.get('image_id')!r}, not {image_id}"
            )
        if image_id not in images:
            raise GroundingInputError(f"{where}: image {image_id} is not in {instances_file}")
        image = images[image_id]
        iw = f"{src}: image {image_id}"
        height, width = (
            _int(_get(image, "height", iw), iw, "height"),
            _int(_get(image, "width", iw), iw, "width"),
        )
        segmentation = _get(ann, "segmentation", f"{src}: annotation {ann_id}")
        if isinstance(segmentation, Mapping) and isinstance(segmentation.get("counts"), list):
            mask = to_rle(segmentation, name=f"{src}: annotation {ann_id}")  # uncompressed RLE (crowd)
        else:
            mask = to_rle(segmentation, name=f"{src}: annotation {ann_id}", size=(height, width))
        if mask["size"] != [height, width]:
            raise GroundingInputError(
                f"{src}: annotation {ann_id} has size {mask['size']}, its image {[height, width]}"
            )
        sentences = _get(ref, "sentences", where)
        if not isinstance(sentences, list) or not sentences:
            raise GroundingInputError(f"{where}: 'sentences' must be a non-empty list")
        for s, sentence in enumerate(sentences):
            sw = f"{where}.sentences[{s}]"
            sent_id = _int(_get(sentence, "sent_id", sw), sw, "sent_id")
            text = _get(sentence, "sent", sw)
            if not isinstance(text, str):
                raise GroundingInputError(f"{sw}: 'sent' must be a string")
            if sent_id in seen:
                raise GroundingInputError(f"{sw}: duplicate sent_id {sent_id}")
            seen.add(sent_id)
            samples.append(
                ReferringExpression(
                    sent_id=sent_id,
                    sentence=text,
                    ref_id=_int(_get(ref, "ref_id", where), where, "ref_id"),
                    ann_id=ann_id,
                    image_id=image_id,
                    file_name=str(_get(image, "file_name", iw)),
                    height=height,
                    width=width,
                    mask=mask,
                )
            )
    if not samples:
        raise GroundingInputError(f"{refs_file}: no ref in split {split!r} (the file has {sorted(splits)})")
    return samples


def write_refcoco(
    folder: str | Path,
    dataset: str,
    refs: Sequence[Mapping[str, Any]],
    instances: Mapping[str, Any],
    *,
    as_json: bool = False,
) -> RefFiles:
    """Write ``<folder>/<dataset>/refs(...).p`` (a protocol-2 pickle like the originals; ``.json`` with
    ``as_json``) and ``instances.json``."""
    if dataset not in REFER_DATASETS:
        raise ValueError(f"dataset {dataset!r} is not one of {sorted(REFER_DATASETS)}")
    root = Path(folder) / dataset
    root.mkdir(parents=True, exist_ok=True)
    stem = f"refs({REFER_DATASETS[dataset]})"
    refs_path = root / f"{stem}{'.json' if as_json else '.p'}"
    if as_json:
        refs_path.write_text(json.dumps(list(refs)), encoding="utf-8")
    else:
        refs_path.write_bytes(pickle.dumps(list(refs), protocol=2))
    (root / "instances.json").write_text(json.dumps(instances), encoding="utf-8")
    return RefFiles(refs=refs_path, instances=root / "instances.json")


# ------------------------------------------------------------------------------------------------ proposals


@dataclass(frozen=True)
class Proposals:
    """One image's instance proposals, highest score first."""

    masks: list[RLE]
    scores: list[float]


def _scores(value: Any, where: str) -> list[float]:
    array = np.asarray(value, dtype=np.float64).reshape(-1) if value is not None else None
    if array is None or not np.all(np.isfinite(array)):
        raise GroundingInputError(f"{where}: scores must be finite numbers")
    return array.tolist()


def _sorted(masks: list[RLE], scores: list[float], where: str) -> Proposals:
    if len(masks) != len(scores):
        raise GroundingInputError(f"{where}: {len(masks)} masks but {len(scores)} scores")
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")[::-1]
    return Proposals(masks=[masks[i] for i in order], scores=[scores[i] for i in order])


def _rles(value: Any, where: str) -> list[RLE]:
    if not isinstance(value, (list, tuple)):
        raise GroundingInputError(f"{where}: expected a list of RLE masks, got {type(value).__name__}")
    return [to_rle(m, name=f"{where}[{k}]") for k, m in enumerate(value)]


def _positional(entry: Any, where: str) -> Proposals:
    """The reference's ``(x, masks, scores)`` or mmdetection 2.x's ``(bbox_results, segm_results)``."""
    if not isinstance(entry, (list, tuple)) or len(entry) < 2:
        raise GroundingInputError(f"{where}: expected (boxes, masks, scores) or (bbox_results, segm_results)")
    if len(entry) >= 3:
        return _sorted(_rles(entry[1], f"{where}[1]"), _scores(entry[2], f"{where}[2]"), where)
    bbox_results, segm_results = entry
    if isinstance(segm_results, tuple) and len(segm_results) == 2 and isinstance(segm_results[0], list):
        segm_results = segm_results[0]  # mask scoring heads store (segms, mask_scores)
    if len(bbox_results) != len(segm_results):
        raise GroundingInputError(
            f"{where}: {len(bbox_results)} classes of boxes but {len(segm_results)} of masks"
        )
    masks: list[RLE] = []
    scores: list[float] = []
    for c, (boxes, segms) in enumerate(zip(bbox_results, segm_results, strict=True)):
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
        masks += _rles(segms, f"{where} class {c}")
        scores += boxes[:, 4].tolist()
    return _sorted(masks, scores, where)


def load_proposals(path: str | Path, image_ids: Sequence[int] | None = None) -> dict[int, Proposals]:
    """Read a proposals file (pickle or JSON, see the module docstring): image id -> :class:`Proposals`.

    ``image_ids``: the images, in order, of the instances file the results were computed on; needed by the
    per-image list forms (the reference's and mmdetection 2.x's), which carry no ids.
    """
    data = load_plain_data(path, "proposals")
    src = str(path)
    if not isinstance(data, list):
        raise GroundingInputError(
            f"{src}: expected a list (per image, or COCO results), got {type(data).__name__}"
        )
    out: dict[int, Proposals] = {}
    if data and isinstance(data[0], Mapping) and "segmentation" in data[0]:  # COCO results
        per_image: dict[int, tuple[list[RLE], list[float]]] = {}
        for k, det in enumerate(data):
            where = f"{src}: [{k}]"
            iid = _int(_get(det, "image_id", where), where, "image_id")
            masks, scores = per_image.setdefault(iid, ([], []))
            masks.append(to_rle(_get(det, "segmentation", where), name=f"{where}.segmentation"))
            scores += _scores(_get(det, "score", where), f"{where}.score")
        return {iid: _sorted(m, s, f"{src}: image {iid}") for iid, (m, s) in per_image.items()}
    if data and isinstance(data[0], Mapping):  # mmdetection 3.x
        for k, entry in enumerate(data):
            where = f"{src}: [{k}]"
            iid = _int(_get(entry, "img_id", where), where, "img_id")
            instances = _get(entry, "pred_instances", where)
            masks = _rles(
                _get(instances, "masks", f"{where}.pred_instances"), f"{where}.pred_instances.masks"
            )
            scores = _scores(
                _get(instances, "scores", f"{where}.pred_instances"), f"{where}.pred_instances.scores"
            )
            out[iid] = _sorted(masks, scores, where)
        return out
    if image_ids is None:
        raise GroundingInputError(
            f"{src}: per-image results carry no image ids; pass the instances file's images"
        )
    if len(data) != len(image_ids):
        raise GroundingInputError(
            f"{src}: {len(data)} per-image results but the instances file has {len(image_ids)} images"
        )
    for k, (iid, entry) in enumerate(zip(image_ids, data, strict=True)):
        out[int(iid)] = _positional(entry, f"{src}: [{k}]")
    return out


def write_proposals(path: str | Path, proposals: Sequence[Proposals], *, as_json: bool = False) -> Path:
    """Write proposals in the reference's per-image form ``(boxes, masks, scores)`` (in the order given),
    as a protocol-2 pickle with bytes RLE counts and numpy arrays, like mmdetection's dumps, or as JSON."""
    from pycocotools import mask as mask_utils

    entries = []
    for p in proposals:
        coco = [{"size": m["size"], "counts": m["counts"].encode("ascii")} for m in p.masks]
        boxes = np.asarray([mask_utils.toBbox(r) for r in coco], dtype=np.float32).reshape(-1, 4)
        scores = np.asarray(p.scores, dtype=np.float32)
        if as_json:
            entries.append([boxes.tolist(), [dict(m) for m in p.masks], scores.tolist()])
        else:
            entries.append((boxes, coco, scores))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if as_json:
        path.write_text(json.dumps(entries), encoding="utf-8")
    else:
        path.write_bytes(pickle.dumps(entries, protocol=2))
    return path
