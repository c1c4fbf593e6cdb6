"""Panoptic narrative grounding: the data format (written, read back, malformed), teacher-forcing inputs, segment
maps and points, and average recall on hand-made predictions against hand-computed IoUs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from grounding.coco_io import GroundingInputError, mask_to_rle
from grounding.evaluate import evaluate_png
from grounding.png_data import (
    PanopticImage,
    gt_masks,
    load_png_narratives,
    locate_png,
    panoptic_prediction_path,
    png_ground_truth,
    png_predictions_by_image,
    read_panoptic_ids,
    segment_at,
    write_png_dataset,
)
from grounding.png_grounding import (
    TeacherForcedCaption,
    aggregate_segment_maps,
    segment_points,
    teacher_forced_caption,
)
from grounding.shapes_sets import png_from_shapes

# A 10 x 10 image: A = rows 0-4 (thing, 50 px), B = rows 5-9 x cols 0-4 (thing, 25 px), C = rows 5-9 x cols 5-9
# (stuff, 25 px).
A, B, C = 11, 12, 13


def _hand_made(root):
    ids = np.full((10, 10), A, dtype=np.int64)
    ids[5:, :5] = B
    ids[5:, 5:] = C
    categories = [{"id": 1, "name": "square", "isthing": 1}, {"id": 200, "name": "grass", "isthing": 0}]
    segments = [
        {"utterance": "A square", "segment_ids": [str(A)], "plural": False, "noun": True},
        {"utterance": " and", "segment_ids": [], "plural": False, "noun": False},
        {"utterance": " the grass", "segment_ids": [C], "plural": False, "noun": True},
        {"utterance": " near two squares", "segment_ids": [str(A), str(B)], "plural": True, "noun": True},
        {"utterance": " on some grass", "segment_ids": [str(C)], "plural": True, "noun": True},
    ]
    narrative = {"image_id": "7", "caption": "".join(s["utterance"] for s in segments), "segments": segments}
    image = PanopticImage(7, "000000000007.jpg", Image.new("RGB", (10, 10)), ids, {A: 1, B: 1, C: 200})
    files = write_png_dataset(root, [image], categories, [narrative])
    # The predicted panoptic segmentation: the top half and the bottom half.
    pred = np.where(np.arange(10)[:, None] < 5, 1, 2) * np.ones((1, 10), dtype=np.int64)
    pred_dir = root / "pred"
    pred_dir.mkdir()
    write_png_dataset(
        root / "tmp", [PanopticImage(7, "x.jpg", image.image, pred, {1: 1, 2: 1})], categories, []
    )
    (root / "tmp" / "annotations" / "panoptic_val2017" / "x.png").rename(pred_dir / "000000000007.png")
    return files, pred_dir


def test_reference_flags_gt_unions_and_average_recall_by_hand(tmp_path):
    files, pred_dir = _hand_made(tmp_path)
    assert locate_png(tmp_path) == files
    (narrative,) = load_png_narratives(files.narratives, files.panoptic_json, image_dir=files.image_dir)
    assert narrative.evaluated == [0, 2, 3, 4]
    flags = [(narrative.segments[k].isthing, narrative.segments[k].plural) for k in narrative.evaluated]
    # aas/png.py: thing flag of the one segment's category; several segments -> thing; plural from the flag.
    assert flags == [(True, False), (False, False), (True, True), (False, True)]
    masks = gt_masks(narrative, read_panoptic_ids(files.panoptic_dir / narrative.panoptic_file))
    assert [int(m.sum()) for m in masks] == [50, 25, 75, 25]  # the plural segment is the union A | B

    pred_ids = read_panoptic_ids(panoptic_prediction_path(pred_dir, narrative.file_name))
    points = [(2, 2), (7, 7), (1, 1), (0, 9)]  # in A, in C, in A, in B/C's bottom half
    pred = [mask_to_rle(segment_at(pred_ids, p)) for p in points]
    # IoUs by hand: A vs top = 1; C vs bottom = 25/50; A|B vs top = 50/75; C vs bottom = 25/50.
    ious = np.array([1.0, 0.5, 2 / 3, 0.5])
    result = evaluate_png(
        png_ground_truth([narrative], files.panoptic_dir), png_predictions_by_image([narrative], {0: pred})
    )
    # PNG's average recall is the area under "fraction with IoU >= t" over t in [0, 1) on a 1e-5 grid: the mean
    # IoU (each IoU of 1 counts 0.99999) up to one grid step.
    expected = {
        "overall": ious.mean(),
        "things": ious[[0, 2]].mean(),
        "stuff": ious[[1, 3]].mean(),
        "singular": ious[[0, 1]].mean(),
        "plural": ious[[2, 3]].mean(),
    }
    for group, value in expected.items():
        assert result[f"ar_{group}"] == pytest.approx(value, abs=3e-5), group
    assert result["n_phrases"] == {"overall": 4, "things": 2, "stuff": 2, "singular": 2, "plural": 2}
    # A narrative without predictions scores IoU 0 for all its segments.
    empty = evaluate_png(
        png_ground_truth([narrative], files.panoptic_dir), png_predictions_by_image([narrative], {})
    )
    assert empty["ar_overall"] == pytest.approx(0.0, abs=2e-5)
    with pytest.raises(GroundingInputError, match="narrative 0: expected 4 masks"):
        png_predictions_by_image([narrative], {0: pred[:3]})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda n, p: n[0]["segments"][0].update(segment_ids=["99"]),
            r"segments\[0\]: segment id 99 is not in",
        ),
        (
            lambda n, p: n[0]["segments"][0].update(utterance=" "),
            r"segments\[0\]: an evaluated segment needs",
        ),
        (lambda n, p: n[0].update(image_id="seven"), r"narratives\[0\]: image_id must be an integer"),
        (lambda n, p: n[0].update(image_id=8), r"narratives\[0\]: image 8 has no image"),
        (lambda n, p: n[0].pop("segments"), r"narratives\[0\]: missing required key 'segments'"),
        (
            lambda n, p: p["annotations"][0].update(file_name="gone.png"),
            r"panoptic PNG .*gone\.png not found",
        ),
        (lambda n, p: p["categories"].pop(), r"category 200 is not in categories"),
    ],
)
def test_malformed_files_give_one_line_errors_naming_the_file(tmp_path, edit, message):
    files, _ = _hand_made(tmp_path)
    narratives = json.loads(files.narratives.read_text())
    panoptic = json.loads(files.panoptic_json.read_text())
    edit(narratives, panoptic)
    files.narratives.write_text(json.dumps(narratives))
    files.panoptic_json.write_text(json.dumps(panoptic))
    with pytest.raises(GroundingInputError, match=message) as err:
        load_png_narratives(files.narratives, files.panoptic_json)
    assert "\n" not in str(err.value) and ".json" in str(err.value)


def test_shapes_set_has_the_scene_masks_and_a_perfect_prediction_folder(tmp_path):
    from datamodules.shapes import ShapesWorldConfig, render_scene

    files = png_from_shapes(tmp_path, n_images=3, seed=0)
    narratives = load_png_narratives(files.narratives, files.panoptic_json, image_dir=files.image_dir)
    assert len(narratives) == 3
    for narrative in narratives:
        scene = render_scene(0, ShapesWorldConfig(seed=0), split="val", index=narrative.image_id - 1)
        masks = gt_masks(narrative, read_panoptic_ids(files.panoptic_dir / narrative.panoptic_file))
        shapes = scene.ordered
        for mask, shape in zip(masks, shapes, strict=False):
            assert np.array_equal(mask, shape.mask)
        assert narrative.caption.startswith(scene.ordered[0].phrase.capitalize())
        if len(shapes) >= 2:  # the plural segment is the union of all shapes, the stuff one the background
            assert np.array_equal(masks[len(shapes)], np.any([s.mask for s in shapes], axis=0))
            assert np.array_equal(masks[len(shapes) + 1], ~np.any([s.mask for s in shapes], axis=0))
        pred = read_panoptic_ids(panoptic_prediction_path(tmp_path / "panoptic_pred", narrative.file_name))
        assert np.array_equal(pred, read_panoptic_ids(files.panoptic_dir / narrative.panoptic_file))


def test_teacher_forced_caption_encodes_each_utterance_alone():
    from datamodules.word_tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(["A small red circle is top left.", "circle"])
    caption = teacher_forced_caption(tokenizer, ["A small red circle", " is top left."])
    tokens = ["A", "▁small", "▁red", "▁circle", "▁is", "▁top", "▁left", "."]
    assert caption == TeacherForcedCaption(tokenizer.convert_tokens_to_ids(tokens), [(0, 4), (4, 8)])
    # Alone, an utterance without a leading space starts with the bare word (not the one after a space).
    alone = teacher_forced_caption(tokenizer, ["A small", "circle"])
    assert tokenizer.convert_ids_to_tokens(alone.token_ids) == ["A", "▁small", "circle"]
    assert alone.segment_ranges == [(0, 2), (2, 3)]
    with pytest.raises(TypeError):
        teacher_forced_caption(tokenizer, "A small circle")


def test_segment_aggregation_by_hand():
    maps = torch.tensor([[[1.0, 0.0]], [[3.0, -1.0]], [[2.0, 5.0]], [[0.0, 0.0]]])
    ranges = [(0, 3), (3, 4)]
    assert torch.equal(aggregate_segment_maps(maps, ranges), torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]]))
    assert torch.equal(
        aggregate_segment_maps(maps, ranges, "max"), torch.tensor([[[3.0, 5.0]], [[0.0, 0.0]]])
    )
    mean = aggregate_segment_maps(maps, ranges, "mean")
    assert torch.allclose(mean, torch.tensor([[[2.0, 4.0 / 3.0]], [[0.0, 0.0]]]))
    with pytest.raises(ValueError, match="aggregation must be one of"):
        aggregate_segment_maps(maps, ranges, "sum")
    with pytest.raises(ValueError, match=r"token range \[4, 4\)"):
        aggregate_segment_maps(maps, [(4, 4)])


def test_segment_point_lands_on_the_planted_cell_through_pad_geometry():
    # Three caption tokens on a 4x4 grid; token 1 (segment 0's first token) is hot at row 1, column 2.
    maps = torch.zeros(3, 4, 4)
    maps[1, 1, 2] = 1.0
    caption = TeacherForcedCaption([5, 6, 7], [(0, 1), (1, 3)])
    points, upsampled = segment_points(maps, caption, [1], (40, 100), aspect="pad", how="first")
    # The map covers the 100 x 100 padded square (25 px cells): the cell's centre (62.5, 37.5) is pixel
    # (62, 37) of the square, and the square's rows 30..69 are the image.
    assert points == [(62, 7)] and upsampled[0].shape == (40, 100)
    assert segment_points(maps, caption, [], (40, 100)) == ([], [])
