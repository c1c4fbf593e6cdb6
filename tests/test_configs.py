"""Every YAML under configs/ loads, validates and (where it needs no weight files) builds; bad configs fail clearly."""

import dataclasses
import json
import types
from pathlib import Path

import pytest
import torch

import train
from lmm.build import build_model
from lmm.config_loading import CONFIG_DIR, ConfigError, load_config

TOP_LEVEL = sorted(CONFIG_DIR.glob("*.yaml"))
FRAGMENTS = sorted(p for p in CONFIG_DIR.glob("*/*.yaml"))
SHRINK = ["llm.hidden_size=32", "llm.num_layers=1", "llm.num_heads=2", "llm.intermediate_size=64"]


def _weight_paths(config):
    paths = [getattr(config.encoder, "weights", None), config.llm.path]
    for sub in ("clip", "sd_path", "path"):
        value = getattr(config.encoder, sub, None)
        paths.append(getattr(value, "weights", None) if hasattr(value, "weights") else value)
    return [p for p in paths if isinstance(p, str)]


def _load(path: Path, tiny_world, extra=()):
    if path.parent == CONFIG_DIR:
        return load_config([str(path)], [])
    return load_config(
        None, [f"{path.parent.name}={path.stem}", f"llm.tokenizer={tiny_world}/tokenizer", *SHRINK, *extra]
    )


def _pretrains(encoder):
    """The encoder keys whose ``pretrain`` is set (in-world towers)."""
    keys = ["pretrain"] if getattr(encoder, "pretrain", None) is not None else []
    clip = getattr(encoder, "clip", None)
    if clip is not None and clip.pretrain is not None:
        keys.append("clip.pretrain")
    return keys


@pytest.mark.parametrize("path", TOP_LEVEL + FRAGMENTS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_config_loads_and_builds(path, tiny_world):
    config = _load(path, tiny_world)
    assert config.run_stages and all(s in config.stages for s in config.run_stages)
    missing = [p for p in _weight_paths(config) if not Path(p).exists()]
    if missing:
        # Real-size configs point at weights that cannot be downloaded here: building must say which file.
        with pytest.raises(FileNotFoundError, match="|".join(map(str, missing))):
            build_model(config)
        return
    extra = []
    if _pretrains(config.encoder):
        # In-world towers come from the tower stage (train.py); unresolved, building says so in one line.
        with pytest.raises(
            ValueError, match=r"^encoder\.pretrain is set but encoder\.(weights|sd_path) is not"
        ):
            build_model(config)
        extra = [f"encoder.{p}=null" for p in _pretrains(config.encoder)]  # the same architecture, random
    if path.parent == CONFIG_DIR:
        config = load_config([str(path)], [f"llm.tokenizer={tiny_world}/tokenizer", *SHRINK, *extra])
    else:
        config = _load(path, tiny_world, extra)
    model = build_model(config)
    image = torch.zeros(1, 3, model.encoder.image_size, model.encoder.image_size)
    assert model.visual_tokens(image).shape == (1, model.encoder.num_tokens, model.llm.width)


def test_unknown_key_names_the_key_and_the_nearest_valid_one():
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'stages\.pretrain\.lr_rate' \(did you mean 'stages\.pretrain\.lr'\?\)",
    ):
        load_config(None, ["stages.pretrain.lr_rate=0.1"])
    with pytest.raises(ConfigError, match=r"'encoder\.widht' \(did you mean 'encoder\.width'"):
        load_config(None, ["encoder.widht=3"])


def test_out_of_range_data_settings_fail_in_one_line():
    with pytest.raises(
        ConfigError, match=r"^data\.decode_min_side must be a positive pixel count or null, got 0$"
    ):
        load_config(None, ["data.decode_min_side=0"])
    with pytest.raises(ConfigError, match=r"^data\.num_workers must be >= 0, got -1$"):
        load_config(None, ["data.num_workers=-1"])
    assert load_config(None, ["data.decode_min_side=672"]).data.decode_min_side == 672


def test_wrong_type_and_unknown_component_fail_in_one_line():
    with pytest.raises(ConfigError, match=r"stages\.pretrain\.max_steps must be an integer, got 'many'"):
        load_config(None, ["stages.pretrain.max_steps=many"])
    with pytest.raises(ConfigError, match=r"encoder\.name: unknown encoder 'vit9000'"):
        load_config(None, ["encoder.name=vit9000"])
    with pytest.raises(ConfigError, match="run_stages names 'finetune'"):
        load_config(None, ["run_stages=[pretrain,finetune]"])


def test_train_py_reports_config_errors_before_any_work(tmp_path, capsys):
    assert train.main([f"runs_dir={tmp_path}", "trainer.precison=bf16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trainer.precision" in err
    assert not any(tmp_path.iterdir()), "nothing is written for a bad config"


def test_extends_and_group_selection_merge_in_order(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(f"extends: {CONFIG_DIR / 'default.yaml'}\nrun_name: base\nseed: 3\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nrun_name: child\n")
    config = load_config([str(child)], ["seed=5"])
    assert (config.run_name, config.seed) == ("child", 5)
    with pytest.raises(ConfigError, match="no .*nope.yaml"):
        load_config(None, ["encoder=nope"])


def test_missing_weight_file_is_named(tmp_path):
    config = load_config(None, [f"encoder.weights={tmp_path}/ViT-L-14-336px.pt"])
    with pytest.raises(FileNotFoundError, match="ViT-L-14-336px.pt does not exist"):
        build_model(config)
    config = load_config(None, [f"llm.path={tmp_path}/vicuna", "encoder.pretrain=null"])
    with pytest.raises(FileNotFoundError, match="vicuna"):
        build_model(config)


def _choice_fields(cls, prefix):
    """(dotted key, allowed values) of every ``Literal`` field of a schema dataclass, nested ones included."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if typing.get_origin(hint) is typing.Literal:
            yield f"{prefix}{field.name}", typing.get_args(hint)
        elif dataclasses.is_dataclass(hint):
            yield from _choice_fields(hint, f"{prefix}{field.name}.")


def _every_choice_override():
    from encoders.config import ENCODER_CONFIGS
    from lmm.config import StageConfig, TrainConfig

    for key, allowed in _choice_fields(TrainConfig, ""):
        yield [], key, allowed
    for stage in ("pretrain", "instruct"):
        for key, allowed in _choice_fields(StageConfig, f"stages.{stage}."):
            yield [], key, allowed
    for name, cls in ENCODER_CONFIGS.items():
        for key, allowed in _choice_fields(cls, "encoder."):
            yield [f"encoder.name={name}"], key, allowed


CHOICES = list(_every_choice_override())


def test_the_choice_list_covers_every_section():
    keys = {key for _, key, _ in CHOICES}
    assert {
        "stages.instruct.llm",
        "stages.pretrain.template",
        "stages.pretrain.aspect",
        "grounding.refiner",
    } <= keys
    assert {
        "projector.name",
        "qa_eval.template",
        "trainer.precision",
        "encoder.noise",
        "encoder.clip_resize",
    } <= keys


@pytest.mark.parametrize(
    ("prefix", "key", "allowed"), CHOICES, ids=[f"{p[0] if p else ''} {k}" for p, k, _ in CHOICES]
)
def test_every_choice_field_rejects_a_value_outside_its_choices(prefix, key, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*prefix, f"{key}=nonsense"])
    message = str(err.value)
    assert "\n" not in message and key in message and "'nonsense'" in message
    assert all(str(choice) in message for choice in allowed)
    for choice in allowed:  # and accepts each of them (a valid value never fails on its own)
        try:
            load_config(None, [*prefix, f"{key}={choice}"])
        except ConfigError as other:
            assert "is not one of" not in str(other), other


BAD_VALUES = [
    ("stages.instruct.llm=lorra", "stages.instruct.llm = 'lorra' is not one of: frozen, full, lora"),
    (
        "stages.pretrain.template=vicuna",
        "stages.pretrain.template = 'vicuna' is not one of: plain, vicuna_v1",
    ),
    ("stages.pretrain.aspect=padd", "stages.pretrain.aspect = 'padd' is not one of: crop, pad, resize"),
    ("grounding.refiner=sma", "grounding.refiner = 'sma' is not one of: threshold, sam"),
    ("qa_eval.template=vicuna", "qa_eval.template = 'vicuna' is not one of"),
    (
        "encoder.name=vit9000",
        "encoder.name: unknown encoder 'vit9000'; expected one of ['clip', 'diffusion', 'fused']",
    ),
    ("projector.name=mlp3x", "projector.name = 'mlp3x' is not one of: mlp2x_gelu, linear"),
    ("llm.hidden_size=0", "llm.hidden_size must be positive, got 0"),
    ("encoder.width=-8", "encoder.width must be positive, got -8"),
    ("stages.pretrain.max_steps=0", "stages.pretrain.max_steps must be positive, got 0"),
    ("stages.pretrain.global_batch_size=-16", "stages.pretrain.global_batch_size must be positive, got -16"),
    ("stages.pretrain.lr=-1", "stages.pretrain.lr must be positive, got -1.0"),
    ("stages.pretrain.micro_batch_size=0", "stages.pretrain.micro_batch_size must be positive, got 0"),
    (
        "stages.instruct.micro_batch_size=5",
        "stages.instruct.global_batch_size 16 is not a multiple of micro_batch_size 5",
    ),
    ("trainer.devices=0", "trainer.devices must be positive, got 0"),
    (
        "trainer.devices=3",
        "stages.pretrain.global_batch_size 16 is not a multiple of micro_batch_size x devices x nodes",
    ),
    ("grounding.batch_size=0", "grounding.batch_size must be >= 1, got 0"),
    ("grounding.layers=[99]", "grounding.layers [99] are outside the LLM's 3 layers"),
]


@pytest.mark.parametrize(("override", "message"), BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_train_py_stops_on_a_bad_value_before_any_work(override, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default config's data and runs folders are relative: both land here
    assert train.main([override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not any(tmp_path.iterdir()), "nothing is generated or written for a bad config"


def test_a_bad_value_exits_2_from_the_command_line_in_seconds(tmp_path):
    import subprocess
    import sys
    import time

    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(train.__file__)), "stages.instruct.llm=lorra"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "lorra" in proc.stderr
    assert not any(tmp_path.iterdir())
    print(f"bad config rejected in {seconds:.1f} s")


PREFLIGHT = [
    (
        ["stages.instruct.data=/nonexistent"],
        "stages.instruct.data = '/nonexistent': /nonexistent/index.json does not exist",
    ),
    (
        ["grounding.spacy_model=en_nope"],
        "grounding.spacy_model = 'en_nope' is not an installed spaCy pipeline",
    ),
    (["llm.tokenizer=/nonexistent/tok"], "llm.tokenizer = '/nonexistent/tok': no such folder"),
    (
        ["llm.path=/nonexistent/vicuna"],
        "llm.path = '/nonexistent/vicuna': /nonexistent/vicuna/config.json does not",
    ),
    (
        ["encoder.weights=/nonexistent/clip.pt"],
        "encoder.weights = '/nonexistent/clip.pt': no such file or folder",
    ),
    (
        ["qa_eval.questions=/nonexistent/qa.json"],
        "qa_eval.questions = '/nonexistent/qa.json': /nonexistent/qa.json",
    ),
    (["grounding.data=nope"], "grounding.data = 'nope': "),
    (
        ["grounding.text_model=/nonexistent/bert"],
        "grounding.text_model = '/nonexistent/bert': no such folder",
    ),
    (
        ["grounding.refiner=sam", "grounding.sam_checkpoint=/nonexistent/sam.pth"],
        "grounding.sam_checkpoint = '/nonexistent/sam.pth': no such file",
    ),
    (["llm.path={llm}", "grounding.layers=[0,5]"], "grounding.layers [5] are outside the LLM's 3 layers"),
    (
        ["init.llava_hf=/nonexistent/llava-hf"],
        "init.llava_hf = '/nonexistent/llava-hf': no config.json there",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), PREFLIGHT, ids=[" ".join(o) for o, _ in PREFLIGHT])
def test_train_py_stops_on_a_missing_file_before_any_work(overrides, message, tiny_args, tmp_path, capsys):
    """Issue 16, cases 2 and 3: values that point at nothing (a stage's data, the tokenizer, weights, the
    grounding set, spaCy model and text encoder, the questions, SAM) or at layers a local LLM lacks used to
    fail after a stage had trained, or while building the model; now exit 2 with one line, nothing written."""
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 3}))
    args = tiny_args() + [o.format(llm=llm) for o in overrides]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("config error: ") and message in err, err
    assert not (tmp_path / "runs").exists(), "nothing is written"


def test_preflight_knows_what_the_shapes_world_generates_and_which_spacy_models_it_tries(tiny_world):
    from grounding.phrases import FALLBACK_SPACY_MODELS
    from lmm.preflight import DEFAULT_SPACY_MODELS, SHAPES_WORLD_OUTPUTS, preflight

    assert DEFAULT_SPACY_MODELS == FALLBACK_SPACY_MODELS
    assert all((tiny_world / name).exists() for name in SHAPES_WORLD_OUTPUTS)
    config = load_config(None, [f"data.root={tiny_world}", "data.shapes=null"])
    assert preflight(config) == [], "the default config on a generated world needs nothing else"


def test_preflight_checks_the_in_world_towers_data_and_its_distinct_captions(tiny_world, tmp_path):
    from lmm.preflight import preflight

    def problems(*overrides):
        return preflight(load_config(None, list(overrides)))

    # data.shapes is set, so the world (its objects split too) will be generated: 6 colours x 4 kinds x 2 sizes
    # = 48 object captions for the default's distinct-caption batches of 48.
    world = f"data.root={tmp_path / 'world'}"
    assert problems(world) == []
    (problem,) = problems(world, "encoder.pretrain.batch_size=64")
    assert problem.startswith("encoder.pretrain.batch_size = 64: ") and "objects have 48" in problem
    five_kinds = "data.shapes.kinds=[circle,square,triangle,diamond,star]"
    assert problems(world, "encoder.pretrain.batch_size=60", five_kinds) == []
    assert problems(world, "encoder.pretrain.batch_size=64", "encoder.pretrain.distinct_captions=false") == []
    (problem,) = problems(world, "encoder=fused_tiny_pretrained", "encoder.clip.pretrain.batch_size=49")
    assert problem.startswith("encoder.clip.pretrain.batch_size = 49: ")

    missing = [f"data.root={tiny_world}", "data.shapes=null", "towers.data=/nonexistent/objects"]
    (problem,) = problems(*missing)
    assert problem.startswith(
        "towers.data = '/nonexistent/objects': /nonexistent/objects/index.json does not"
    )
    assert problems(*missing, "encoder.pretrain=null") == [], "no tower stage, no tower data"


def test_the_ablation_encoders_share_the_default_clip_tower(tiny_world):
    # lmm.ablation compares clip_conv_pretrained with fused_tiny_pretrained on one CLIP tower: the default's.
    # Each file spells the tower out, so a layout changed in one and not the others would train another tower.
    from lmm.towers import _TowerStages

    root = [f"data.root={tiny_world}", "data.shapes=null"]
    default = load_config(None, root)
    stages = _TowerStages(default)
    key = stages.clip_key(default.encoder)
    assert stages.clip_key(load_config(None, [*root, "encoder=clip_conv_pretrained"]).encoder) == key
    assert stages.clip_key(load_config(None, [*root, "encoder=fused_tiny_pretrained"]).encoder.clip) == key
    # And each reads it the same way: the whole section is the default's, the token smoothing (not in the key) too.
    assert load_config(None, [*root, "encoder=clip_conv_pretrained"]).encoder == default.encoder
    fused_clip = load_config(None, [*root, "encoder=fused_tiny_pretrained"]).encoder.clip
    assert dataclasses.replace(fused_clip, weights=default.encoder.weights) == default.encoder


def test_preflight_finds_the_world_summary_description_words_read(tiny_world, tmp_path):
    """``grounding.description_words: world`` (the default) reads the world's colours and kinds from
    ``world.json``: a data root without one is reported before any work, unless the run generates the world."""
    from lmm.preflight import preflight

    elsewhere = [f"data.root={tmp_path / 'data'}", "data.shapes=null"]
    problems = preflight(load_config(None, elsewhere))
    expected = f"grounding.description_words = 'world': {tmp_path / 'data' / 'world.json'} does not exist"
    assert sum(p.startswith(expected) for p in problems) == 1, problems
    no_words = preflight(load_config(None, [*elsewhere, "grounding.description_words=null"]))
    assert not any("description_words" in p for p in no_words)
    assert preflight(load_config(None, [f"data.root={tmp_path / 'generated'}"])) == []
