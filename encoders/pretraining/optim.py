"""The optimiser every tower stage uses: AdamW (no decay on biases and norms) with warmup then cosine decay."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def adamw_cosine(
    module: nn.Module, lr: float, weight_decay: float, warmup: int, total: int
) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer for ``module``'s trainable parameters."""
    from transformers import get_cosine_schedule_with_warmup

    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(warmup, total // 2), total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
