"""Exact resume: a run killed mid-epoch and resumed sees the same samples and ends with the same weights.

Both runs go through ``train.main`` on the tiny shapes world with two dataloader workers: run A trains 16
steps straight; run B crashes at step 11 (after its checkpoint at step 9, so the resume starts mid-epoch
with the worker round-robin shifted by one) and is then rerun to step 16, crossing the epoch boundary at
step 12. The batches' sample keys (``data.record_samples``) and the final trainable weights must match
exactly (CPU, deterministic settings). Also unit checks of the stream's position arithmetic.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path

import pytest
import torch

import train
from datamodules.shards import ShardDataModule
from datamodules.templates import get_template
from datamodules.word_tokenizer import build_word_tokenizer
from lmm.batch import collate
from lmm.checkpoint_io import AtomicCheckpointIO, read_checkpoint
from lmm.config import TrainConfig
from lmm.preprocess import SampleEncoder
from lmm.run_dir import RunDir


class Crash(RuntimeError):
    """Stands in for a kill."""


def _batches(run_dir: Path, stage: str = "pretrain") -> dict[int, list[str]]:
    """Consumed batch number -> sample keys; a batch redone after a resume replaces the first record."""
    out: dict[int, list[str]] = {}
    for line in (run_dir / "samples" / stage / "rank0.jsonl").read_text().splitlines():
        entry = json.loads(line)
        out[entry["batch"]] = entry["keys"]
    return out


def test_killed_and_resumed_run_matches_the_straight_run(tiny_args, tmp_path, monkeypatch):
    extra = [
        "run_stages=[pretrain]",
        "data.num_workers=2",
        "data.record_samples=true",
        "trainer.deterministic=true",
        "stages.pretrain.checkpoint_every_n_steps=3",
        "qa_eval.questions=null",
    ]
    if "grounding" in {f.name for f in dataclasses.fields(TrainConfig)}:
        extra.append("grounding.enabled=false")
    straight = tiny_args(steps=(16, 1)) + extra + ["run_name=straight"]
    killed = tiny_args(steps=(16, 1)) + extra + ["run_name=killed"]
    runs = tmp_path / "runs"

    assert train.main(straight) == 0

    from lmm.model import LMM

    step = LMM.training_step

    def crash_at_11(self, batch, batch_idx):  # noqa: ANN001
        if self.global_step == 11:
            raise Crash("killed at step 11")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(LMM, "training_step", crash_at_11)
    with pytest.raises(Crash):
        train.main(killed)
    assert read_checkpoint(RunDir(runs / "killed").last_checkpoint("pretrain"))["global_step"] == 9
    monkeypatch.setattr(LMM, "training_step", step)
    assert train.main(killed) == 0

    a, b = _batches(runs / "straight"), _batches(runs / "killed")
    assert sorted(a) == list(range(16))
    assert a == b, "the resumed run must see exactly the samples of the uninterrupted one"
    epoch0 = [k for i in range(12) for k in a[i]]
    assert len(epoch0) == len(set(epoch0)) == 96, "one epoch = every sample once (96 samples, 12 x 8)"
    lines = (runs / "killed" / "samples" / "pretrain" / "rank0.jsonl").read_text().splitlines()
    assert len(lines) == 16 + 3, "batches 9-11 were consumed, lost with the kill, and redone"

    wa = read_checkpoint(RunDir(runs / "straight").last_checkpoint("pretrain"))
    wb = read_checkpoint(RunDir(runs / "killed").last_checkpoint("pretrain"))
    assert wa["global_step"] == wb["global_step"] == 16
    assert wa["state_dict"].keys() == wb["state_dict"].keys()
    for key, value in wa["state_dict"].items():
        assert torch.equal(value, wb["state_dict"][key]), key
    state = wb["ShardDataModule"]
    assert state["consumed_batches"] == 16 and state["epoch"] == 1 and state["batch_in_epoch"] == 4


def _module(folder: Path, **kw) -> ShardDataModule:  # noqa: ANN003
    tok = build_word_tokenizer(["a red circle", "What color is it?", "Red."])
    encode = SampleEncoder(tok, get_template("plain"), 4, 64)
    return ShardDataModule(folder, encode, partial(collate, pad_token_id=tok.pad_token_id), **kw)


@pytest.mark.parametrize(("workers", "group"), [(0, 0), (3, 0), (0, 3), (2, 4)])
def test_stream_restarted_at_any_batch_continues_the_same_sequence(tiny_world, workers, group):
    folder = tiny_world / "pretrain"
    kw = {"batch_size": 5, "num_workers": workers, "seed": 3, "shuffle_buffer": 7, "group_by_length": group}
    full = _module(folder, **kw)
    per_epoch = full.batches_per_epoch
    assert per_epoch == (96 // (5 * max(1, workers))) * max(1, workers)
    n = per_epoch + 4
    reference = []
    for batch in full.train_dataloader():
        full.on_before_batch_transfer(batch, 0)
        reference.append(batch.batch.input_ids)
        if len(reference) == n:
            break
    for start in (1, per_epoch - 1, per_epoch + 1):
        resumed = _module(folder, **kw)
        resumed.load_state_dict({**full.state_dict(), "consumed_batches": start})
        got = []
        for batch in resumed.train_dataloader():
            got.append(batch.batch.input_ids)
            if len(got) == n - start:
                break
        for i, (x, y) in enumerate(zip(reference[start:], got, strict=True)):
            assert torch.equal(x, y), f"resumed at {start}: batch {start + i} differs"


def test_changed_layout_resumes_approximately_with_a_warning(tiny_world, caplog):
    folder = tiny_world / "pretrain"
    old = _module(folder, batch_size=4, num_workers=0)
    old.consumed = old.batches_per_epoch + old.batches_per_epoch // 2
    new = _module(folder, batch_size=8, num_workers=0)
    new.load_state_dict(old.state_dict())
    assert new.consumed == new.batches_per_epoch + new.batches_per_epoch // 2
    assert "data layout changed" in caplog.text and "batch_size" in caplog.text


def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    checkpoint_io = AtomicCheckpointIO()
    path = RunDir(tmp_path).last_checkpoint("stage")
    checkpoint_io.save_checkpoint({"global_step": 1, "w": torch.ones(4)}, path)

    def killed_while_writing(obj, f, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        f.write(b"PK\x03\x04 the first bytes of a zip")  # part of the new checkpoint reached the file
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_io.save_checkpoint({"global_step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    loaded = read_checkpoint(path)
    assert loaded["global_step"] == 1 and torch.equal(loaded["w"], torch.ones(4))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"], "no temporary file is left behind"

    (path.parent / ".last.ckpt.tmp999").write_bytes(b"left by a SIGKILL")  # a kill leaves its temp file
    assert RunDir(tmp_path).newest_checkpoint("stage") == path  # a temp file is never a checkpoint
    checkpoint_io.save_checkpoint({"global_step": 3}, path)
    assert read_checkpoint(path)["global_step"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_resume_picks_the_newest_of_last_and_requeue_checkpoints(tmp_path):
    import os

    run = RunDir(tmp_path)
    folder = run.checkpoint_dir("pretrain")
    folder.mkdir(parents=True)
    assert run.newest_checkpoint("pretrain") is None
    for i, name in enumerate(["hpc_ckpt_1.ckpt", "last.ckpt", "hpc_ckpt_2.ckpt"]):
        (folder / name).write_bytes(b"x")
        os.utime(folder / name, ns=(10**9 * (i + 1), 10**9 * (i + 1)))
    assert run.newest_checkpoint("pretrain").name == "hpc_ckpt_2.ckpt"
    os.utime(folder / "last.ckpt", ns=(10**10, 10**10))
    assert run.newest_checkpoint("pretrain").name == "last.ckpt"
