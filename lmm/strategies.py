"""The distributed strategy a run trains with: a Lightning strategy name, or FSDP configured for this model.

``trainer.strategy: fsdp`` builds Lightning's ``FSDPStrategy`` from ``trainer.fsdp`` (``lmm.config.FSDPConfig``)
for an LMM: the frozen visual tower and projector sit in the root unit, each decoder layer of the LLM is a unit
of its own (the classes its transformers model names in ``_no_split_modules``, as accelerate wraps them), with
original parameters kept (``use_orig_params``) so that frozen, LoRA and fully trained weights mix in one unit,
and full-state-dict checkpoints that ``LMM.on_save_checkpoint`` trims to the trainable weights. On top of
Lightning's strategy, ``LMMFSDPStrategy`` reads its checkpoints with ``weights_only=True`` (Lightning's own
loader unpickles without restriction) and runs on CPU processes too (gloo; FSDP needs the CPU named as the
device), which the tests use. Every other name goes to Lightning unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies.model_parallel import _load_raw_module_state
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from lmm.checkpoint_io import read_checkpoint
from lmm.config import FSDPConfig, TrainerConfig

log = logging.getLogger(__name__)


def build_strategy(trainer: TrainerConfig, model: nn.Module) -> str | Strategy:
    """What ``L.Trainer(strategy=...)`` gets for ``trainer.strategy`` and the model about to train."""
    if trainer.strategy != "fsdp":
        return trainer.strategy
    return fsdp_strategy(trainer.fsdp, model)


def decoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The module classes of ``model`` that a transformers model lists in ``_no_split_modules`` (its decoder
    layers): the units FSDP shards and activation checkpointing recomputes."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(
            "trainer.fsdp.auto_wrap decoder_layers: the LLM names no decoder layer class (_no_split_modules)"
        )
    return classes


def fsdp_strategy(config: FSDPConfig, model: nn.Module) -> LMMFSDPStrategy:
    """Lightning's FSDP strategy as ``config`` says, the units being the decoder layers of ``model.llm`` (the
    LMM's language model: other towers' blocks, such as the diffusion U-Net's, stay in the root unit)."""
    llm = getattr(model, "llm", model)
    layers = decoder_layer_classes(llm) if config.auto_wrap == "decoder_layers" else None
    return LMMFSDPStrategy(
        auto_wrap_policy=layers,
        activation_checkpointing_policy=layers if config.activation_checkpointing else None,
        sharding_strategy=config.sharding.upper(),
        cpu_offload=config.cpu_offload,
        state_dict_type="full",
    )


def clip_sharded_gradients(strategy: Strategy, max_norm: float) -> bool:
    """Clip the gradient norm over all ranks' shards when ``strategy`` is FSDP (Lightning's clipping refuses
    FSDP: only the root FSDP module knows the whole norm); False when it is not FSDP."""
    if not isinstance(strategy, FSDPStrategy) or strategy.model is None:
        return False
    strategy.model.clip_grad_norm_(max_norm)
    return True


class LMMFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP strategy (full-state-dict checkpoints), with checkpoints read safely and CPU processes
    allowed."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        # FSDP takes the CPU only when told so; Lightning passes the device's index, which the CPU lacks.
        from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        from torch.distributed.fsdp import FullyShardedDataParallel

        assert self.model is not None
        units = sum(isinstance(m, FullyShardedDataParallel) for m in self.model.modules())
        checkpointed = sum(type(m).__name__ == "CheckpointWrapper" for m in self.model.modules())
        log.info(
            "FSDP: %d units (%s), %d activation-checkpointed layers, rank %d of %d",
            units,
            self.sharding_strategy.name.lower(),
            checkpointed,
            self.global_rank,
            self.world_size,
        )

    def _full_state_dict_context(self, rank0_only: bool = True) -> Any:
        """FSDP's full-state-dict mode. Gathered states are offloaded to the CPU, except on CPU processes: there
        FSDP's offload is a no-op ``.cpu()`` where it would otherwise clone, which leaves every gathered optimizer
        state of a parameter (``exp_avg``, ``exp_avg_sq``) aliased to one reused buffer (torch 2.14)."""
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        offload = self.root_device.type != "cpu"
        return FSDP.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
            FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
        )

    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.model is not None
        with self._full_state_dict_context():
            return self.model.state_dict()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The whole optimizer state on rank 0, keyed by parameter id (Lightning's format for full checkpoints)."""
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        assert self.model is not None
        with self._full_state_dict_context():
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state

    def load_checkpoint(
        self, checkpoint_path: str | Path, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """A full checkpoint (what this strategy writes), read with ``weights_only=True``; the weights go into
        the shards of every rank and the optimizer states are re-sharded. Sharded folders: Lightning's."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        path = Path(self.broadcast(checkpoint_path))
        if not path.is_file():
            return super().load_checkpoint(checkpoint_path, weights_only)
        assert self.model is not None and self.lightning_module is not None
        checkpoint = read_checkpoint(path)
        _load_raw_module_state(  # the state dict stays in the checkpoint: LMM.on_load_checkpoint checks its keys
            checkpoint["state_dict"],
            module=self.model,
            world_size=self.world_size,
            strict=self.lightning_module.strict_loading,
        )
        states = checkpoint.get("optimizer_states")
        if states is None or self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return checkpoint
        if len(self.optimizers) != len(states):
            raise RuntimeError(
                f"{path} holds {len(states)} optimizer states for {len(self.optimizers)} optimizers"
            )
        with self._full_state_dict_context(rank0_only=False):
            for optimizer, state in zip(self.optimizers, states, strict=True):
                if state["state"] and isinstance(
                    next(iter(state["state"])), int
                ):  # saved keyed by parameter id
                    state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, self.model)
                optimizer.load_state_dict(FSDP.optim_state_dict_to_load(self.model, optimizer, state))
        return checkpoint
