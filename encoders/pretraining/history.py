"""A tower stage's loss curve, kept in its Lightning checkpoints so a resumed stage reports the whole curve."""

from __future__ import annotations

from typing import Any

import lightning as L


class LossHistory(L.LightningModule):
    """Mixin for the tower stages: ``record(loss)`` once per optimizer step; ``loss_history`` is
    ``[(step, loss), ...]`` and survives a resume from a checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.loss_history: list[tuple[int, float]] = []

    def record(self, loss: float) -> None:
        self.loss_history.append((int(self.global_step), float(loss)))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["loss_history"] = list(self.loss_history)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loss_history = [(int(s), float(v)) for s, v in checkpoint.get("loss_history", [])]
