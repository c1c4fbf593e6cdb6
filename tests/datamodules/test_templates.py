"""Label masks of both templates against hand-written token/label arrays (multi-turn, text-only, truncation)."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.errors import SkipSample
from datamodules.templates import ConversationError, get_template
from datamodules.word_tokenizer import build_word_tokenizer
from lmm.batch import IGNORE_INDEX, collate
from lmm.preprocess import SampleEncoder, token_labels

CORPUS = ["What color is it?", "Red.", "Is it a circle?", "Yes.", "A red circle.", "Describe the image."]


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(CORPUS)


def _encoder(tok, template, n_image=4, max_length=512):
    return SampleEncoder(tok, get_template(template), n_image, max_length)


def _tokens(tok, ids):
    return tok.convert_ids_to_tokens(ids.tolist())


def _targets(tok, sample):
    """The token strings that carry loss, in order."""
    ids, labels = sample["input_ids"], sample["labels"]
    assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    return tok.convert_ids_to_tokens(ids[labels != IGNORE_INDEX].tolist())


def test_plain_template_masks_bos_and_image(tok):
    record = {
        "conversations": [
            {"from": "human", "value": "Describe the image.\n<image>"},
            {"from": "gpt", "value": "A red circle."},
        ]
    }
    sample = _encoder(tok, "plain", n_image=3)(record, Image.new("RGB", (8, 8)))
    assert _tokens(tok, sample["input_ids"]) == [
        "<s>",
        "<image>",
        "<image>",
        "<image>",
        "A",
        "▁red",
        "▁circle",
        ".",
        "\n",
    ]
    assert sample["labels"][:4].tolist() == [IGNORE_INDEX] * 4
    assert _targets(tok, sample) == ["A", "▁red", "▁circle", ".", "\n"]
    assert sample["image"].shape == (8, 8, 3) and sample["image"].dtype == torch.uint8  # decoded pixels


def test_vicuna_multi_turn_labels_each_reply_and_its_eos(tok):
    record = {
        "conversations": [
            {
                "from": "human",
                "value": "What color is it?\n<image>",
            },  # placeholder moved to the front, as LLaVA does
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Is it a circle?"},
            {"from": "gpt", "value": "Yes."},
        ]
    }
    sample = _encoder(tok, "vicuna_v1", n_image=2)(record, Image.new("RGB", (8, 8)))
    tokens = _tokens(tok, sample["input_ids"])
    start = tokens.index("▁USER")
    assert tokens[start:] == [
        "▁USER",
        ":",
        "▁",
        "<image>",
        "<image>",
        "\n",
        "What",
        "▁color",
        "▁is",
        "▁it",
        "?",
        "▁ASSISTANT",
        ":",
        "▁Red",
        ".",
        "</s>",
        "USER",
        ":",
        "▁Is",
        "▁it",
        "▁a",
        "▁circle",
        "?",
        "▁ASSISTANT",
        ":",
        "▁Yes",
        ".",
        "</s>",
    ]
    expected = [False] * (start + 13) + [True] * 3 + [False] * 9 + [True] * 3
    assert (sample["labels"] != IGNORE_INDEX).tolist() == expected
    assert "<unk>" not in tokens


def test_question_first_template_puts_the_image_after_the_question_and_labels_the_same_replies(tok):
    """vicuna_v1_question_first: the first user turn is the question, a newline, then the image's tokens (the
    placeholder moved to the end wherever it was); the reply tokens that carry loss are vicuna_v1's."""
    record = {
        "conversations": [
            {"from": "human", "value": "<image>\nWhat color is it?"},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Is it a circle?"},
            {"from": "gpt", "value": "Yes."},
        ]
    }
    image = Image.new("RGB", (8, 8))
    first = _encoder(tok, "vicuna_v1_question_first", n_image=2)(record, image)
    tokens = _tokens(tok, first["input_ids"])
    start = tokens.index("▁USER")
    assert tokens[start : start + 11] == [
        "▁USER", ":", "▁What", "▁color", "▁is", "▁it", "?", "\n", "<image>", "<image>", "▁ASSISTANT"
    ]  # fmt: skip
    assert _targets(tok, first) == _targets(tok, _encoder(tok, "vicuna_v1", n_image=2)(record, image))
    chat = get_template("vicuna_v1_question_first")
    assert chat.prompt("<image> What color is it?", has_image=True).endswith(
        "USER: What color is it?\n<image> ASSISTANT:"
    )
    assert chat.render(record["conversations"][:2], True).text.startswith(
        chat.prompt("What color is it?", True)
    )


def test_vicuna_text_only_sample_has_no_image(tok):
    record = {
        "conversations": [{"from": "human", "value": "Is it a circle?"}, {"from": "gpt", "value": "Yes."}]
    }
    sample = _encoder(tok, "vicuna_v1")(record, None)
    assert "image" not in sample
    assert tok.convert_tokens_to_ids("<image>") not in sample["input_ids"].tolist()
    assert _targets(tok, sample) == ["▁Yes", ".", "</s>"]


TWO_TURNS = {
    "conversations": [
        {"from": "human", "value": "<image>\\nWhat color is it?"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Is it a circle?"},
        {"from": "gpt", "value": "Yes."},
    ]
}


def test_truncation_keeps_the_first_reply_and_cuts_the_second(tok):
    record = TWO_TURNS
    full = _encoder(tok, "vicuna_v1", n_image=2)(record, Image.new("RGB", (8, 8)))
    cut = len(full["input_ids"]) - 2  # drops "." and "</s>" of the second reply
    sample = _encoder(tok, "vicuna_v1", n_image=2, max_length=cut)(record, Image.new("RGB", (8, 8)))
    assert len(sample["input_ids"]) == cut
    assert _targets(tok, sample) == ["▁Red", ".", "</s>", "▁Yes"]


def test_truncation_that_leaves_nothing_to_learn_skips(tok):
    record = {
        "conversations": [
            {"from": "human", "value": "<image>\nWhat color is it?"},
            {"from": "gpt", "value": "Red."},
        ]
    }
    with pytest.raises(SkipSample) as err:
        _encoder(tok, "vicuna_v1", n_image=16, max_length=40)(record, Image.new("RGB", (8, 8)))
    assert err.value.kind == "too_long"


@pytest.mark.parametrize(
    "conversation",
    [
        [{"from": "human", "value": "<image>\nWhat color is it?"}],  # no assistant turn
        [{"from": "gpt", "value": "Red."}, {"from": "gpt", "value": "Red."}],
        [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "   "}],
        "not a list",
    ],
)
def test_unusable_conversations_are_skipped(tok, conversation):
    with pytest.raises(SkipSample) as err:
        _encoder(tok, "vicuna_v1")({"conversations": conversation}, Image.new("RGB", (8, 8)))
    assert err.value.kind == "bad_conversation"


def test_record_naming_an_image_it_lacks_is_skipped(tok):
    record = {
        "image": "x.jpg",
        "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Red."}],
    }
    with pytest.raises(SkipSample) as err:
        _encoder(tok, "vicuna_v1")(record, None)
    assert err.value.kind == "missing_image"


def test_token_labels_ignores_the_space_a_token_carries():
    text = "ab: cd"
    assert token_labels(text, [(0, 2), (2, 3), (3, 6)], [(4, 6)]) == [False, False, True]
    assert token_labels(text, [(0, 0)], [(0, 6)]) == [False]  # BOS-like empty span
    assert token_labels("a\n", [(0, 1), (1, 2)], [(0, 2)]) == [True, True]  # whitespace-only token


def _token_labels_one_by_one(text, offsets, spans):
    """The rule written out per token, as the vectorised ``token_labels`` must apply it."""
    flags = []
    for start, end in offsets:
        first = start
        while first < end and text[first].isspace():
            first += 1
        if first == end:
            first = start
        flags.append(start < end and any(s <= first and end <= e for s, e in spans))
    return flags


def test_token_labels_agrees_with_the_rule_token_by_token():
    rng = np.random.default_rng(0)
    alphabet = list("ab.é漢") + [" ", "\n", "\t", "\u3000", "\xa0", "\u2028"]  # Unicode spaces too
    for _ in range(200):
        text = "".join(rng.choice(alphabet, int(rng.integers(1, 40))))
        cuts = np.sort(rng.choice(len(text) + 1, int(rng.integers(1, len(text) + 2)), replace=True))
        offsets = list(zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True)) + [(0, 0)]
        edges = np.sort(rng.choice(len(text) + 1, 4))
        spans = [(int(edges[0]), int(edges[1])), (int(edges[2]), int(edges[3]))]
        assert token_labels(text, offsets, spans) == _token_labels_one_by_one(text, offsets, spans)


class _WrapperOnly:
    """The tokenizer seen only through its Python wrapper (no ``backend_tokenizer``)."""

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def __getattr__(self, name):
        if name == "backend_tokenizer":
            raise AttributeError(name)
        return getattr(self._tok, name)


def test_backend_tokenisation_equals_the_wrapper(tok):
    record = TWO_TURNS
    image = Image.new("RGB", (4, 4))
    fast = SampleEncoder(tok, get_template("vicuna_v1"), 3, 512)(record, image)
    slow = SampleEncoder(_WrapperOnly(tok), get_template("vicuna_v1"), 3, 512)(record, image)
    assert fast["input_ids"].tolist() == slow["input_ids"].tolist()
    assert fast["labels"].tolist() == slow["labels"].tolist()
    # A tokenizer.json that carries truncation must not cut samples: the wrapper path is taken then.
    capped = copy.deepcopy(tok)
    capped.backend_tokenizer.enable_truncation(max_length=5)
    assert len(capped.backend_tokenizer.encode("Is it a circle? Yes. Red.").ids) == 5
    assert SampleEncoder(capped, get_template("vicuna_v1"), 3, 512)(record, image)["input_ids"].tolist() == (
        fast["input_ids"].tolist()
    )


def test_prompt_ends_where_training_text_starts_the_reply():
    chat = get_template("vicuna_v1")
    rendered = chat.render([{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}], has_image=True)
    prompt = chat.prompt("Q?", has_image=True)
    assert rendered.text.startswith(prompt)
    assert rendered.text[rendered.target_spans[0][0] - 1] == " "
    with pytest.raises(ConversationError):
        get_template("plain").render(
            [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], has_image=False
        )


def test_collate_pads_right_and_packs_only_present_images(tok):
    enc = _encoder(tok, "vicuna_v1", n_image=2)
    image_record = {
        "conversations": [
            {"from": "human", "value": "<image>\nIs it a circle?"},
            {"from": "gpt", "value": "Yes."},
        ]
    }
    wide = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    tall = np.full((9, 4, 3), 200, dtype=np.uint8)
    tall[0, 0] = (1, 2, 3)
    a = enc(image_record, Image.fromarray(wide))
    b = enc({"conversations": [{"from": "human", "value": "Is it?"}, {"from": "gpt", "value": "Red."}]}, None)
    c = enc(image_record, Image.fromarray(tall))
    batch = collate([b, a, c], pad_token_id=tok.pad_token_id)
    assert batch.images.sizes == [(6, 8), (9, 4)] and batch.images.data.dtype == torch.uint8
    unpacked = batch.images.unpack()
    assert [u.numpy().tolist() for u in unpacked] == [wide.tolist(), tall.tolist()]
    with pytest.raises(ValueError, match="packed images hold"):
        dataclasses.replace(batch.images, sizes=[(6, 8)]).unpack()
    n_b = len(b["input_ids"])
    assert batch.attention_mask[0].tolist() == [1] * n_b + [0] * (batch.input_ids.shape[1] - n_b)
    assert (batch.input_ids[0, n_b:] == tok.pad_token_id).all()
    assert (batch.labels[0, n_b:] == IGNORE_INDEX).all()
    text_only = collate([b], pad_token_id=tok.pad_token_id)
    assert text_only.images is None and len(text_only) == 1
