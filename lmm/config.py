"""The run configuration's schema: typed dataclasses, standard library only.

This module (with ``encoders.config``, ``datamodules.config`` and ``grounding.config``, whose sections it
nests) is the whole schema of a run config; implementations import their section from here, never the
reverse, so reading and checking a config costs milliseconds and no model code. ``lmm.config_loading``
reads YAML into these classes. Choice fields are ``Literal`` types, which the loader enforces (a typo names
the allowed values); ``__post_init__`` checks ranges and the rules that span fields, raising ``ValueError``
that names the field. Everything here is checked before ``train.py`` generates data or runs a step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from datamodules.config import DataConfig
from encoders.config import Aspect, ClipEncoderConfig
from grounding.config import GroundingEvalConfig

TemplateName = Literal["plain", "vicuna_v1", "vicuna_v1_question_first"]
LLMMode = Literal["frozen", "full", "lora"]
ProjectorName = Literal["mlp2x_gelu", "linear"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2", "flex_attention"]
#: Lightning's precision settings (``trainer.precision``); the short forms are its legacy aliases.
Precision = Literal[
    "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "32", "16", "bf16", "64"
]
Accelerator = Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"]
#: ``trainer.fsdp.auto_wrap``: ``decoder_layers`` makes each of the LLM's decoder layers (the classes its
#: transformers model lists in ``_no_split_modules``: LlamaDecoderLayer for Vicuna) an FSDP unit of its own,
#: the rest (visual tower, projector, embeddings, head) the root unit; ``none``: one unit for everything.
FSDPAutoWrap = Literal["decoder_layers", "none"]
#: torch's ``ShardingStrategy``: parameters, gradients and optimizer states sharded (full_shard), gradients
#: and optimizer states only (shard_grad_op, ZeRO-2), nothing (no_shard, DDP), or full_shard within a node and
#: replicated across nodes (hybrid_shard).
FSDPSharding = Literal["full_shard", "shard_grad_op", "no_shard", "hybrid_shard"]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _positive(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        _check(value is None or value > 0, f"{name} must be positive, got {value}")


@dataclasses.dataclass
class LLMConfig:
    """Schema of ``llm:``. Size fields are used only when ``path`` is None (a random Llama)."""

    path: str | None = None
    tokenizer: str | None = None  # a tokenizer folder; default: ``path``
    attn_implementation: AttnImplementation = "sdpa"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    init_seed: int = 0
    #: Dropout on the attention probabilities while training (transformers' ``attention_dropout``); None keeps
    #: a loaded model's own setting (0.0 for Vicuna and for the tiny random Llama).
    attention_dropout: float | None = None

    def __post_init__(self) -> None:
        _check(
            self.attention_dropout is None or 0.0 <= self.attention_dropout < 1.0,
            f"attention_dropout must be in [0, 1), got {self.attention_dropout}",
        )
        _positive(
            self,
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "max_position_embeddings",
        )
        _check(
            self.hidden_size % self.num_heads == 0,
            f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}",
        )
        kv = self.num_kv_heads or self.num_heads
        _check(self.num_heads % kv == 0, f"num_heads {self.num_heads} is not a multiple of num_kv_heads {kv}")
        _check(self.path is not None or self.tokenizer is not None, "tokenizer is needed when path is null")


@dataclasses.dataclass
class LoraConfig:
    """Schema of a stage's ``lora:`` (peft LoRA on every linear layer of the LLM but the output head)."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05

    def __post_init__(self) -> None:
        _positive(self, "r", "alpha")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass
class ProjectorConfig:
    """Schema of ``projector:``."""

    name: ProjectorName = "mlp2x_gelu"
    #: A learnable (num_tokens x d) embedding added after the MLP: DiffLMM's fused projector block.
    positional_embedding: bool = False


@dataclasses.dataclass
class StageConfig:
    """Schema of one entry of ``stages:``. Defaults are LLaVA-1.5's pretraining stage."""

    data: str = "pretrain"  # shard folder, relative to data.root unless absolute
    template: TemplateName = "plain"
    aspect: Aspect = "crop"
    llm: LLMMode = "frozen"
    train_projector: bool = True
    train_encoder: bool = True  # the encoder's own trainable parts (DiffLMM's captioner and fused block)
    lr: float = 1e-3
    projector_lr: float | None = None  # default: lr
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    global_batch_size: int = 256
    micro_batch_size: int = 16
    max_steps: int | None = None  # optimizer steps; None = epochs over the shards' sample count
    epochs: float = 1.0
    max_length: int = 2048
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    checkpoint_every_n_steps: int = 200
    #: LLaVA's ``group_by_modality_length``: each run of this many consecutive micro-batches of a stream slot
    #: is cut from its samples sorted by (has an image, length), so a batch holds one modality and similar
    #: lengths and pads less; 0 or 1 = batches as drawn. Resume stays exact (a run is a function of its samples).
    group_by_length: int = 0

    def __post_init__(self) -> None:
        _positive(
            self,
            "lr",
            "projector_lr",
            "global_batch_size",
            "micro_batch_size",
            "max_steps",
            "epochs",
            "max_length",
            "checkpoint_every_n_steps",
        )
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(
            self.group_by_length >= 0,
            f"group_by_length must be >= 0 micro-batches, got {self.group_by_length}",
        )
        _check(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _check(
            self.global_batch_size % self.micro_batch_size == 0,
            f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
            f"{self.micro_batch_size}",
        )


@dataclasses.dataclass
class FSDPConfig:
    """Schema of ``trainer.fsdp:``: how ``trainer.strategy: fsdp`` shards this model (``lmm.strategies``).

    Mixed precision follows ``trainer.precision`` (``bf16-mixed``: parameters gathered and gradients reduced in
    bf16, the sharded master weights and optimizer states in fp32). Checkpoints are full state dicts written by
    rank 0 and hold only the trainable weights, as with every other strategy."""

    auto_wrap: FSDPAutoWrap = "decoder_layers"
    sharding: FSDPSharding = "full_shard"
    #: Recompute each decoder layer's activations in the backward pass instead of keeping them.
    activation_checkpointing: bool = False
    #: Keep the sharded parameters (and so the optimizer step) in CPU memory.
    cpu_offload: bool = False

    def __post_init__(self) -> None:
        _check(
            not (self.sharding == "hybrid_shard" and self.auto_wrap == "none"),
            "sharding hybrid_shard needs auto_wrap decoder_layers (FSDP shards within a node by unit)",
        )


@dataclasses.dataclass
class TrainerConfig:
    """Schema of ``trainer:`` (Lightning Trainer settings)."""

    accelerator: Accelerator = "auto"
    devices: int = 1
    num_nodes: int = 1
    #: A Lightning strategy name (auto, ddp, fsdp, deepspeed_stage_2, ...); ``fsdp`` is configured by ``fsdp``.
    strategy: str = "auto"
    fsdp: FSDPConfig = dataclasses.field(default_factory=FSDPConfig)
    precision: Precision = "32-true"
    gradient_clip_val: float | None = 1.0
    log_every_n_steps: int = 10
    deterministic: bool = False
    #: A progress bar over the stage's optimizer steps, when the output is a terminal.
    progress_bar: bool = True
    #: A log line (step, loss, steps/s, ETA) every this many optimizer steps, in train.log and on stderr,
    #: terminal or not; 0: none.
    progress_every_n_steps: int = 50
    #: Intra-op CPU threads of the training process (None: torch's default, one per core). Tiny models gain
    #: little beyond 2 and lose badly when their threads share cores with other busy processes.
    num_threads: int | None = None
    #: Compute the prefix all rows of a training batch share (the chat template's system line) once per batch
    #: instead of once per row (``lmm.shared_prefix``): the same loss and gradients, fewer tokens. Not under
    #: fsdp or deepspeed, whose wrapped layers run once a step, nor for an LLM whose config sets dropout.
    share_prefix: bool = True
    #: Compute the last decoder layer's MLP and the LM head of a training pass only at the positions whose
    #: logits the loss reads (``lmm.loss_positions``): the same loss and gradients, less work and no logits
    #: for the unsupervised positions. Not under fsdp or deepspeed (the head would run outside the wrapped
    #: forward, and a checkpointed last layer is recomputed whole), nor for an LLM whose config sets dropout.
    read_positions_only: bool = True
    #: Under SLURM: on SIGUSR1 (sbatch --signal=USR1@90) save hpc_ckpt_<n>.ckpt at the next optimizer step
    #: and requeue the job; the restarted job resumes from it.
    slurm_requeue: bool = True

    def __post_init__(self) -> None:
        _positive(self, "devices", "num_nodes", "log_every_n_steps", "num_threads")
        _check(
            self.progress_every_n_steps >= 0,
            f"progress_every_n_steps must be >= 0, got {self.progress_every_n_steps}",
        )
        _check(
            self.gradient_clip_val is None or self.gradient_clip_val > 0,
            f"gradient_clip_val must be positive or null, got {self.gradient_clip_val}",
        )

    @property
    def ranks(self) -> int:
        return self.devices * self.num_nodes


@dataclasses.dataclass
class QAEvalConfig:
    """Question answering on held-out images after the instruction stage (the shapes world's val_qa.json)."""

    questions: str | None = None  # relative to data.root unless absolute; None = skip
    template: TemplateName = "vicuna_v1"
    aspect: Aspect = "pad"
    batch_size: int = 32
    max_new_tokens: int = 12
    limit: int | None = None
    show: int = 6

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "max_new_tokens", "limit")
        _check(self.show >= 0, f"show must be >= 0, got {self.show}")


@dataclasses.dataclass
class TowersConfig:
    """Schema of ``towers:``: where in-world pretrained visual towers (``encoder.pretrain``) are cached, and the
    image-caption shards they learn from. One cache serves every run: an entry is keyed by a hash of its tower's
    architecture, recipe and data, so runs that name the same tower share it and a changed one retrains."""

    cache_dir: str = "data/towers"
    #: Image-caption shard folder, relative to data.root unless absolute. The shapes world's ``objects``: one
    #: shape per image, so a caption names exactly what its image shows.
    data: str = "objects"
    #: Save a resumable checkpoint of a tower stage every this many steps.
    checkpoint_every_n_steps: int = 100
    #: Intra-op CPU threads a tower trains with, whatever ``trainer.num_threads`` the run uses. A CPU tower's
    #: weights depend on it (reductions split by thread count: 1 and 2 threads differ by an ulp after 20 steps
    #: and are different towers after 600), so the stage pins it and the cache key holds it: one key, one tower.
    num_threads: int = 2
    #: Precision the tower stages train in; null: ``trainer.precision``. Part of the cache key. A tower is trained
    #: once and then read frozen in the LMM's own precision, so bf16 here costs the LMM stages nothing.
    precision: Precision | None = None

    def __post_init__(self) -> None:
        _positive(self, "checkpoint_every_n_steps", "num_threads")


@dataclasses.dataclass
class InitConfig:
    """Schema of ``init:``: initial weights from outside the project."""

    #: A transformers LLaVA folder (llava-hf format, e.g. one ``python -m lmm.export hf`` wrote): the run
    #: starts from its vision tower, projector and language model. train.py unpacks it into ``<run>/init/``
    #: once, and the run's config.yaml then names the unpacked folders as its encoder and llm.
    llava_hf: str | None = None


@dataclasses.dataclass
class TrainConfig:
    """Schema of a whole run config (``configs/default.yaml``)."""

    run_name: str = "run"
    runs_dir: str = "runs"
    seed: int = 0
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    #: The selected encoder's schema (``encoders.config.ENCODER_CONFIGS[encoder.name]``).
    encoder: Any = dataclasses.field(default_factory=ClipEncoderConfig)
    projector: ProjectorConfig = dataclasses.field(default_factory=ProjectorConfig)
    llm: LLMConfig = dataclasses.field(default_factory=LLMConfig)
    stages: dict[str, StageConfig] = dataclasses.field(default_factory=dict)
    run_stages: list[str] = dataclasses.field(default_factory=lambda: ["pretrain", "instruct"])
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    qa_eval: QAEvalConfig = dataclasses.field(default_factory=QAEvalConfig)
    grounding: GroundingEvalConfig = dataclasses.field(default_factory=GroundingEvalConfig)
    towers: TowersConfig = dataclasses.field(default_factory=TowersConfig)
    init: InitConfig = dataclasses.field(default_factory=InitConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_name

    def __post_init__(self) -> None:
        _check(
            bool(self.run_name) and "/" not in self.run_name,
            f"run_name {self.run_name!r} is not a folder name",
        )
        _check(bool(self.run_stages), "run_stages is empty: name at least one stage")
        for name in self.run_stages:
            _check(
                name in self.stages,
                f"run_stages names {name!r}, which is not under stages: {sorted(self.stages)}",
            )
        _check(
            len(set(self.run_stages)) == len(self.run_stages),
            f"run_stages repeats a stage: {self.run_stages}",
        )
        for name in self.run_stages:
            stage = self.stages[name]
            _check(
                stage.train_projector or stage.train_encoder or stage.llm != "frozen",
                f"stages.{name} trains nothing: train_projector and train_encoder are false and llm is frozen",
            )
            per_step = stage.micro_batch_size * self.trainer.ranks
            _check(
                stage.global_batch_size % per_step == 0,
                f"stages.{name}.global_batch_size {stage.global_batch_size} is not a multiple of "
                f"micro_batch_size x devices x nodes = {stage.micro_batch_size} x {self.trainer.devices} x "
                f"{self.trainer.num_nodes}",
            )
        _check(
            not (self.grounding.enabled and self.trainer.strategy == "fsdp"),
            "grounding.enabled: the training-time grounding evaluation generates with an unsharded model, which "
            "trainer.strategy fsdp does not keep; set grounding.enabled=false and evaluate the trained run with "
            "python -m grounding layer-sweep --run",
        )
        unknown = sorted(set(self.grounding.stages or ()) - set(self.stages))
        _check(
            not unknown,
            f"grounding.stages names {unknown}, which are not under stages: {sorted(self.stages)}",
        )
        if self.grounding.layers is not None and self.llm.path is None:
            n = self.llm.num_layers
            bad = [layer for layer in self.grounding.layers if not -n <= layer < n]
            _check(not bad, f"grounding.layers {bad} are outside the LLM's {n} layers (llm.num_layers)")
