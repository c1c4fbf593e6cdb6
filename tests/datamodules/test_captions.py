"""Distinct-caption batches for contrastive tower pretraining (datamodules.captions.DistinctCaptionBatches)."""

from collections import Counter

import pytest

from datamodules.captions import DistinctCaptionBatches


def _captions(counts: dict[str, int]) -> list[str]:
    return [caption for caption, n in counts.items() for _ in range(n)]


def test_no_batch_repeats_a_caption_and_every_sample_is_used_at_most_once_per_epoch():
    captions = _captions({f"caption {i}": 10 + i for i in range(12)})  # 12 captions, 10..21 images each
    batches = DistinctCaptionBatches(captions, batch_size=8, seed=3).batches(0)
    used = [i for batch in batches for i in batch]
    assert len(used) == len(set(used))
    assert all(len(batch) == 8 for batch in batches)
    assert all(len({captions[i] for i in batch}) == 8 for batch in batches)
    # Only the samples that could not complete a batch wait: fewer than one batch's worth per missing caption.
    assert len(captions) - len(used) < 8 * 8


def test_as_many_captions_as_the_batch_size_puts_each_caption_in_every_batch():
    captions = _captions({f"a {c} {k}": 7 for c in ("red", "blue") for k in ("circle", "square", "star")})
    batches = DistinctCaptionBatches(captions, batch_size=6, seed=0).batches(0)
    assert len(batches) == 7
    for batch in batches:
        assert Counter(captions[i] for i in batch) == Counter(set(captions))


def test_the_order_is_fixed_by_seed_and_epoch():
    captions = _captions({f"c{i}": 5 for i in range(10)})
    sampler = DistinctCaptionBatches(captions, batch_size=4, seed=1)
    first = list(sampler)
    assert first == list(DistinctCaptionBatches(captions, batch_size=4, seed=1))
    assert first != list(DistinctCaptionBatches(captions, batch_size=4, seed=2))
    sampler.set_epoch(1)
    assert list(sampler) != first and len(sampler) == len(list(sampler))


def test_all_distinct_captions_give_plain_shuffled_batches():
    captions = [f"caption {i}" for i in range(50)]
    batches = DistinctCaptionBatches(captions, batch_size=16, seed=0).batches(0)
    assert len(batches) == 3 and len({i for b in batches for i in b}) == 48


def test_a_batch_larger_than_the_number_of_captions_is_refused():
    with pytest.raises(ValueError, match="batches of 8 need at least 8 different captions; the data has 3"):
        DistinctCaptionBatches(_captions({"a": 5, "b": 5, "c": 5}), batch_size=8)
