"""Tests for grounding.segment: mean normalisation, pad-aware upsampling geometry on non-square images
against hand-computed pixel positions, argmax points, the SAM refiner on a tiny random segment-anything
model (checked against calling SamPredictor directly), its loading errors, the threshold refiner on a
synthetic Gaussian blob, and the guided refiner's filter against a per-pixel loop and on a drawn square.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from grounding import config
from grounding.config import AttendConfig
from grounding.segment import (
    REFINERS,
    GuidedRefiner,
    SamRefiner,
    ThresholdRefiner,
    argmax_point,
    build_refiner,
    joint_bilateral,
    normalize_maps,
    upsample_map,
)


def test_normalize_subtracts_the_response_mean():
    maps = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    torch.testing.assert_close(normalize_maps(maps), torch.tensor([[-1.0, -2.0], [1.0, 2.0]]))
    assert normalize_maps(maps.double()).dtype == torch.float32


def _hot(h: int, w: int, row: int, col: int) -> torch.Tensor:
    grid = torch.zeros(h, w)
    grid[row, col] = 1.0
    return grid


@pytest.mark.parametrize(
    ("image_size", "cell", "expected"),
    [
        # Wide 40 x 100: square side 100, 25 px per cell; cell (row 1, col 2) is centred at square pixel
        # (x, y) = (2.5 * 25 - 0.5, 1.5 * 25 - 0.5) = (62, 37); the image starts (100 - 40) // 2 = 30 rows
        # down, so the point is (62, 7).
        ((40, 100), (1, 2), (62, 7)),
        # Tall 100 x 40: the image starts 30 columns in; cell (row 2, col 1) -> square (37, 62) -> (7, 62).
        ((100, 40), (2, 1), (7, 62)),
    ],
)
def test_pad_geometry_lands_on_the_hand_computed_pixel(image_size, cell, expected):
    up = upsample_map(_hot(4, 4, *cell), image_size, aspect="pad")
    assert up.shape == image_size and up.dtype == torch.float32
    assert argmax_point(up) == expected
    # Bicubic interpolation passes through the grid value exactly at a cell centre.
    assert up[expected[1], expected[0]].item() == pytest.approx(1.0, abs=1e-6)


def test_pad_crop_drops_cells_in_the_padding():
    # Row 0 of a 4x4 grid covers square rows 0-24, all inside the 30-row top padding of a 40 x 100 image.
    up = upsample_map(_hot(4, 4, 0, 2), (40, 100), aspect="pad")
    square = upsample_map(_hot(4, 4, 0, 2), (100, 100), aspect="pad")
    torch.testing.assert_close(up, square[30:70])
    # Only the bicubic tail (18 px = 0.72 cells from the cell centre) reaches the image, at its top row.
    assert argmax_point(up) == (62, 0)
    assert up.max() < 0.5 * square.max()


@pytest.mark.parametrize("aspect", ["crop", "resize"])
def test_straight_upsampling(aspect):
    # 40 x 100 from 4x4: 10 px per row, 25 px per column; cell (1, 2) centre at y = 14.5, x = 62.
    up = upsample_map(_hot(4, 4, 1, 2), (40, 100), aspect=aspect)
    assert up.shape == (40, 100)
    x, y = argmax_point(up)
    assert x == 62 and y in (14, 15)


def test_bad_arguments():
    with pytest.raises(ValueError, match="aspect"):
        upsample_map(torch.zeros(2, 2), (4, 4), aspect="stretch")
    with pytest.raises(ValueError, match=r"\(h, w\)"):
        upsample_map(torch.zeros(4), (4, 4))


def _gaussian(height: int, width: int, cx: float, cy: float, sigma: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    return torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))


def test_threshold_refiner_gives_the_half_height_disc_of_the_peak_blob():
    height, width, sigma = 80, 120, 8.0
    blob = _gaussian(height, width, 40, 30, sigma)
    other = 0.9 * _gaussian(height, width, 95, 55, sigma)  # a second, disjoint blob above threshold
    upsampled = blob + other
    point = argmax_point(upsampled)
    assert point == (40, 30)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    (mask,) = build_refiner(AttendConfig(refiner="threshold"))(image, [point], [upsampled])
    assert mask.shape == (height, width) and mask.dtype == bool

    radius = sigma * math.sqrt(2 * math.log(2))
    ys, xs = np.mgrid[:height, :width]
    disc = (xs - 40) ** 2 + (ys - 30) ** 2 <= radius**2
    iou = (mask & disc).sum() / (mask | disc).sum()
    assert iou > 0.95
    assert not mask[55, 95]  # the other blob is above threshold but not connected to the peak
    # A lower fraction grows the region.
    (wide,) = ThresholdRefiner(fraction=0.2)(image, [point], [upsampled])
    assert wide.sum() > mask.sum() and (wide | mask).sum() == wide.sum()


def _geodesic_component(region: torch.Tensor, x: int, y: int) -> np.ndarray:
    """The refiner's earlier exact algorithm (geodesic dilation from the point inside the region), kept as the
    reference: an independent route to the same 8-connected component."""
    allowed = region[None, None].float()
    grown = torch.zeros_like(allowed)
    grown[0, 0, y, x] = allowed[0, 0, y, x]
    while True:
        before = grown
        for _ in range(8):
            grown = torch.nn.functional.max_pool2d(grown, kernel_size=3, stride=1, padding=1) * allowed
        if torch.equal(grown, before):
            return grown[0, 0].bool().numpy()


def _smooth_noise(height: int, width: int, grid: tuple[int, int], seed: int) -> torch.Tensor:
    """A token-grid map upsampled bicubically, as attend-and-segment's maps are."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(grid, generator=generator)
    return upsample_map(coarse, (height, width), aspect="resize")


@pytest.mark.parametrize("seed", range(6))
def test_threshold_refiner_equals_the_exact_component_where_resolution_is_not_bounded(seed):
    """Issue 16, case 4 (correctness side): maps up to max_side pixels get exactly the old algorithm's mask,
    several blobs and holes included."""
    height, width = 70 + 7 * seed, 90 - 5 * seed
    upsampled = _smooth_noise(height, width, (6, 6), seed)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    for fraction in (0.3, 0.5, 0.8):
        refiner = ThresholdRefiner(fraction=fraction)
        for point in (argmax_point(upsampled), (width // 3, height // 2)):
            (mask,) = refiner(image, [point], [upsampled])
            low, peak = upsampled.min(), upsampled[point[1], point[0]]
            expected = _geodesic_component(upsampled >= low + fraction * (peak - low), *point)
            assert np.array_equal(mask, expected), (fraction, point)


def test_threshold_refiner_at_bounded_resolution_keeps_the_full_resolution_boundary():
    """Beyond max_side, connectivity is decided on cells: the mask still contains the exact component, lies
    inside the full-resolution threshold, and equals the exact one when no two parts come closer than a
    cell."""
    from grounding.segment import component_at

    height, width = 300, 420
    upsampled = _smooth_noise(height, width, (24, 24), 3)
    region = upsampled >= upsampled.min() + 0.5 * (upsampled.max() - upsampled.min())
    x, y = argmax_point(upsampled)
    exact = component_at(region, x, y, max_side=4096)  # not bounded: exact, as the test above checks
    bounded = component_at(region, x, y, max_side=60)  # 7 x 7 pixel cells
    assert bounded.shape == (height, width)
    assert not (exact & ~bounded).any(), "the exact component is always inside"
    assert not (bounded & ~region.numpy()).any(), "nothing outside the full-resolution threshold"
    blobs = _gaussian(height, width, 100, 80, 20.0) + _gaussian(height, width, 320, 220, 20.0)
    blob_region = blobs >= 0.5
    assert np.array_equal(component_at(blob_region, 100, 80, 60), component_at(blob_region, 100, 80, 4096))


def test_threshold_refiner_labels_a_large_photo_at_bounded_resolution(monkeypatch):
    """Issue 16, case 4: a 4000 x 3000 map is labelled by scipy's connected components at no more than
    max_side pixels a side (the old search dilated at full resolution: 226 s for 2000 x 1500, an 8000 x 8000
    photo did not finish in 645 s). Speed itself is measured by benchmarks/threshold_refiner.py."""
    from scipy import ndimage

    shapes = []
    label = ndimage.label

    def recording_label(region, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        shapes.append(region.shape)
        return label(region, *args, **kwargs)

    monkeypatch.setattr(ndimage, "label", recording_label)
    height, width = 3000, 4000
    upsampled = _smooth_noise(height, width, (24, 24), 1)
    point = argmax_point(upsampled)
    (mask,) = ThresholdRefiner()(np.zeros((height, width, 3), dtype=np.uint8), [point], [upsampled])
    assert shapes == [(750, 1000)], "one labelling, at 4 x 4 pixel cells"
    assert mask.shape == (height, width) and mask[point[1], point[0]]


def test_registry_is_read_only_and_matches_the_settings_schema():
    assert set(REFINERS) == set(config.REFINERS) == {"sam", "threshold", "guided"}
    with pytest.raises(TypeError):
        REFINERS["other"] = ThresholdRefiner  # type: ignore[index]
    with pytest.raises(ValueError, match="sam_checkpoint is unset"):
        AttendConfig(refiner="sam")


# -- guided refiner ---------------------------------------------------------------------------------------


def _joint_bilateral_loop(maps: np.ndarray, guide: np.ndarray, radius: int, sigma: float) -> np.ndarray:
    """One pass of the joint bilateral filter pixel by pixel, from its definition (the reference)."""
    _, height, width = maps.shape
    out = np.zeros_like(maps)
    for y in range(height):
        for x in range(width):
            total, acc = 0.0, np.zeros(maps.shape[0])
            for dy in range(-radius, radius + 1):
                for dx in range(-radius, radius + 1):
                    qy, qx = (
                        min(max(y + dy, 0), height - 1),
                        min(max(x + dx, 0), width - 1),
                    )  # replicated border
                    colour = ((guide[:, qy, qx] - guide[:, y, x]) ** 2).sum()
                    w = math.exp(-colour / (2 * sigma**2) - (dy * dy + dx * dx) / (2 * radius**2))
                    total += w
                    acc += w * maps[:, qy, qx]
            out[:, y, x] = acc / total
    return out


def test_joint_bilateral_equals_the_per_pixel_definition():
    generator = torch.Generator().manual_seed(0)
    maps, guide = torch.rand(2, 9, 11, generator=generator), torch.rand(3, 9, 11, generator=generator)
    once = joint_bilateral(maps, guide, radius=2, sigma_colour=0.3)
    expected = _joint_bilateral_loop(maps.double().numpy(), guide.double().numpy(), 2, 0.3)
    np.testing.assert_allclose(once.numpy(), expected, rtol=1e-5, atol=1e-6)
    twice = joint_bilateral(maps, guide, radius=2, sigma_colour=0.3, iterations=2)
    expected = _joint_bilateral_loop(expected, guide.double().numpy(), 2, 0.3)
    np.testing.assert_allclose(twice.numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="must share H, W"):
        joint_bilateral(maps, guide[:, :8], radius=2, sigma_colour=0.3)


def _square_scene(size: int, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """A red square on grey and the bicubic upsampling of an 8 x 8 map whose peak cell holds the square's
    centre: the situation of a shapes-world phrase (an object smaller than a few cells)."""
    x0, y0, x1, y1 = box
    image = np.full((size, size, 3), 128, dtype=np.uint8)
    image[y0:y1, x0:x1] = (220, 30, 30)
    truth = np.zeros((size, size), dtype=bool)
    truth[y0:y1, x0:x1] = True
    coarse = torch.zeros(8, 8)
    cell = size // 8
    cy, cx = (y0 + y1) // 2 // cell, (x0 + x1) // 2 // cell
    coarse[cy, cx] = 1.0
    coarse[cy, cx + 1] = coarse[cy + 1, cx] = 0.5  # attention leaking onto neighbouring cells
    return image, truth, upsample_map(coarse, (size, size), aspect="resize")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize(
    ("size", "max_side"),
    [
        (64, 1024),
        (256, 1024),
        (512, 256),
    ],  # 256: filtered at 64 px, then edge passes; 512: edge passes at 256 px
)
def test_guided_refiner_follows_the_object_edge_where_the_threshold_spills(size, max_side):
    scale = size // 64
    image, truth, upsampled = _square_scene(size, (22 * scale, 18 * scale, 36 * scale, 31 * scale))
    point = argmax_point(upsampled)
    assert truth[point[1], point[0]]
    (plain,) = ThresholdRefiner()(image, [point], [upsampled])
    (guided,) = GuidedRefiner(max_side=max_side)(image, [point], [upsampled])
    assert guided.shape == truth.shape and guided.dtype == bool
    assert _iou(plain, truth) < 0.75  # the coarse map's half-height region misses the square's outline
    assert _iou(guided, truth) > 0.9


def test_guided_refiner_on_a_flat_image_blurs_the_map_around_its_peak():
    """With no edges in the image the filter is a plain Gaussian blur: the region grows evenly around the peak."""
    height, width = 60, 80
    upsampled = _gaussian(height, width, 40, 30, 6.0)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    (mask,) = GuidedRefiner()(image, [(40, 30)], [upsampled])
    (plain,) = ThresholdRefiner()(image, [(40, 30)], [upsampled])
    assert mask.sum() > plain.sum() and (mask | plain).sum() == mask.sum()
    np.testing.assert_array_equal(mask[:, 1:], mask[:, 1:][:, ::-1])  # symmetric about x = 40
    np.testing.assert_array_equal(mask[1:], mask[1:][::-1])  # and about y = 30


def test_guided_refiner_settings_are_checked():
    assert build_refiner(AttendConfig(refiner="guided", threshold_fraction=0.7)).fraction == 0.7
    with pytest.raises(ValueError, match="threshold_fraction must be in"):
        AttendConfig(threshold_fraction=1.5)
    with pytest.raises(ValueError, match="radius"):
        GuidedRefiner(radius=0.0)
    with pytest.raises(ValueError, match="sigma_colour"):
        GuidedRefiner(iterations=0)
    with pytest.raises(ValueError, match="edge_passes"):
        GuidedRefiner(edge_passes=-1)


# -- SAM --------------------------------------------------------------------------------------------------

SAM_IMAGE = 64  # input size; 16 px patches -> a 4x4 image embedding


def _tiny_sam() -> Sam:
    """The same classes as build_sam, scaled down (depth 2, width 32) so that it predicts in milliseconds."""
    prompt_dim = 32
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=2,
            embed_dim=32,
            img_size=SAM_IMAGE,
            mlp_ratio=2,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=[1],
            window_size=2,
            out_chans=prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(SAM_IMAGE // 16, SAM_IMAGE // 16),
            input_image_size=(SAM_IMAGE, SAM_IMAGE),
            mask_in_chans=8,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=64, num_heads=2),
            transformer_dim=prompt_dim,
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("sam") / "tiny_sam.pth"
    torch.save(_tiny_sam().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(48, 80, 3), dtype=np.uint8)


def test_sam_refiner_keeps_the_last_multimask(sam_checkpoint, image):
    refiner = SamRefiner(sam_checkpoint, model_type=_tiny_sam)
    points = [(10, 20), (70, 5), (40, 40)]
    masks = refiner(image, points, [None] * 3)
    assert len(masks) == 3
    assert all(m.shape == image.shape[:2] and m.dtype == bool for m in masks)

    # Independent reference: the same weights loaded directly into a predictor, one call per point.
    sam = _tiny_sam()
    sam.load_state_dict(torch.load(sam_checkpoint, weights_only=True))
    predictor = SamPredictor(sam.eval())
    predictor.set_image(image)
    chose_last_over_others = False
    for (x, y), mask in zip(points, masks, strict=True):
        logits_masks, _, low_res = predictor.predict(
            point_coords=np.array([[x, y]]),
            point_labels=np.array([1]),
            multimask_output=True,
            return_logits=True,
        )
        assert logits_masks.shape == (3, *image.shape[:2])
        np.testing.assert_array_equal(mask, logits_masks[-1] > 0)
        chose_last_over_others |= not np.array_equal(mask, logits_masks[0] > 0)
    assert chose_last_over_others, "the three multimask outputs should differ for this seed"


def test_sam_refiner_embeds_each_image_once(sam_checkpoint, image, monkeypatch):
    refiner = SamRefiner(sam_checkpoint, model_type=_tiny_sam)
    calls = []
    original = refiner.predictor.set_image
    monkeypatch.setattr(refiner.predictor, "set_image", lambda *a, **k: calls.append(1) or original(*a, **k))
    refiner(image, [(1, 1), (2, 2), (3, 3), (4, 4)], [None] * 4)
    assert len(calls) == 1
    assert refiner(image, [], []) == []


def test_sam_loading_errors_name_the_file(tmp_path, sam_checkpoint):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        SamRefiner(missing)
    with pytest.raises(ValueError, match=r"tiny_sam\.pth.*vit_b.*shape mismatches") as err:
        SamRefiner(sam_checkpoint, model_type="vit_b")  # a ViT-B has other keys and shapes
    assert "\n" not in str(err.value)
    partial_state = tmp_path / "partial.pth"
    state = torch.load(sam_checkpoint, weights_only=True)
    state.pop("mask_decoder.iou_token.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, partial_state)
    with pytest.raises(
        ValueError, match=r"partial\.pth.*1 missing keys \(first: mask_decoder\.iou_token\.weight\)"
    ):
        SamRefiner(partial_state, model_type=_tiny_sam)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": object()}, pickled)  # not loadable with weights_only=True
    with pytest.raises(ValueError, match=r"pickled\.pth is not a loadable state dict"):
        SamRefiner(pickled, model_type=_tiny_sam)
    with pytest.raises(ValueError, match="unknown SAM model type"):
        SamRefiner(sam_checkpoint, model_type="vit_x")
