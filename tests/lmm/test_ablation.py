"""The encoder ablation command (lmm.ablation): run planning, collection and statistics against hand-worked
values, and one real (tiny) ablation end to end."""

import json
import math

import pytest

from lmm.ablation import collect, difference, format_table, main, mean_std, plan_runs


def test_runs_vary_encoder_and_seed_and_refuse_overrides_they_own():
    runs = plan_runs(["clip", "fused"], [0, 1], ["stages.pretrain.max_steps=3"], towers="random")
    assert [(r.encoder, r.seed, r.run_name) for r in runs] == [
        ("clip", 0, "ablation-clip-s0"), ("clip", 1, "ablation-clip-s1"),
        ("fused", 0, "ablation-fused-s0"), ("fused", 1, "ablation-fused-s1"),
    ]  # fmt: skip
    assert runs[3].overrides == (
        "encoder=fused_tiny", "run_name=ablation-fused-s1", "seed=1", "llm.init_seed=1", "stages.pretrain.max_steps=3"
    )  # fmt: skip
    assert runs[0].overrides[0] == "encoder=clip_tiny"
    # The default is the paper's setting: in-world pretrained towers, as the embedded default run uses.
    assert [r.overrides[0] for r in plan_runs(["clip", "fused"], [0])] == [
        "encoder=clip_conv_pretrained", "encoder=fused_tiny_pretrained"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="seed=4"):
        plan_runs(["clip"], [0], ["seed=4"])
    with pytest.raises(ValueError, match="unknown encoders"):
        plan_runs(["sam"], [0])


def test_pretrained_towers_select_encoders_that_pretrain_every_tower():
    from lmm.config_loading import load_config

    for random_run, pretrained_run in zip(
        plan_runs(["clip", "fused"], [0], towers="random"), plan_runs(["clip", "fused"], [0]), strict=True
    ):
        random, pretrained = (
            load_config(None, list(r.overrides)).encoder for r in (random_run, pretrained_run)
        )
        assert pretrained.name == random.name
        if random.name == "clip":
            assert random.pretrain is None and pretrained.pretrain is not None
        else:  # the fused encoder: its CLIP tower, VAE and U-Net
            assert random.pretrain is None and random.clip.pretrain is None
            assert pretrained.pretrain is not None and pretrained.clip.pretrain is not None
    # Both encoders read the embedded default's CLIP tower, so they share its cache entry.
    clip, fused = (load_config(None, list(r.overrides)).encoder for r in plan_runs(["clip", "fused"], [0]))
    assert clip == load_config(None, []).encoder == fused.clip
    with pytest.raises(ValueError, match="unknown towers"):
        plan_runs(["clip"], [0], towers="imagenet")


def test_overrides_may_follow_list_options():
    from lmm.ablation import parse_args

    args = parse_args(["--seeds", "0", "1", "trainer.num_threads=1", "--encoders", "clip", "runs_dir=/x"])
    assert args.seeds == [0, 1] and args.encoders == ["clip"]
    assert args.overrides == ["trainer.num_threads=1", "runs_dir=/x"]


def test_mean_and_sample_std():
    assert mean_std([0.8, 0.9, 1.0]) == pytest.approx((0.9, 0.1))
    assert mean_std([0.5]) == (0.5, 0.0)


def _fake_run(folder, pointing, qa, seconds, tower=0.0, threads=2):
    (folder / "grounding").mkdir(parents=True)
    history = [{"stage": "instruct", "step": 4, "pointing": 0.0}, {"stage": "instruct", "step": 8,
               "pointing": pointing, "recall": pointing / 2, "miou": 0.5, "ap50": 0.1, "description": 0.7}]  # fmt: skip
    (folder / "grounding" / "metrics.json").write_text(json.dumps(history))
    stages = [{"stage": "tower:clip", "seconds": tower}, {"stage": "pretrain", "seconds": 5.0}]
    (folder / "summary.json").write_text(
        json.dumps({"stages": stages, "seconds": seconds, "qa_accuracy": qa})
    )
    from lmm.config_loading import load_config
    from lmm.run_dir import RunDir
    from lmm.run_paths import resolve_config_paths

    RunDir(folder).write_config(
        resolve_config_paths(load_config(None, [f"trainer.num_threads={threads}"]), folder.parent)
    )
    return folder


def test_collect_takes_the_last_evaluation_and_leaves_tower_time_out(tmp_path):
    row = collect(_fake_run(tmp_path / "r", 0.9, 0.8, 100.0, tower=30.0))
    assert row["pointing"] == 0.9 and row["recall"] == 0.45 and row["qa"] == 0.8
    assert row["seconds"] == 70.0 and row["tower_seconds"] == 30.0 and row["threads"] == 2


def test_table_and_difference(tmp_path):
    results = {
        "clip": [
            {"seed": i, **collect(_fake_run(tmp_path / f"c{i}", p, 0.8, 60.0))}
            for i, p in enumerate([0.8, 0.9, 1.0])
        ],
        "fused": [
            {"seed": i, **collect(_fake_run(tmp_path / f"f{i}", p, 0.7, 90.0, threads=1))}
            for i, p in enumerate([0.6, 0.7])
        ],
    }
    d, se = difference(results, "pointing")
    assert d == pytest.approx(0.65 - 0.9)
    assert se == pytest.approx(math.sqrt(0.1**2 / 3 + 0.0707107**2 / 2), rel=1e-4)
    table = format_table(results)
    assert "| clip | 3 | 0.900 ± 0.100 |" in table and "| fused | 2 | 0.650 ± 0.071 |" in table
    assert "pointing -0.250" in table
    # Every run has its own row, with the threads its wall time was measured at.
    assert "| clip | 1 | 0.900 | 0.450 | 0.500 | 0.100 | 0.800 | 0.700 | 60 | 2 |" in table
    assert "| fused | 0 | 0.600 | 0.300 | 0.500 | 0.100 | 0.700 | 0.700 | 90 | 1 |" in table
    assert table.count("| fused | ") == 3  # the mean row and one row per seed

    # One run per encoder: a mean, and no spread or standard error claimed.
    single = {"clip": results["clip"][:1], "fused": results["fused"][:1]}
    table = format_table(single)
    assert "| clip | 1 | 0.800 ± n/a |" in table and "(s.e. n/a: one run)" in table and "± 0.000" not in table


@pytest.mark.slow
def test_a_tiny_ablation_end_to_end(tiny_world, tmp_path, capsys):
    from conftest import tiny_overrides

    overrides = [o for o in tiny_overrides(tiny_world, tmp_path / "runs") if not o.startswith("run_name=")]
    out = tmp_path / "ablation"
    assert (
        main(["--towers", "random", "--encoders", "clip", "--seeds", "0", "1", "--out", str(out), *overrides])
        == 0
    )
    results = json.loads((out / "results.json").read_text())["runs"]["clip"]
    assert [r["seed"] for r in results] == [0, 1] and all(0 <= r["pointing"] <= 1 for r in results)
    assert "| clip | 2 |" in (out / "table.md").read_text()
    # A second call reuses the finished runs.
    assert (
        main(["--towers", "random", "--encoders", "clip", "--seeds", "0", "1", "--out", str(out), *overrides])
        == 0
    )
    assert "finished before" in capsys.readouterr().out


def test_a_finished_run_trained_with_another_config_is_not_reused(tmp_path, capsys):
    """A run of the same name that finished under an earlier default (here another ViT tower) is refused in one
    line before anything runs, instead of its results going into the table."""
    from lmm.config_loading import load_config
    from lmm.run_dir import RunDir
    from lmm.run_paths import resolve_config_paths

    stale = [
        "encoder=clip_tiny_pretrained",
        "run_name=ablation-pretrained-clip-s0",
        "seed=0",
        "llm.init_seed=0",
    ]
    config = resolve_config_paths(load_config(None, [f"runs_dir={tmp_path}", *stale]), tmp_path)
    run = RunDir(config.run_dir)
    run.write_config(config)
    run.last_checkpoint("instruct").parent.mkdir(parents=True)
    run.last_checkpoint("instruct").write_bytes(b"")
    (run.path / "summary.json").write_text("{}")
    assert main(["--encoders", "clip", "--seeds", "0", f"runs_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "ablation-pretrained-clip-s0 was trained with another config" in err and "encoder.model" in err
