"""Every YAML under configs/ loads, validates and (where it needs no weight files) builds; bad configs fail clearly."""

from pathlib import Path

import pytest
import torch

import train
from lmm.checkpoint import build_model
from lmm.config import CONFIG_DIR, ConfigError, load_config

TOP_LEVEL = sorted(CONFIG_DIR.glob("*.yaml"))
FRAGMENTS = sorted(p for p in CONFIG_DIR.glob("*/*.yaml"))
SHRINK = ["llm.hidden_size=32", "llm.num_layers=1", "llm.num_heads=2", "llm.intermediate_size=64"]


def _weight_paths(config):
    paths = [getattr(config.encoder, "weights", None), config.llm.path]
    for sub in ("clip", "sd_path", "path"):
        value = getattr(config.encoder, sub, None)
        paths.append(getattr(value, "weights", None) if hasattr(value, "weights") else value)
    return [p for p in paths if isinstance(p, str)]


def _load(path: Path, tiny_world):
    if path.parent == CONFIG_DIR:
        return load_config([str(path)], [])
    return load_config(
        None, [f"{path.parent.name}={path.stem}", f"llm.tokenizer={tiny_world}/tokenizer", *SHRINK]
    )


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
    if path.parent == CONFIG_DIR:
        config = load_config([str(path)], [f"llm.tokenizer={tiny_world}/tokenizer", *SHRINK])
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
        ConfigError, match=r"^data: decode_min_side must be a positive pixel count or null, got 0$"
    ):
        load_config(None, ["data.decode_min_side=0"])
    with pytest.raises(ConfigError, match=r"^data: num_workers must be >= 0, got -1$"):
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
    config = load_config(None, [f"llm.path={tmp_path}/vicuna"])
    with pytest.raises(FileNotFoundError, match="vicuna"):
        build_model(config)
