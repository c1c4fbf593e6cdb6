"""Stage checkpoints on disk: written atomically, read with ``weights_only=True``, checked against the model.

A stage checkpoint holds only the weights the stage trains (``LMM.on_save_checkpoint`` drops frozen ones,
which are rebuilt from their source), plus Lightning's loop, optimizer and data-stream state. A kill during a
write never leaves a half-written file that a rerun would trust: ``AtomicCheckpointIO`` writes a temporary
file in the same folder, syncs it, and renames it over the old one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor, nn


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint writing that a kill cannot corrupt: temp file in the same folder, fsync, ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict, path: str | Path, storage_options: object = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a process killed mid-save
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` survive a crash."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, tensors memory-mapped: reading a 7B stage's step count loads no weights."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path} cannot be read ({str(err).splitlines()[0]})") from None


#: What wrappers insert into parameter names: FSDP units and activation checkpointing (state dicts omit them).
WRAPPER_NAME_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrapped_name(name: str) -> str:
    """A parameter's name as a state dict has it, whatever FSDP or activation checkpointing wrap around it."""
    for part in WRAPPER_NAME_PARTS:
        name = name.replace(part, "")
    return name


def check_checkpoint_keys(
    model: nn.Module, state_dict: dict[str, Tensor], stage: str | None, check_shapes: bool = True
) -> None:
    """One-line errors for a checkpoint that does not fit the model as configured for its stage: every key
    must be a parameter of the model, every trainable parameter must be there, and shapes must agree
    (``check_shapes=False`` for a model sharded by FSDP, whose parameters are local shards: FSDP compares the
    full shapes when it loads)."""
    own = {unwrapped_name(name): p for name, p in model.named_parameters()}
    foreign = sorted(k for k in state_dict if k not in own)
    if foreign:
        raise ValueError(
            f"checkpoint (stage {stage}) has {len(foreign)} keys the model lacks, e.g. {foreign[0]!r}"
        )
    trainable = {name for name, p in own.items() if p.requires_grad}
    missing = sorted(trainable - state_dict.keys())
    if missing:
        raise ValueError(
            f"checkpoint (stage {stage}) lacks {len(missing)} trainable weights, e.g. {missing[0]!r}"
        )
    for k, v in state_dict.items():
        if check_shapes and own[k].shape != v.shape:
            raise ValueError(
                f"checkpoint key {k!r} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}"
            )


def load_stage_weights(model: nn.Module, path: Path, stage: str) -> dict[str, Any]:
    """Load a stage's trainable weights into a model already configured for that stage."""
    checkpoint = read_checkpoint(path)
    state = checkpoint["state_dict"]
    check_checkpoint_keys(model, state, stage)
    model.load_state_dict(state, strict=False)
    return checkpoint
