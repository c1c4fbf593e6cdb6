"""The reference's map knobs: corner removal and SAM's map prompt (mask logits, box) by hand; SAM prompted in
batch through ``PromptedSam`` against segment-anything's own one-prompt-at-a-time ``SamPredictor.predict``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from test_segment import _tiny_sam  # the tiny SAM of the refiner tests (same classes as build_sam)

from grounding.sam_prompts import PromptedSam, remove_corner, sam_boxes, sam_mask_logits

T = 0.0002  # the reference's --attn-temp


def test_remove_corner_uses_the_minimum_of_all_phrase_maps():
    maps = torch.arange(18, dtype=torch.float32).reshape(2, 3, 3) - 4  # minimum -4, in phrase 0's corner
    out = remove_corner(maps)
    for row, col in ((0, 0), (0, 2), (2, 0), (2, 2)):
        assert out[0, row, col] == -4 and out[1, row, col] == -4  # phrase 1's own minimum would be 5
    assert torch.equal(out[:, 1], maps[:, 1]) and torch.equal(out[:, :, 1], maps[:, :, 1])
    assert maps[1, 0, 0] == 5  # the input is not modified


def test_mask_logits_by_hand():
    # map / T = 0.9 everywhere: logit ln 9; 1.0 clips to 0.999; below 0 clips to 0.001.
    square = sam_mask_logits(torch.full((2, 30, 30), 0.9 * T))
    assert square.shape == (2, 256, 256)
    assert torch.allclose(square, torch.full_like(square, math.log(9)), atol=1e-5)
    assert torch.allclose(sam_mask_logits(torch.ones(1, 4, 4)), torch.tensor(math.log(999)), atol=1e-4)
    assert torch.allclose(sam_mask_logits(-torch.ones(1, 4, 4)), torch.tensor(-math.log(999)), atol=1e-4)
    # Taller than wide (40 x 20): the long side becomes 256, the short one int(20 / 40 * 256) = 128, then zero
    # logits pad the right; wider than tall pads the bottom.
    tall = sam_mask_logits(torch.full((1, 40, 20), 0.9 * T))
    assert torch.allclose(tall[:, :, :128], torch.tensor(math.log(9)), atol=1e-5)
    assert torch.all(tall[:, :, 128:] == 0)
    wide = sam_mask_logits(torch.full((1, 30, 70), 0.9 * T), edge=64)  # int(30 / 70 * 64) = 27 rows
    assert torch.allclose(wide[:, :27], torch.tensor(math.log(9)), atol=1e-5)
    assert torch.all(wide[:, 27:] == 0)


def test_boxes_by_hand():
    maps = torch.zeros(2, 6, 8)
    maps[0, 1:3, 3:6] = 0.8 * T  # above 0.75: rows 1-2, columns 3-5
    maps[0, 4, 0] = 0.7 * T  # below the threshold
    maps[1] = 0.74 * T  # nothing above the threshold: the empty box
    assert sam_boxes(maps).tolist() == [[3, 1, 6, 3], [0, 0, 0, 0]]


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(3)
    return SamPredictor(_tiny_sam().eval())


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, size=(48, 80, 3), dtype=np.uint8)


def _maps(image):
    maps = torch.zeros(2, *image.shape[:2])
    maps[0, 10:20, 5:30] = 0.9 * T
    maps[0, 14, 12] = T
    maps[1, 30:45, 50:78] = 0.8 * T
    maps[1, 40, 70] = 1.2 * T
    return maps


def test_point_mode_equals_one_predict_call_per_point(predictor, image):
    maps = _maps(image)
    kept = PromptedSam(predictor, mode="point", more_masks=True).predict(image, list(maps))
    assert [len(k) for k in kept] == [3, 3]
    predictor.set_image(image)
    for phrase, point in zip(kept, [(12, 14), (70, 40)], strict=True):  # the maps' argmax points
        masks, scores, _ = predictor.predict(np.array([point]), np.array([1]), multimask_output=True)
        for k in range(3):
            assert np.mean(phrase[k].mask == masks[k]) > 0.999
            assert phrase[k].score == pytest.approx(float(scores[k]), abs=1e-5)
    last = PromptedSam(predictor).predict(image, list(maps))
    assert [len(k) for k in last] == [1, 1]
    assert np.array_equal(last[0][0].mask, kept[0][2].mask) and last[0][0].score == kept[0][2].score
    # As a Refiner: the last mask per phrase.
    masks = PromptedSam(predictor)(image, [(12, 14), (70, 40)], list(maps))
    assert all(np.array_equal(m, k[-1].mask) for m, k in zip(masks, kept, strict=True))


def test_mask_mode_prompts_with_the_map_logits_and_box(predictor, image):
    maps = _maps(image)
    kept = PromptedSam(predictor, mode="mask", more_masks=True).predict(image, list(maps))
    edge = predictor.model.prompt_encoder.mask_input_size[0]  # 16 for the tiny SAM, 256 for the real ones
    logits = sam_mask_logits(maps, T, edge=edge).numpy()
    boxes = sam_boxes(maps)
    assert boxes.tolist() == [[5, 10, 30, 20], [50, 30, 78, 45]]
    predictor.set_image(image)
    for i, phrase in enumerate(kept):
        masks, scores, _ = predictor.predict(
            box=boxes[i], mask_input=logits[i : i + 1], multimask_output=True
        )
        for k in range(3):
            assert np.mean(phrase[k].mask == masks[k]) > 0.999
            assert phrase[k].score == pytest.approx(float(scores[k]), abs=1e-5)
    with pytest.raises(ValueError, match="sam mode must be one of"):
        PromptedSam(predictor, mode="box")
    with pytest.raises(ValueError, match=r"map shape \(4, 4\) does not match image \(48, 80\)"):
        PromptedSam(predictor).predict(image, [torch.zeros(4, 4)])
