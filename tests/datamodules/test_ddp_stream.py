"""Two-rank DDP on CPU (gloo) through train.py over uneven shards: no hang, no sample twice in an epoch.

The instruction shards of the tiny shapes world hold 40, 40 and 16 samples (image and text-only mixed);
two ranks with one dataloader worker each and micro-batches of 5 get 96 // (2 x 5) = 9 batches per epoch,
the same on both ranks. The run trains 12 steps (into the second epoch) as a real two-process Lightning DDP
job and must finish within the timeout; the sample keys each rank consumed show that an epoch's 90
samples are all different and that the two ranks never share one. Batches are grouped by length, as the
default's, so text-only batches occur too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from lmm.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def _keys_by_epoch(path: Path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        out.setdefault(entry["epoch"], []).extend(entry["keys"])
    return out


def test_two_rank_ddp_epoch_has_every_sample_once_and_ends(tiny_args, tmp_path):
    args = tiny_args(steps=(1, 12)) + [
        "run_stages=[instruct]",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.num_threads=1",
        "data.num_workers=1",
        "data.record_samples=true",
        "stages.instruct.global_batch_size=10",
        "stages.instruct.micro_batch_size=5",
        # Runs of 4 batches sorted by (image, length): some batches are text only, whose step must still give
        # the projector a gradient on that rank or DDP stops (lmm.model.LMM._visual_zero).
        "stages.instruct.group_by_length=4",
        "stages.instruct.checkpoint_every_n_steps=100",
        "qa_eval.questions=null",
    ]
    if "grounding" in {f.name for f in dataclasses.fields(TrainConfig)}:
        args.append("grounding.enabled=false")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    for var in [v for v in env if v.startswith("SLURM_")]:  # not a SLURM job even inside one
        del env[var]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = tmp_path / "runs" / "t" / "samples" / "instruct"
    ranks = [_keys_by_epoch(samples / f"rank{r}.jsonl") for r in range(2)]
    for r, by_epoch in enumerate(ranks):
        assert len(by_epoch[0]) == 9 * 5 and len(by_epoch[1]) == 3 * 5, f"rank {r}: {len(by_epoch[0])}"
    epoch0 = ranks[0][0] + ranks[1][0]
    assert len(set(epoch0)) == len(epoch0) == 90, "an epoch never repeats a sample, within or across ranks"
    assert not set(ranks[0][1]) & set(ranks[1][1])
    assert set(ranks[0][1]) | set(ranks[1][1]) <= {f"instruct-{i:06d}" for i in range(96)}
