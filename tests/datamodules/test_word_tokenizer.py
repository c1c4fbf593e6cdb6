"""Tests for the word-level tokenizer: special-token ids, exact round trips, `<unk>` behaviour, CHAT_TEXTS
coverage, words known both at line start and after a space, determinism, and save/load with AutoTokenizer.
"""

import random

import pytest

from datamodules.word_tokenizer import (
    CHAT_TEXTS,
    IMAGE_TOKEN,
    SPECIAL_TOKENS,
    build_word_tokenizer,
    load_word_tokenizer,
    unknown_words,
)

CORPUS = (
    "A large red circle is top left, a small blue square is low and a small green triangle is central.",
    "<image>\nDescribe the image in detail.",
    "What colour do you get by mixing red and yellow?",
    "Orange.",
    "Line one\nline two\n\nline four, with punctuation: yes!",
    "It's the human's turn (again).",
)


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(CORPUS)


def test_special_tokens_have_fixed_ids(tok):
    assert tok.convert_ids_to_tokens(list(range(5))) == list(SPECIAL_TOKENS)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == 4
    assert IMAGE_TOKEN in tok.all_special_tokens


def test_image_token_is_a_single_token_in_context(tok):
    ids = tok(f"USER: {IMAGE_TOKEN}\nDescribe the image in detail. ASSISTANT:")["input_ids"]
    assert ids.count(4) == 1
    assert ids[0] == tok.bos_token_id
    assert tok.unk_token_id not in ids


@pytest.mark.parametrize("text", CORPUS + CHAT_TEXTS)
def test_round_trip_is_exact(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    with_bos = tok(text)["input_ids"]
    assert with_bos[0] == tok.bos_token_id and with_bos[1:] == ids
    assert tok.decode(with_bos) == "<s>" + text


def test_chat_texts_always_known_and_template_pieces_tokenise():
    tok = build_word_tokenizer([])
    assert unknown_words(tok, CHAT_TEXTS) == []
    system = CHAT_TEXTS[0]
    prompt = f"{system} USER: {IMAGE_TOKEN}\nASSISTANT:</s>"
    assert unknown_words(tok, [prompt, " USER:", "USER: ", " ASSISTANT:"]) == []
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == prompt
    assert ids[-1] == tok.eos_token_id


def test_word_known_at_line_start_and_after_space(tok):
    # "Orange" only appears at the start of a text in CORPUS, "large" only after a space.
    for text in ("x Orange", "Orange", "large", "\nlarge", "red\nOrange"):
        if text.startswith("x"):
            assert unknown_words(tok, [text]) == [text]  # "x" is not in the corpus
        else:
            assert unknown_words(tok, [text]) == []
    vocab = tok.get_vocab()
    for word in ("red", "▁red", "Orange", "▁Orange", "\n", "▁"):
        assert word in vocab


def test_unknown_word_maps_to_unk(tok):
    ids = tok("a purple elephant", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id in ids
    assert unknown_words(tok, ["a purple elephant", "a large circle"]) == ["a purple elephant"]


def test_vocabulary_independent_of_text_order(tok):
    shuffled = list(CORPUS) * 2
    random.Random(0).shuffle(shuffled)
    assert build_word_tokenizer(shuffled).get_vocab() == tok.get_vocab()


def test_save_and_load(tok, tmp_path):
    tok.save_pretrained(str(tmp_path / "a"))
    loaded = load_word_tokenizer(tmp_path / "a")
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    )
    assert loaded.convert_tokens_to_ids(IMAGE_TOKEN) == 4
    for text in CORPUS:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text
    # Saving is deterministic, so a generated world's tokenizer files are byte-identical across runs.
    build_word_tokenizer(CORPUS).save_pretrained(str(tmp_path / "b"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
