"""Progress of a training stage, in a terminal and in a redirected log alike.

``StageProgress`` counts optimizer steps against the stage's own total (not Lightning's epochs, which a
step-budgeted stream does not have: its stock bar read ``Epoch 0/-2``). Every ``every_n_steps`` steps, and
at the stage's last step, rank 0 logs one line (``train.log`` and stderr):

    stage pretrain: step 200/600 (33%), loss 0.512, 4.87 steps/s, ETA 0:01:22

with the mean loss of the micro-batches since the previous line and the rate since this process started
the stage (a resumed stage counts from where it resumed). When stderr is a terminal and ``bar`` is on, a tqdm
bar over the same steps shows the latest loss, and log lines print above it instead of through it.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

import lightning as L
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger(__name__)


class StageProgress(L.Callback):
    """Log lines every ``every_n_steps`` optimizer steps (0: none) and, with ``bar``, a terminal bar; rank 0."""

    def __init__(
        self, stage: str, total_steps: int, every_n_steps: int, bar: bool, stream: IO[str] | None = None
    ) -> None:
        self.stage = stage
        self.total = total_steps
        self.every = every_n_steps
        self.show_bar = bar
        self.stream = stream
        self._bar: tqdm | None = None
        self._redirect: contextlib.AbstractContextManager | None = None
        self._losses: list[Any] = []
        self._start_step = self._step = 0
        self._start_time = 0.0

    @staticmethod
    def terminal(stream: IO[str] | None = None) -> bool:
        """Whether ``stream`` (default stderr) is a terminal, where a bar redraws in place."""
        stream = sys.stderr if stream is None else stream
        return bool(getattr(stream, "isatty", lambda: False)())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = self._step = trainer.global_step
        self._start_time = time.perf_counter()
        if self.show_bar and trainer.is_global_zero:
            self._bar = tqdm(
                total=self.total,
                initial=self._start_step,
                desc=f"stage {self.stage}",
                unit="step",
                file=self.stream if self.stream is not None else sys.stderr,
                dynamic_ncols=True,
            )
            self._redirect = logging_redirect_tqdm()  # log lines above the bar, not through it
            self._redirect.__enter__()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None:
            # Lightning hands over the loss divided by the accumulation factor; undo that for the mean.
            self._losses.append(loss.detach() * trainer.accumulate_grad_batches)
        step = trainer.global_step
        if step == self._step:  # inside a gradient accumulation window
            return
        self._step = step
        if not trainer.is_global_zero:
            self._losses.clear()
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if self._losses:
                self._bar.set_postfix(loss=f"{float(self._losses[-1]):.4f}", refresh=False)
        if self.every and (step % self.every == 0 or step == self.total):
            log.info(self.line(step))
            self._losses.clear()

    def line(self, step: int) -> str:
        """``stage S: step s/total (p%), loss L, R steps/s, ETA h:mm:ss``."""
        parts = [f"stage {self.stage}: step {step}/{self.total} ({100 * step / max(1, self.total):.0f}%)"]
        if self._losses:
            parts.append(f"loss {float(sum(self._losses)) / len(self._losses):.4f}")
        elapsed = time.perf_counter() - self._start_time
        done = step - self._start_step
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            eta = datetime.timedelta(seconds=round(max(0, self.total - step) / rate))
            parts += [f"{rate:.2f} steps/s", f"ETA {eta}"]
        return ", ".join(parts)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
