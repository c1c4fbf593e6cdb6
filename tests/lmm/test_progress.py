"""Progress of a training stage: log lines in a redirected log, a bar over the stage's steps in a terminal."""

from __future__ import annotations

import io
import re

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train

LINE = re.compile(
    r"stage pretrain: step (\d+)/6 \((\d+)%\), loss ([\d.]+), ([\d.]+) steps/s, ETA (\d+:\d\d:\d\d)"
)


def test_a_redirected_run_logs_step_loss_rate_and_eta_every_n_steps(tiny_args, tmp_path, caplog):
    """Issue 16, case 8: with output redirected nothing showed progress for minutes. Every n optimizer steps a
    line gives step/total, the mean loss since the last line (checked against TensorBoard's per-step losses),
    the rate and the ETA; it goes to train.log too."""
    caplog.set_level("INFO")
    args = tiny_args(steps=(6, 1)) + [
        "run_stages=[pretrain]",
        "trainer.progress_every_n_steps=3",
        "stages.pretrain.checkpoint_every_n_steps=100",
        "qa_eval.questions=null",
        "grounding.enabled=false",
    ]
    assert train.main(args) == 0
    lines = [LINE.search(r.getMessage()) for r in caplog.records if r.name == "lmm.progress"]
    assert all(lines) and [int(m.group(1)) for m in lines] == [3, 6]
    assert [int(m.group(2)) for m in lines] == [50, 100]
    run = tmp_path / "runs" / "t"
    acc = EventAccumulator(str(run / "tensorboard" / "pretrain"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert len(losses) == 6
    for m, window in zip(lines, (losses[:3], losses[3:]), strict=True):
        assert abs(float(m.group(3)) - sum(window) / 3) < 1e-3
        assert float(m.group(4)) > 0
    assert lines[-1].group(5) == "0:00:00"
    assert "stage pretrain: step 3/6 (50%)" in (run / "train.log").read_text()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_terminal_the_bar_counts_the_stages_steps(tiny_args, monkeypatch):
    """Issue 16, case 8: Lightning's bar read ``Epoch 0/-2 ... v_num: rain`` for a step-budgeted stage. In a
    terminal the bar now counts the stage's optimizer steps (4 of 4, with accumulation 2 here)."""
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    args = tiny_args(steps=(4, 1)) + [
        "run_stages=[pretrain]",
        "trainer.progress_bar=true",
        "stages.pretrain.micro_batch_size=4",  # two micro-batches per optimizer step
        "qa_eval.questions=null",
        "grounding.enabled=false",
    ]
    assert train.main(args) == 0
    text = terminal.getvalue()
    assert "stage pretrain" in text and "4/4" in text and "loss=" in text
    # Counting micro-batches would read n/8 (the tmp path may hold "8/", e.g. pytest-128/, so match the count).
    assert not re.search(r"\d/8\b", text), "the bar counts optimizer steps, not micro-batches"
    assert "Epoch" not in text and "v_num" not in text
