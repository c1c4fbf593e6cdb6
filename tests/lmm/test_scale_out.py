"""Two-process runs (CPU, gloo) with DDP and with FSDP, killed with SIGKILL mid-stage and resumed.

Each strategy trains the instruction stage with frozen towers and LoRA on the LLM for 14 steps (two ranks
of one dataloader worker and micro-batches of 4: 12 steps per epoch, so the run crosses an epoch), once
straight through and once killed (the whole process group, SIGKILL) after its step-8 checkpoint while it
works on later steps, then rerun with the same command. The resumed run must end with exactly the trainable
weights of the straight one and every rank must have trained on exactly the same samples, batch by batch
(``data.record_samples``). FSDP is the project's configuration (``trainer.fsdp``): each decoder layer a unit
of its own, activation checkpointing, full-state checkpoints that hold only the trainable weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmm.checkpoint_io import read_checkpoint
from lmm.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 14, 4


def _args(tiny_args, strategy: str, name: str) -> list[str]:
    args = tiny_args(steps=(1, STEPS)) + [
        f"run_name={name}",
        "run_stages=[instruct]",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"trainer.strategy={strategy}",
        "trainer.num_threads=1",
        "trainer.deterministic=true",
        "data.num_workers=1",
        "data.record_samples=true",
        "stages.instruct.global_batch_size=8",
        "stages.instruct.micro_batch_size=4",
        "stages.instruct.llm=lora",
        "stages.instruct.lora.r=4",
        "stages.instruct.lora.dropout=0",  # dropout draws from an RNG whose state checkpoints do not keep
        f"stages.instruct.checkpoint_every_n_steps={EVERY}",
        "qa_eval.questions=null",
        "grounding.enabled=false",
    ]
    if strategy == "fsdp":
        args.append("trainer.fsdp.activation_checkpointing=true")
    return args


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    for var in [v for v in env if v.startswith("SLURM_")]:
        del env[var]
    with open(
        log, "ab"
    ) as out:  # a new session: the kill reaches the ranks Lightning starts, and their workers
        return subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    try:
        assert proc.wait(timeout=timeout) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _batches(run: Path, rank: int) -> dict[int, list[str]]:
    """Consumed batch number -> sample keys; a batch redone after a resume replaces the first record (a line
    torn by the kill is skipped)."""
    out: dict[int, list[str]] = {}
    for line in (run / "samples" / "instruct" / f"rank{rank}.jsonl").read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[entry["batch"]] = entry["keys"]
    return out


def _consumed(run: Path) -> int:
    path = run / "samples" / "instruct" / "rank0.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_rank_run_killed_mid_stage_resumes_to_the_uninterrupted_result(strategy, tiny_args, tmp_path):
    runs = tmp_path / "runs"
    straight, killed = runs / "straight", runs / "killed"
    log = tmp_path / "train.log"
    _finish(_start(_args(tiny_args, strategy, "straight"), log), log)

    proc = _start(_args(tiny_args, strategy, "killed"), log)
    deadline = time.monotonic() + 600
    while _consumed(killed) < 2 * EVERY + 2:  # past the step-8 checkpoint, into steps 9 and 10
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the run to kill never got that far"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = read_checkpoint(RunDir(killed).last_checkpoint("instruct"))["global_step"]
    consumed = _consumed(killed)
    assert 0 < saved < STEPS and consumed > saved, (saved, consumed)  # killed mid-stage, after a checkpoint
    _finish(_start(_args(tiny_args, strategy, "killed"), log), log)

    for rank in range(2):
        a, b = _batches(straight, rank), _batches(killed, rank)
        assert sorted(a) == list(range(STEPS))
        assert a == b, f"rank {rank}: the resumed run must train on exactly the samples of the straight one"
    lines = (killed / "samples" / "instruct" / "rank0.jsonl").read_text().count("\n")
    assert lines > STEPS, "batches consumed before the kill were redone after the resume"

    wa = read_checkpoint(RunDir(straight).last_checkpoint("instruct"))
    wb = read_checkpoint(RunDir(killed).last_checkpoint("instruct"))
    assert wa["global_step"] == wb["global_step"] == STEPS
    assert wa["state_dict"].keys() == wb["state_dict"].keys()
    keys = list(wa["state_dict"])
    assert keys and all("lora_" in k or k.startswith("projector.") for k in keys), "trainable weights only"
    for key, value in wa["state_dict"].items():
        assert torch.equal(value, wb["state_dict"][key]), key
    states = wa["optimizer_states"][0]["state"]
    assert len(states) == len(keys), "Adam's state of every trainable weight is saved"
    for state in states.values():  # FSDP on CPU once saved exp_avg_sq as a second copy of exp_avg
        assert not torch.equal(state["exp_avg"], state["exp_avg_sq"])
    if strategy == "fsdp":  # the FSDP layout (root + one unit per decoder layer) was in force on both ranks
        text = (killed / "train.log").read_text()
        for rank in range(2):
            assert f"FSDP: 3 units (full_shard), 2 activation-checkpointed layers, rank {rank} of 2" in text


def test_fsdp_for_this_model_wraps_the_llms_decoder_layers_as_configured(tiny_world):
    """``trainer.fsdp`` becomes Lightning's FSDPStrategy with the LLM's decoder layer class (from transformers'
    ``_no_split_modules``) as the auto-wrap and activation-checkpointing policy, and the configured sharding."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lmm.build import build_model
    from lmm.config_loading import load_config
    from lmm.strategies import build_strategy

    shrink = ["llm.hidden_size=32", "llm.num_layers=2", "llm.num_heads=2", "llm.intermediate_size=64"]
    base = [
        f"data.root={tiny_world}",
        "data.shapes=null",
        "grounding.enabled=false",
        "encoder.pretrain=null",
        *shrink,
    ]
    config = load_config(None, [*base, "trainer.strategy=fsdp", "trainer.fsdp.activation_checkpointing=true"])
    model = build_model(config)
    strategy = build_strategy(config.trainer, model)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}
    assert strategy.kwargs["use_orig_params"], "frozen and trainable weights share units"
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {
        LlamaDecoderLayer
    }
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD and strategy._state_dict_type == "full"

    plain = load_config(None, [*base, "trainer.strategy=fsdp", "trainer.fsdp.sharding=shard_grad_op"])
    strategy = build_strategy(plain.trainer, model)
    assert (
        strategy.sharding_strategy == ShardingStrategy.SHARD_GRAD_OP
        and not strategy._activation_checkpointing_kwargs
    )
    assert build_strategy(load_config(None, [*base, "trainer.strategy=ddp"]).trainer, model) == "ddp"
