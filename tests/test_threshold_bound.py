"""benchmarks/threshold_bound.py: the grid maps an ideal model could give, and the refiner's masks from them."""

import numpy as np
import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bound():
    return load_benchmark("threshold_bound")


def test_coverage_map_is_each_cells_covered_fraction_after_padding(bound):
    mask = np.zeros((48, 64), bool)  # landscape: padded by 8 rows above and below to a 64 x 64 square
    mask[0:8, 0:4] = True  # image rows 0-7 = square rows 8-15: cell (1, 0) of an 8 x 8 grid, half of it
    cells = bound.coverage_map(mask, 8)
    expected = torch.zeros(8, 8)
    expected[1, 0] = 0.5
    torch.testing.assert_close(cells, expected)


def test_a_shape_filling_whole_cells_is_recovered_and_a_sliver_is_not(bound):
    block = np.zeros((64, 64), bool)
    block[16:32, 16:32] = True  # exactly cells (2..3, 2..3) of an 8 x 8 grid
    sliver = np.zeros((64, 64), bool)
    sliver[20:23, 20:23] = True  # 9 px inside one 64-px cell
    rows = bound.bound_rows([block, sliver], grids=[8], flats=[0.5], fraction=0.5)
    assert [r["map"] for r in rows] == ["coverage", "cells >= 0.5"]
    for r in rows:
        assert r["recall"] == 0.5  # the block (IoU > 0.5), not the sliver (its blob is a whole cell or more)
        assert r["recall 0-0.03"] == 0.0 and r["recall 0.03-0.08"] == 1.0
    refiner = bound.ThresholdRefiner(0.5)
    assert bound.refined_iou(sliver, bound.coverage_map(sliver, 8), refiner) < 9 / 64 + 1e-6


def test_shifted_copies_recover_a_shape_that_straddles_cells(bound):
    # A 10-px square at pixels 19-28 of a 64-px image: 5 px in each of two 8-px cells per axis, so the flat map
    # is the 16-px block of four cells and its mask is too large. On the copies shifted by 4 px the square
    # sits in other cells; their average ends nearer the square's edges.
    mask = np.zeros((64, 64), bool)
    mask[19:29, 19:29] = True
    refiner = bound.ThresholdRefiner(0.5)
    cells = bound.coverage_map(mask, 8)
    flat = bound.refined_iou(mask, (cells >= 0.5 * cells.max()).float(), refiner)
    assert bound.shifted_flat_map(mask, 8, 0.5, 2).shape == (64, 64)
    assert bound.refined_iou(mask, bound.shifted_flat_map(mask, 8, 0.5, 1), refiner) == pytest.approx(flat)
    assert flat <= 0.5 < bound.refined_iou(mask, bound.shifted_flat_map(mask, 8, 0.5, 2), refiner)
    rows = bound.bound_rows([mask], grids=[8], flats=[0.5], fraction=0.5, shifts=2)
    assert [(r["map"], r["recall"]) for r in rows] == [
        ("coverage", rows[0]["recall"]),
        ("cells >= 0.5", 0.0),
        ("cells >= 0.5, 2 x 2 shifts", 1.0),
    ]
