"""ChatRunner (what the lmms-eval plugin runs) against the model's own generate and its own loss."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.templates import get_template
from lmm.chat_runner import ChatRunner, cut_at_stops
from lmm.preprocess import IGNORE_INDEX
from lmm.run_dir import load_run

QUESTIONS = ["What colour is the circle?", "How many shapes are there?", "Is there a red square?", "Say hi."]


@pytest.fixture(scope="module")
def run_model(tiny_run):
    model, _ = load_run(tiny_run)
    return model


@pytest.fixture(scope="module")
def pictures(tiny_world):
    """Two world images, one of them cropped to a wide rectangle (padding differs), and a text-only slot."""
    questions = json.loads((tiny_world / "val_qa.json").read_text())
    questions = questions["questions"] if isinstance(questions, dict) else questions
    first = Image.open(tiny_world / questions[0]["image"]).convert("RGB")
    second = Image.open(tiny_world / questions[1]["image"]).convert("RGB")
    wide = second.crop((0, 0, second.width, second.height // 2))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 24, 3), dtype=np.uint8))
    return [first, wide, noise, None]


def own_generate(model, question, image, max_new_tokens):
    """The model's own API, one request at a time (no padding)."""
    template = get_template("vicuna_v1")
    pixels = None if image is None else model.encoder.image_transform("pad")(image)
    return model.generate([template.prompt(question, image is not None)], [pixels], max_new_tokens)[0]


def test_generate_equals_the_models_own_generate(run_model, pictures):
    runner = ChatRunner(run_model, "vicuna_v1", "pad")
    got = runner.generate(QUESTIONS, pictures, max_new_tokens=6)
    expected = [own_generate(run_model, q, im, 6) for q, im in zip(QUESTIONS, pictures, strict=True)]
    assert got == expected
    # max_new_tokens is honoured: two tokens give the first two of six (greedy is prefix-stable).
    short = runner.generate(QUESTIONS, pictures, max_new_tokens=2)
    assert short == [own_generate(run_model, q, im, 2) for q, im in zip(QUESTIONS, pictures, strict=True)]
    # Stop strings cut the text: a word of an answer stops it there.
    words = [w for text in expected for w in text.split()[1:]]
    if words:
        stop = words[0]
        cut = runner.generate(QUESTIONS, pictures, max_new_tokens=6, until=["@@never@@", stop])
        assert cut == [text.split(stop, 1)[0].strip() for text in expected]


def test_cut_at_stops_uses_the_first_stop_found():
    assert cut_at_stops("a. b\n\nc", ["\n\n", "."]) == "a"
    assert cut_at_stops("abc", ["", "x"]) == "abc"


def test_loglikelihood_is_the_summed_token_logprob(run_model, pictures):
    runner = ChatRunner(run_model, "vicuna_v1", "pad")
    greedy = runner.generate(QUESTIONS, pictures, max_new_tokens=3)
    answers = ["Red.", "Two shapes.", greedy[2] or "Yes.", greedy[3] or "Hi."]
    for score_stop in (False, True):
        got = runner.loglikelihood(QUESTIONS, answers, pictures, score_stop=score_stop)
        for (logprob, is_greedy), q, a, image in zip(got, QUESTIONS, answers, pictures, strict=True):
            prompt = runner.prompt(q, image is not None)
            full = runner.conversation(q, a, image is not None, score_stop)
            n = len(runner.token_ids(full)) - len(runner.token_ids(prompt))
            # Reference 1: transformers' own causal-LM loss on the unpadded sample, labels on the answer only.
            pixels = None if image is None else runner.transform(image)
            batch = run_model.prepare_prompts([full], [pixels])
            labels = batch.input_ids.clone()
            labels[:, :-n] = IGNORE_INDEX
            with torch.no_grad():
                loss = run_model(batch.input_ids, batch.attention_mask, batch.images, labels).loss
            assert logprob == pytest.approx(-loss.item() * n, rel=1e-5, abs=1e-5)
            # Reference 2: greedy decoding of n tokens from the prompt reproduces the answer's tokens or not.
            decoded = run_model.generate_from(run_model.prepare_prompts([prompt], [pixels]), max_new_tokens=n)
            assert is_greedy == (decoded[0].tolist() == batch.input_ids[0, -n:].tolist())


def test_the_models_own_greedy_caption_scores_as_greedy(run_model, pictures):
    # The plain (pretraining) template puts the reply right after <image>, so a greedy caption re-tokenises
    # to the tokens that were generated (vicuna_v1's "ASSISTANT: " space makes a tiny model's bare tokens differ).
    runner = ChatRunner(run_model, "plain", "crop")
    prompt = runner.prompt("", has_image=True)
    new = run_model.generate_from(runner.batch([prompt], [pictures[0]]), max_new_tokens=3, eos_token_id=[])
    caption = runner.decode(new)[0]
    assert (
        runner.token_ids(runner.conversation("", caption, True))[len(runner.token_ids(prompt)) :]
        == new[0].tolist()
    )
    (logprob, is_greedy), (other, other_greedy) = runner.loglikelihood(
        ["", ""], [caption, caption + " red"], [pictures[0]] * 2
    )
    assert is_greedy and not other_greedy and other < logprob


def test_reference_preprocessing_matches_llava_grounding(tmp_path):
    from lmm.groundable import LlavaGrounding
    from lmm.released.llava15 import load_llava15
    from lmm.released.random_release import write_random_llava15

    weights, clip = write_random_llava15(tmp_path, "tiny", dtype=torch.float32)
    model = load_llava15(weights, clip)
    runner = ChatRunner(model, "vicuna_v1", "pad", reference=True)
    rng = np.random.default_rng(1)
    images = [
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in ((30, 50, 3), (44, 20, 3))
    ]
    questions = ["w5 w6 w7", "w8"]
    reference = LlavaGrounding(model)
    expected = reference.prepare(images, questions)
    batch = runner.batch([runner.prompt(q, True) for q in questions], images)
    assert torch.equal(batch.input_ids, expected.inputs.input_ids)
    assert torch.equal(batch.attention_mask, expected.inputs.attention_mask)
    assert torch.equal(batch.images, expected.inputs.images)
    got = runner.generate(questions, images, max_new_tokens=5)
    assert got == runner.decode(reference.generate(expected, 5)) and len(got) == 2
