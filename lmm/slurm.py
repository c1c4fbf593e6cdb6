"""SLURM requeue at a step boundary: the signal is noted, the checkpoint is written at the next optimizer step.

Standard library only, so ``train.py`` installs the handler before importing Lightning (seconds during which
SIGUSR1 would otherwise kill the process).


``sbatch --signal=USR1@90 --requeue`` sends SIGUSR1 90 s before the time limit. ``RequeueSignal`` only records
that it arrived (a handler must not save mid-step); ``RequeueAtStep`` then saves
``checkpoints/<stage>/hpc_ckpt_<n>.ckpt`` at the first optimizer step after it (``lmm.callbacks``), where weights, optimizer
state, accumulated gradients and the data position agree, stops the loop and runs ``scontrol requeue``. The
requeued job (same id, same run directory) resumes from the newest of that checkpoint and ``last.ckpt``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger(__name__)


class Requeued(Exception):
    """The stage saved a requeue checkpoint and asked SLURM to requeue the job; the process should end."""


class RequeueSignal:
    """Remembers that the SLURM requeue signal (SIGUSR1) arrived; installed first thing by ``train.py``."""

    def __init__(self) -> None:
        self.received_at: float | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if self.received_at is None:
            self.received_at = time.time()
            print(f"train.py: requeue signal {signum} received at {self.received_at:.3f}", file=sys.stderr)

    @classmethod
    def install_if_slurm(cls, signum: int = signal.SIGUSR1) -> RequeueSignal | None:
        """Install the handler in a SLURM job step (USR1 kills a process without a handler).

        Detects a job step as Lightning's ``SLURMEnvironment.detect`` does.
        """
        if "SLURM_NTASKS" not in os.environ or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
            return None
        flag = cls()
        try:
            signal.signal(signum, flag)
        except ValueError:  # not the main thread: leave the signal to whoever runs us
            return None
        return flag


def slurm_job_id() -> str:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` in a job array, else the job id."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID", "")


def requeue_job(job: str) -> None:
    """``scontrol requeue <job>``; SLURM kills this job right after, so save everything first."""
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode:
        log.warning("scontrol requeue %s failed: %s", job, result.stderr.strip())
