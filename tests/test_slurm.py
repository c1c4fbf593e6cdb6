"""SIGUSR1 requeue under a real one-node SLURM cluster (``scripts/slurm/local_cluster.sh``), end to end.

A tiny ``train.py`` job is submitted with ``scripts/slurm/train.sbatch``; once it has made optimizer steps
it gets ``scancel --signal=USR1 --full``. It must save ``hpc_ckpt_1.ckpt`` at the next step, requeue itself
(``Restarts=1``, ``SLURM_RESTART_COUNT=1``), resume from that checkpoint (the newest of it and last.ckpt)
and finish all its steps, every batch consumed exactly once. The time from the signal to the first
optimizer step of the requeued job is printed. Skipped when no SLURM controller answers (``.ci/run``
installs and starts the local cluster).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmm.checkpoint_io import read_checkpoint
from lmm.config import TrainConfig
from lmm.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
STEPS = 120


def _slurm_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    conf = os.environ.get("SLURM_CONF") or "/tmp/lmm-slurm/slurm.conf"
    if Path(conf).is_file():
        env["SLURM_CONF"] = conf
    return env


def _unavailable() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM client (sinfo); run scripts/slurm/local_cluster.sh install && start"
    try:
        state = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], env=_slurm_env(), capture_output=True, text=True, timeout=10
        )
    except subprocess.TimeoutExpired:
        return "slurmctld does not answer (sinfo timed out)"
    if state.returncode or not state.stdout.strip().startswith(("idle", "mix")):
        return f"no idle SLURM node (sinfo: {(state.stdout + state.stderr).strip()[:120]!r})"
    return None


def _job_field(job: str, field: str) -> str | None:
    out = subprocess.run(["scontrol", "show", "job", job], env=_slurm_env(), capture_output=True, text=True)
    match = re.search(rf"\b{field}=(\S+)", out.stdout)
    return match.group(1) if match else None


def _wait(predicate, timeout: float, what: str, log: Path) -> None:  # noqa: ANN001
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log.is_file() else "(no job output)"
    raise AssertionError(f"timed out waiting for {what}; job output:\n{tail}")


def test_sigusr1_requeues_and_resumes_under_real_slurm(tiny_args, tmp_path):
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    args = tiny_args(steps=(STEPS, 1)) + [
        "run_stages=[pretrain]",
        "trainer.accelerator=cpu",
        "trainer.num_threads=1",
        "data.record_samples=true",
        "stages.pretrain.checkpoint_every_n_steps=100000",  # only the requeue checkpoint can resume it
        "qa_eval.questions=null",
    ]
    if "grounding" in {f.name for f in dataclasses.fields(TrainConfig)}:
        args.append("grounding.enabled=false")
    run_dir = tmp_path / "runs" / "t"
    out = tmp_path / "slurm.out"
    env = {**_slurm_env(), "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    submit = subprocess.run(
        [
            "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0",
            "--cpus-per-task=1", "--time=10", f"--output={out}", f"--chdir={ROOT}",
            str(ROOT / "scripts" / "slurm" / "train.sbatch"), *args,
        ],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    job = submit.stdout.strip().split(";")[0]
    try:
        train_log = run_dir / "train.log"
        _wait(
            lambda: train_log.is_file() and "first optimizer step" in train_log.read_text(),
            120, "the first training steps", out,
        )  # fmt: skip
        signalled = time.time()
        subprocess.run(["scancel", "--signal=USR1", "--full", job], env=env, check=True)
        _wait(lambda: _job_field(job, "Restarts") == "1", 60, "the requeue", out)
        _wait(lambda: _job_field(job, "JobState") == "COMPLETED", 180, "the requeued job to finish", out)
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True)

    output = out.read_text()
    assert "restart 0 on" in output and "restart 1 on" in output, output[-2000:]
    log_text = (run_dir / "train.log").read_text()
    saved = re.search(r"saved (\S+hpc_ckpt_1\.ckpt) at step (\d+); requeueing SLURM job", log_text)
    assert saved, log_text[-3000:]
    hpc_step = int(saved.group(2))
    assert 0 < hpc_step < STEPS
    assert f"resuming stage pretrain from {saved.group(1)} (step {hpc_step} of {STEPS})" in log_text
    firsts = re.findall(r"first optimizer step of this process done: step (\d+) at ([\d.]+)", log_text)
    assert len(firsts) == 2 and int(firsts[1][0]) == hpc_step + 1, firsts
    latency = float(firsts[1][1]) - signalled
    print(f"\nSLURM requeue: signal -> first optimizer step of the requeued job: {latency:.1f} s")
    (tmp_path / "requeue_latency.txt").write_text(f"{latency:.2f}\n")

    final = read_checkpoint(RunDir(run_dir).last_checkpoint("pretrain"))
    assert final["global_step"] == STEPS
    assert not list((run_dir / "checkpoints" / "pretrain").glob("hpc_ckpt_*")), "superseded by last.ckpt"
    batches: dict[int, list[str]] = {}
    for line in (run_dir / "samples" / "pretrain" / "rank0.jsonl").read_text().splitlines():
        entry = json.loads(line)
        batches[entry["batch"]] = entry["keys"]
    assert sorted(batches) == list(range(STEPS)), "every batch consumed once, none skipped by the requeue"
