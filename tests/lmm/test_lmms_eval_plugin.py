"""The lmms-eval plugin on a tiny trained run: requests in, the model's own answers and log-probs out;
lmms-eval's evaluator (Python API and CLI) on the shapes world's held-out questions equals lmm.qa_eval."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip(
    "lmms_eval", reason="lmms-eval is not installed (pip install -e '.[eval]'); the plugin tests are skipped"
)

from lmms_eval.api.instance import Instance  # noqa: E402

from datamodules.templates import get_template  # noqa: E402
from lmm.lmms_eval_plugin import EmergentGrounding  # noqa: E402
from lmm.preprocess import IGNORE_INDEX  # noqa: E402
from lmm.run_dir import load_run  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TASK, SPLIT = "toy", "test"


@pytest.fixture(scope="module")
def plugin(tiny_run):
    model = EmergentGrounding(run=str(tiny_run), batch_size=3, device="cpu")
    rng = np.random.default_rng(0)
    docs = [
        {"image": Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)), "q": q}
        for shape, q in (
            ((32, 32, 3), "What colour is the circle?"),
            ((24, 40, 3), "How many shapes are there?"),
            ((40, 20, 3), "Is there a red square in the picture?"),
        )
    ]
    docs.append({"image": None, "q": "Say hi."})
    docs.append({"image": [docs[0]["image"], docs[1]["image"], docs[2]["image"]], "q": "Which one?"})
    model.task_dict = {TASK: {SPLIT: docs}}
    return model


def visual(doc):
    image = doc["image"]
    return [] if image is None else image if isinstance(image, list) else [image]


def request(kind, doc_id, *args):
    return Instance(
        kind,
        (*args, visual, doc_id, TASK, SPLIT),
        idx=0,
        metadata={"task": TASK, "doc_id": doc_id, "repeats": 1},
    )


def own_answer(model, doc, max_new_tokens, until=()):
    """The model's own generate on one request (unpadded), cut at the stop strings."""
    image = doc["image"]
    pixels = None if image is None else model.encoder.image_transform("pad")(image)
    text = model.generate(
        [get_template("vicuna_v1").prompt(doc["q"], image is not None)], [pixels], max_new_tokens
    )[0]
    for stop in until:
        text = text.split(stop, 1)[0]
    return text.strip()


def test_generate_until_returns_the_models_own_generations(plugin, tiny_run):
    model, _ = load_run(tiny_run)
    docs = plugin.task_dict[TASK][SPLIT]
    settings = [
        {"max_new_tokens": 5, "until": ["\n\n"], "temperature": 0, "do_sample": False},
        {"max_new_tokens": 2},
        {"max_new_tokens": 5, "until": ["\n\n"], "temperature": 0, "do_sample": False},
        {"max_new_tokens": 5, "until": "ASSISTANT:", "image_aspect_ratio": "pad"},
    ]
    requests = [request("generate_until", i, docs[i]["q"], dict(s)) for i, s in enumerate(settings)]
    got = plugin.generate_until(requests)
    expected = []
    for i, s in enumerate(settings):
        until = [s["until"]] if isinstance(s.get("until"), str) else s.get("until", [])
        expected.append(own_answer(model, docs[i], s["max_new_tokens"], until))
    assert got == expected
    # A stop string taken from an answer cuts it there.
    words = [w for text in expected for w in text.split()[1:]]
    if words:
        cut = plugin.generate_until(
            [request("generate_until", 1, docs[1]["q"], {"max_new_tokens": 5, "until": [words[0]]})]
        )
        assert cut == [own_answer(model, docs[1], 5, [words[0]])]


def test_loglikelihood_is_the_summed_logprob_of_the_continuation(plugin, tiny_run):
    model, _ = load_run(tiny_run)
    docs = plugin.task_dict[TASK][SPLIT]
    continuations = ["Red.", "Two.", "No.", "Hi there."]
    requests = [request("loglikelihood", i, docs[i]["q"], c) for i, c in enumerate(continuations)]
    got = plugin.loglikelihood(requests)
    template = get_template("vicuna_v1")
    tok = model.llm.tokenizer
    for (logprob, is_greedy), doc, answer in zip(got, docs[:4], continuations, strict=True):
        has_image = doc["image"] is not None
        prompt = template.prompt(doc["q"], has_image)
        full = f"{prompt} {answer}"
        n = len(tok(full)["input_ids"]) - len(tok(prompt)["input_ids"])
        pixels = None if not has_image else model.encoder.image_transform("pad")(doc["image"])
        batch = model.prepare_prompts([full], [pixels])
        labels = batch.input_ids.clone()
        labels[:, :-n] = IGNORE_INDEX
        with torch.no_grad():
            out = model(batch.input_ids, batch.attention_mask, batch.images, labels)
        assert logprob == pytest.approx(-out.loss.item() * n, rel=1e-5)
        greedy = out.logits[0, -n - 1 : -1].argmax(-1)
        assert is_greedy == torch.equal(greedy, batch.input_ids[0, -n:])


def test_multi_round_follows_the_task_protocol(plugin, tiny_run):
    model, _ = load_run(tiny_run)
    docs = plugin.task_dict[TASK][SPLIT]
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        seen.append((list(previous_output), round_idx, previous_round_info))
        if round_idx == 2:
            return None, None, True, previous_output, None
        return [doc["image"]], "Describe the image.", False, None, {"round": round_idx}

    args = (docs[0]["q"], {"max_new_tokens": 3}, visual, doc_to_text, 0, TASK, SPLIT)
    (rounds,) = plugin.generate_until_multi_round(
        [Instance("generate_until_multi_round", args, 0, {"task": TASK, "doc_id": 0, "repeats": 1})]
    )
    first = own_answer(model, docs[0], 3)
    second = own_answer(model, {"image": docs[0]["image"], "q": "Describe the image."}, 3)
    assert rounds == [first, second]
    assert seen == [([first], 1, None), ([first, second], 2, {"round": 1})]


def test_bad_requests_and_model_args_fail_with_one_line(plugin, tiny_run):
    with pytest.raises(ValueError, match="toy doc 4 has 3 images.*multi_image=middle"):
        plugin.generate_until([request("generate_until", 4, "Which one?", {"max_new_tokens": 2})])
    with pytest.raises(ValueError, match="exactly one model"):
        EmergentGrounding(run=str(tiny_run), llava15=str(tiny_run))
    with pytest.raises(ValueError, match="multi_image='all' is not one of"):
        EmergentGrounding(run=str(tiny_run), multi_image="all")
    with pytest.raises(FileNotFoundError, match="run=.*does not exist"):
        EmergentGrounding(run=str(tiny_run / "missing"))


def test_middle_frame_policy_takes_the_middle_image(tiny_run, plugin):
    middle = EmergentGrounding(run=str(tiny_run), multi_image="middle", device="cpu")
    middle.task_dict = plugin.task_dict
    docs = plugin.task_dict[TASK][SPLIT]
    got = middle.generate_until([request("generate_until", 4, "Which one?", {"max_new_tokens": 3})])
    assert got == [own_answer(middle.model, {"image": docs[1]["image"], "q": "Which one?"}, 3)]


@pytest.mark.slow
def test_released_checkpoints_answer_as_the_reference_runs_them(tmp_path):
    # The release builders of test_llava_checkpoint write the real on-disk layouts (tiny shapes).
    from test_llava_checkpoint import QUESTION, images, write_difflmm

    from lmm.groundable import LlavaGrounding
    from lmm.released.difflmm import load_difflmm
    from lmm.released.llava15 import load_llava15
    from lmm.released.random_release import write_random_llava15

    weights, clip = write_random_llava15(tmp_path / "llava", "tiny", dtype=torch.float32)
    d = write_difflmm(tmp_path / "difflmm")
    sources = [
        ({"llava15": str(weights), "clip": str(clip)}, lambda: load_llava15(weights, clip)),
        (
            {
                "difflmm": str(d["run"]),
                "base": str(d["base"]),
                "sd": str(d["sd"]),
                "clip": str(d["clip"]),
                "noise": "fixed",
            },
            lambda: load_difflmm(d["run"], d["base"], d["sd"], d["clip"], noise="fixed"),
        ),
    ]
    pictures = images()
    for model_args, load in sources:
        plugin = EmergentGrounding(**model_args, device="cpu", batch_size=2)
        plugin.task_dict = {TASK: {SPLIT: [{"image": p, "q": QUESTION} for p in pictures]}}
        got = plugin.generate_until(
            [request("generate_until", i, QUESTION, {"max_new_tokens": 4}) for i in range(2)]
        )
        reference = LlavaGrounding(load())
        expected = [
            reference.model.decode(reference.generate(reference.prepare([p], [QUESTION]), 4))[0]
            for p in pictures
        ]
        assert got == expected, model_args


def test_the_entry_point_names_the_plugin():
    from importlib.metadata import entry_points

    if not any(ep.name == "emergent_grounding" for ep in entry_points(group="lmms_eval.models")):
        pytest.skip(
            "the project is not installed with its lmms_eval.models entry point (pip install -e '.[eval]')"
        )
    from lmms_eval.models import get_model

    assert get_model("emergent_grounding") is EmergentGrounding


# ------------------------------------------------------------------------- the evaluator, end to end


@pytest.fixture(scope="module")
def qa_run(tiny_world, tmp_path_factory):
    """A run trained long enough to answer some held-out questions right (about 0.2 of them)."""
    from conftest import tiny_overrides

    import train

    root = tmp_path_factory.mktemp("qa_runs")
    args = tiny_overrides(tiny_world, root, run_name="qa", steps=(10, 80)) + [
        "stages.pretrain.lr=3e-3",
        "stages.instruct.lr=3e-3",
        "grounding.enabled=false",
        "qa_eval.limit=1",
    ]
    assert train.main(args) == 0
    return root / "qa"


def registered_model_name() -> str:
    from lmms_eval.models import MODEL_REGISTRY_V2

    from lmm.lmms_eval_manifest import MANIFEST

    if "emergent_grounding" not in MODEL_REGISTRY_V2.list_model_names():
        MODEL_REGISTRY_V2.register_manifest(MANIFEST)  # no entry point installed: register it as it would
    return MANIFEST.model_id


@pytest.mark.slow
def test_evaluator_accuracy_equals_the_projects_qa_evaluation(qa_run, tiny_world, tmp_path, monkeypatch):
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    from lmm.lmms_eval_shapes_task import write_shapes_task
    from lmm.qa_eval import evaluate_qa, load_questions

    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))
    questions, _ = load_questions(tiny_world / "val_qa.json")
    model, _ = load_run(qa_run)
    ours = evaluate_qa(
        model, questions, tiny_world, "vicuna_v1", "pad", batch_size=5, max_new_tokens=12, progress=False
    )
    assert 0 < ours["accuracy"] < 1, "the run answers some questions right and some wrong"

    write_shapes_task(tiny_world / "val_qa.json", tmp_path / "task", max_new_tokens=12)
    out = evaluator.simple_evaluate(
        model=registered_model_name(),
        model_args=f"run={qa_run},device=cpu",
        tasks=["shapes_qa"],
        batch_size=4,
        task_manager=TaskManager(include_path=str(tmp_path / "task")),
        log_samples=True,
    )
    assert out["results"]["shapes_qa"]["exact_match,none"] == pytest.approx(ours["accuracy"])
    predictions = {s["doc_id"]: s["filtered_resps"][0] for s in out["samples"]["shapes_qa"]}
    assert [predictions[i] for i in range(len(questions))] == [r["prediction"] for r in ours["results"]]


@pytest.mark.slow
def test_cli_with_include_path_and_the_vqa_table(tiny_run, tiny_world, tmp_path):
    from lmm.lmms_eval_shapes_task import main as write_task
    from lmm.qa_eval import evaluate_qa, load_questions

    assert write_task(["--world", str(tiny_world), "--out", str(tmp_path / "task"), "--limit", "6"]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "datasets")}
    command = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "emergent_grounding",
        "--model_args",
        f"run={tiny_run},device=cpu",
        "--tasks",
        "shapes_qa",
        "--include_path",
        str(tmp_path / "task"),
        "--batch_size",
        "3",
        "--output_path",
        str(tmp_path / "out"),
    ]
    from importlib.metadata import entry_points

    if not any(ep.name == "emergent_grounding" for ep in entry_points(group="lmms_eval.models")):
        pytest.skip("the CLI finds the plugin through its entry point: pip install -e '.[eval]'")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    questions, _ = load_questions(tiny_world / "val_qa.json")
    model, _ = load_run(tiny_run)
    ours = evaluate_qa(
        model, questions[:6], tiny_world, "vicuna_v1", "pad", max_new_tokens=12, progress=False
    )
    table = subprocess.run(
        [sys.executable, "-m", "lmm.vqa_table", "table", "--results", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    row = next(line for line in table.splitlines() if line.startswith("| Shapes QA"))
    assert row.split("|")[2].strip() == f"{100 * ours['accuracy']:.1f}"
    results = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())
    assert results["results"]["shapes_qa"]["exact_match,none"] == pytest.approx(ours["accuracy"])


@pytest.mark.slow
def test_torchrun_ranks_share_the_documents(tiny_run, tiny_world, tmp_path):
    from importlib.metadata import entry_points

    from lmm.lmms_eval_shapes_task import write_shapes_task
    from lmm.qa_eval import evaluate_qa, load_questions

    if not any(ep.name == "emergent_grounding" for ep in entry_points(group="lmms_eval.models")):
        pytest.skip("the CLI finds the plugin through its entry point: pip install -e '.[eval]'")
    write_shapes_task(tiny_world / "val_qa.json", tmp_path / "task", limit=6)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "datasets"),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        "-m", "lmms_eval", "--model", "emergent_grounding", "--model_args", f"run={tiny_run}",
        "--tasks", "shapes_qa", "--include_path", str(tmp_path / "task"), "--batch_size", "2",
        "--output_path", str(tmp_path / "out"), "--log_samples",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "Running on rank 1" in log and "Postprocessed 3 docs" in log, "each of the two ranks answered half"

    questions, _ = load_questions(tiny_world / "val_qa.json")
    model, _ = load_run(tiny_run)
    ours = evaluate_qa(
        model, questions[:6], tiny_world, "vicuna_v1", "pad", max_new_tokens=12, progress=False
    )
    results = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())
    assert results["results"]["shapes_qa"]["exact_match,none"] == pytest.approx(ours["accuracy"])
    samples = [
        json.loads(line) for line in next((tmp_path / "out").rglob("*_samples_shapes_qa.jsonl")).open()
    ]
    predictions = {s["doc_id"]: s["filtered_resps"] for s in samples}  # the file holds the filtered text
    assert [predictions[i] for i in range(6)] == [r["prediction"] for r in ours["results"]]
