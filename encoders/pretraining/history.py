"""The base of the tower stages: a loss curve kept in their Lightning checkpoints (a resumed stage reports the
whole curve), and gradient clipping that works with their fused AdamW."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class LossHistory(L.LightningModule):
    """Base of the tower stages: ``record(loss)`` once per optimizer step; ``loss_history`` is
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

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip as Lightning does (``clip_grad_norm_`` / ``clip_grad_value_`` over the optimizer's parameters),
        also under bf16-mixed, where Lightning refuses a fused optimizer because it assumes the optimizer unscales
        gradients itself: true with fp16's gradient scaler only, which keeps Lightning's own path (and check)."""
        if not gradient_clip_val or getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
