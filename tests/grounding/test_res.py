"""Referring segmentation: RefCOCO refs pickles and their JSON twins, proposals files in every supported form,
the point rules of the reference's two scripts, the proposal a point picks, and gIoU vs cIoU by hand."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from grounding.coco_io import GroundingInputError, decode_rle, mask_to_rle
from grounding.evaluate import evaluate_res
from grounding.refcoco_data import (
    REFER_SPLITS,
    Proposals,
    load_proposals,
    load_refcoco,
    locate_refcoco,
    write_proposals,
    write_refcoco,
)
from grounding.res_grounding import best_proposal, res_point, row_after_word, select_proposal
from grounding.safe_pickle import UnsafePickleError
from grounding.shapes_sets import refcoco_from_shapes


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return refcoco_from_shapes(tmp_path_factory.mktemp("refcoco"), n_images=6, seed=0)


def test_shapes_refcoco_samples_carry_the_scene_masks(shapes_root):
    from datamodules.shapes import ShapesWorldConfig, render_scene

    for dataset, splits in REFER_SPLITS.items():
        files = locate_refcoco(shapes_root, dataset)
        assert files.refs.name == ("refs(umd).p" if dataset == "refcocog" else "refs(unc).p")
        total = 0
        for split in splits:
            samples = load_refcoco(files.refs, files.instances, split)
            total += len(samples)
            for sample in samples:
                scene = render_scene(0, ShapesWorldConfig(seed=0), split="val", index=sample.image_id - 100)
                shape = scene.ordered[sample.ann_id % 1000]
                assert sample.sentence.endswith(f"{shape.colour} {shape.kind}")
                assert np.array_equal(decode_rle(sample.mask), shape.mask)
                assert (shapes_root / "train2014" / sample.file_name).is_file()
        n_shapes = sum(
            len(render_scene(0, ShapesWorldConfig(seed=0), split="val", index=i).shapes) for i in range(6)
        )
        assert total == 2 * n_shapes  # every shape is one ref with two sentences, each sentence one sample


def test_json_twin_loads_the_same_samples(shapes_root, tmp_path):
    files = locate_refcoco(shapes_root, "refcocog")
    refs = pickle.loads(files.refs.read_bytes())  # our own file, written by the test fixture
    instances = json.loads(files.instances.read_text())
    twin = write_refcoco(tmp_path, "refcocog", refs, instances, as_json=True)
    assert twin.refs.name == "refs(umd).json" and locate_refcoco(tmp_path, "refcocog") == twin
    assert load_refcoco(twin.refs, twin.instances, "val") == load_refcoco(files.refs, files.instances, "val")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_doctored_refs_pickle_is_refused_and_runs_nothing(shapes_root, tmp_path):
    files = locate_refcoco(shapes_root, "refcoco")
    refs = pickle.loads(files.refs.read_bytes())
    refs[0]["sentences"][0]["tokens"] = _Payload(tmp_path / "ran")
    doctored = tmp_path / "refcoco"
    doctored.mkdir()
    (doctored / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (doctored / "instances.json").write_bytes(files.instances.read_bytes())
    with pytest.raises(
        UnsafePickleError, match=r"refs\(unc\)\.p: refused to unpickle: it references posix\.system"
    ):
        load_refcoco(doctored / "refs(unc).p", doctored / "instances.json", "val")
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r, i: r[0].update(ann_id=5), r"refs\[0\]: ann_id 5 is not in"),
        (lambda r, i: r[0].pop("sentences"), r"refs\[0\]: missing required key 'sentences'"),
        (lambda r, i: r[0]["sentences"][0].update(sent=3), r"sentences\[0\]: 'sent' must be a string"),
        (lambda r, i: i["annotations"][0].update(image_id=101), r"annotation \d+ belongs to image 101"),
        (
            lambda r, i: [x.update(split="train") for x in r],
            r"no ref in split 'val' \(the file has \['train'\]\)",
        ),
    ],
)
def test_malformed_refs_give_one_line_errors(shapes_root, tmp_path, edit, message):
    files = locate_refcoco(shapes_root, "refcoco")
    refs = pickle.loads(files.refs.read_bytes())
    instances = json.loads(files.instances.read_text())
    edit(refs, instances)
    broken = write_refcoco(tmp_path, "refcoco", refs, instances)
    with pytest.raises(GroundingInputError, match=message) as err:
        load_refcoco(broken.refs, broken.instances, "val")
    assert "\n" not in str(err.value)


def _rect(top, left, bottom, right, size=(6, 8)):
    mask = np.zeros(size, dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def test_every_proposals_form_reads_to_the_same_sorted_masks(tmp_path):
    a, b, c = _rect(0, 0, 3, 3), _rect(2, 2, 6, 8), _rect(0, 4, 2, 8)
    rles = [mask_to_rle(m) for m in (a, b, c)]
    coco = [{"size": r["size"], "counts": r["counts"].encode()} for r in rles]
    scores = np.array([0.5, 0.9, 0.5], dtype=np.float32)
    expected = {7: [rles[1], rles[2], rles[0]]}  # by score; the tie keeps the later mask first
    written = write_proposals(tmp_path / "ref.pkl", [Proposals(rles, scores.tolist())])
    mmdet2_boxes = [
        np.array([[0, 0, 3, 3, 0.5], [2, 2, 8, 6, 0.9]], np.float32),
        np.array([[4, 0, 8, 2, 0.5]], np.float32),
    ]
    mmdet2 = [(mmdet2_boxes, [coco[:2], coco[2:]])]  # per image: per-class boxes (score last) and masks
    mmdet3 = [{"img_id": 7, "pred_instances": {"masks": coco, "scores": scores}}]
    coco_results = [
        {"image_id": 7, "segmentation": r, "score": float(s), "category_id": 1}
        for r, s in zip(rles, scores, strict=True)
    ]
    as_json = write_proposals(tmp_path / "ref.json", [Proposals(rles, scores.tolist())], as_json=True)
    forms = {
        "reference pickle": (written, [7]),
        "reference json": (as_json, [7]),
        "mmdet2": (mmdet2, [7]),
        "mmdet3": (mmdet3, None),
        "coco results": (coco_results, None),
    }
    for name, (content, ids) in forms.items():
        path = content
        if not hasattr(content, "read_bytes"):
            path = tmp_path / f"{name.replace(' ', '_')}.pkl"
            path.write_bytes(pickle.dumps(content, protocol=2))
        loaded = load_proposals(path, ids)
        assert list(loaded) == [7], name
        assert loaded[7].masks == expected[7], name
        assert loaded[7].scores == pytest.approx([0.9, 0.5, 0.5]), name
    with pytest.raises(
        GroundingInputError, match=r"ref\.pkl: 1 per-image results but the instances file has 2"
    ):
        load_proposals(written, [7, 8])
    with pytest.raises(GroundingInputError, match="carry no image ids"):
        load_proposals(written)


def test_first_tokens_point_is_the_argmax_of_the_max_of_upsampled_maps():
    rows = torch.zeros(10, 4, 4)
    rows[2, 1, 1] = 1.0  # the strongest cell among the first 8 steps (inner cells: no border clamping)
    rows[5, 2, 2] = 0.6
    rows[9, 2, 1] = 5.0  # step 9 is past the first 8: ignored
    # On a 44 x 44 image (11 px cells), cell (row, col)'s centre is pixel (11 col + 5, 11 row + 5).
    assert res_point(rows, (44, 44), "resize") == (16, 16)
    assert res_point(rows, (44, 44), "resize", first_tokens=10) == (16, 27)  # cell (2, 1) now wins


def test_after_is_point_uses_the_step_after_the_first_is():
    texts = ["The", "red", "circle", "is", "top", "left", "is", "</s>"]
    assert row_after_word(texts) == 4
    assert row_after_word([" is", " top"]) == 1  # byte-level BPE keeps the space
    assert row_after_word(["The", "circle", "is"]) is None  # "is" last: no step after it
    assert row_after_word(["island", "this"]) is None
    rows = torch.zeros(8, 4, 4)
    rows[3, 1, 1] = 1.0  # the step of "is" itself
    rows[4, 2, 2] = 1.0  # the step after it
    assert res_point(rows, (44, 44), "resize", mode="after_is", token_texts=texts) == (27, 27)
    assert res_point(rows[:3], (44, 44), "resize", mode="after_is", token_texts=texts[:3]) is None
    with pytest.raises(ValueError, match="one decoded token per row"):
        res_point(rows, (44, 44), mode="after_is", token_texts=texts[:3])


def test_proposal_choice_and_giou_vs_ciou_by_hand():
    # Expression 1: GT 4x5 = 20 px; proposals by score: a 2x5 strip inside it (10 px), then the whole GT.
    gt1 = _rect(0, 0, 4, 5, (10, 10))
    strip, whole = _rect(0, 0, 2, 5, (10, 10)), gt1.copy()
    assert select_proposal([strip, whole], (1, 1)) == 0  # the higher-scored proposal contains the point
    assert select_proposal([strip, whole], (1, 3)) == 1  # only the whole one does
    assert select_proposal([strip, whole], (9, 9)) is None  # none does: empty mask
    assert select_proposal([strip, whole], None) is None
    assert best_proposal(gt1, [strip, whole]) == 1
    # Expression 2: GT 10 x 10 = 100 px; the chosen proposal covers 90 of it and nothing else.
    gt2 = np.ones((10, 10), dtype=bool)
    pick2 = _rect(0, 0, 9, 10, (10, 10))
    # Expression 3: no proposal contains the point: empty prediction, I = 0, U = its 4 x 4 GT = 16.
    gt3 = _rect(6, 6, 10, 11, (10, 10))
    gt = {"1": mask_to_rle(gt1), "2": mask_to_rle(gt2), "3": mask_to_rle(gt3)}
    pred = {"1": mask_to_rle(strip), "2": mask_to_rle(pick2)}
    result = evaluate_res(gt, pred)
    # By hand: IoUs 10/20, 90/100, 0 -> gIoU = 1.4 / 3; cIoU = (10 + 90 + 0) / (20 + 100 + 16).
    assert result["giou"] == pytest.approx((0.5 + 0.9 + 0.0) / 3, abs=1e-6)
    assert result["ciou"] == pytest.approx(100 / 136, abs=1e-9)
    assert result["n_missing"] == 1
    # The proposals' upper bound picks the whole GT for expression 1: IoU 1.
    upper = evaluate_res(gt, {"1": mask_to_rle(whole), "2": mask_to_rle(pick2)})
    assert upper["giou"] == pytest.approx((1.0 + 0.9 + 0.0) / 3, abs=1e-6)
    assert best_proposal(gt3, [strip, whole]) is None  # nothing overlaps: the empty mask is the best
