"""The LMM LightningModule: visual encoder -> projector -> LLM, trained stage by stage.

Visual tokens are written into the ``<image>`` slots of the token sequence (the batch already holds one
slot per visual token), so image and text-only samples share a batch and every sample's image span is
known exactly (attend-and-segment needs it). ``configure_stage`` applies a stage's freezing (projector,
the encoder's own trainable parts, the LLM frozen / full / LoRA) and logs what trains. Checkpoints keep
only trainable parameters plus the run config; loading checks that nothing trainable is missing and that
no key is foreign. ``generate`` runs batched, left-padded generation from images and prompts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from encoders.base import VisualEncoder
from encoders.registry import build_encoder
from grounding.batching import left_pad
from lmm.batch import IGNORE_INDEX, PackedImages, TrainBatch
from lmm.checkpoint_io import check_checkpoint_keys, unwrapped_name
from lmm.config import LLMConfig, ProjectorConfig, StageConfig
from lmm.llm import LLMBackbone
from lmm.loss_positions import read_positions_loss, supports_read_positions_loss
from lmm.preprocess import SampleEncoder
from lmm.projector import Projector
from lmm.shared_prefix import dropout_free, prefix_shared_loss, shared_prefix_length

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PromptBatch:
    """Left-padded generation inputs; ``image_spans[b]`` = (start, end) of sample b's visual tokens or None."""

    input_ids: Tensor
    attention_mask: Tensor
    image_spans: list[tuple[int, int] | None]
    images: Tensor | None


class LMM(L.LightningModule):
    def __init__(
        self,
        encoder: Any,
        projector: ProjectorConfig,
        llm: LLMConfig,
        llm_backbone: LLMBackbone | None = None,
    ) -> None:
        """``llm_backbone``: an already built ``LLMBackbone`` (released checkpoints, ``lmm.released``)
        used instead of building one from ``llm``."""
        super().__init__()
        self.encoder: VisualEncoder = build_encoder(encoder)
        self.llm = llm_backbone if llm_backbone is not None else LLMBackbone(llm)
        self.projector = Projector(projector, self.encoder.embed_dim, self.llm.width, self.encoder.num_tokens)
        self.stage: StageConfig | None = None
        self.stage_name: str | None = None
        self.run_config: Any = None  # the TrainConfig it was built from (lmm.build), saved into checkpoints
        #: Training passes compute the prefix all of a batch's rows share once (``lmm.shared_prefix``); the
        #: training loop turns it off where a decoder layer must run once a step (sharded strategies).
        self.share_prefix = True
        #: Training passes compute the last decoder layer's MLP and the LM head only where the loss reads them
        #: (``lmm.loss_positions``); the training loop turns it off under sharded strategies, and it is skipped
        #: for an LLM with dropout or whose logits are more than its head's output.
        self.read_positions_only = True
        # Frozen weights are rebuilt from their source (weight files or seeds), not from checkpoints.
        self.strict_loading = False

    # ----------------------------------------------------------------------------------------- stages
    def configure_stage(self, name: str, stage: StageConfig, quiet: bool = False) -> None:
        """Freeze and unfreeze for stage ``name``; logs what trains (at debug level when ``quiet``, for
        loading a trained model rather than training it)."""
        self.stage, self.stage_name = stage, name
        self.encoder.requires_grad_(stage.train_encoder)
        self.encoder.freeze_pretrained()
        self.projector.requires_grad_(stage.train_projector)
        if stage.llm == "lora":
            self.llm.enable_lora(stage.lora)
        self.llm.set_trainable(stage.llm)
        log.log(
            logging.DEBUG if quiet else logging.INFO, "stage %s trains:\n%s", name, self.trainable_summary()
        )

    def trainable_summary(self) -> str:
        rows = []
        for part in ("encoder", "projector", "llm"):
            params = list(getattr(self, part).parameters())
            total = sum(p.numel() for p in params)
            train = sum(p.numel() for p in params if p.requires_grad)
            rows.append(f"  {part:<10} {train:>14,} / {total:>14,} trainable")
        return "\n".join(rows)

    # ---------------------------------------------------------------------------------------- forward
    def visual_tokens(self, images: Tensor) -> Tensor:
        return self.projector(self.encoder(images))

    def embed_inputs(self, input_ids: Tensor, images: Tensor | None) -> Tensor:
        embeds = self.llm.embed(input_ids)
        slots = input_ids == self.llm.image_token_id
        n_slots = int(slots.sum())
        n_images = 0 if images is None else images.shape[0]
        if n_slots != n_images * self.encoder.num_tokens:
            raise ValueError(
                f"batch has {n_slots} image-token slots but {n_images} images x {self.encoder.num_tokens} tokens"
            )
        if n_images:
            visual = self.visual_tokens(images).to(embeds.dtype)
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), visual)
        elif self.training and _data_parallel():
            embeds = embeds + self._visual_zero().to(embeds.dtype)
        return embeds

    def _visual_zero(self) -> Tensor:
        """A zero that depends on every trainable weight of the visual path, for a batch without images.

        Batches grouped by length (``group_by_length``) are grouped by modality too, so a text-only batch is
        common; its step leaves the projector out of the graph, and DDP, which expects every trainable parameter
        to take part on every rank, stops the run. So with more than one rank the projector (and the tower, when
        it trains) runs on a zero input and its sum is added times 0: its gradient on this rank is zero and the
        other ranks' gradients average with it. A single process leaves the weights out instead (Adam skips a
        parameter without a gradient; a zero gradient would still move it by its momentum)."""
        tower_trains = any(p.requires_grad for p in self.encoder.parameters())
        if not tower_trains and not any(p.requires_grad for p in self.projector.parameters()):
            return torch.zeros(())
        weight = next(self.projector.parameters())
        if tower_trains:
            size = self.encoder.image_size
            tokens = self.visual_tokens(torch.zeros(1, 3, size, size, device=weight.device))
        else:
            width = self.encoder.embed_dim
            tokens = self.projector(torch.zeros(1, 1, width, device=weight.device, dtype=weight.dtype))
        return tokens.sum() * 0.0

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        images: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Any:
        embeds = self.embed_inputs(input_ids, images)
        # No key/value cache in a training pass: activation checkpointing reruns each decoder layer in the
        # backward pass, and a cache would take that layer's keys twice.
        return self.llm.model(
            inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, use_cache=False
        )

    def training_loss(
        self, input_ids: Tensor, attention_mask: Tensor, images: Tensor | None, labels: Tensor
    ) -> Tensor:
        """The loss ``forward`` gives, with the rows' shared prefix computed once when ``share_prefix`` and
        the last layer's MLP and the head only at the positions the loss reads when ``read_positions_only``."""
        causal_lm = self.llm.model
        exact = dropout_free(causal_lm.config)  # the cheaper passes draw dropout masks of other shapes
        prefix = (
            shared_prefix_length(input_ids, attention_mask, labels, self.llm.image_token_id)
            if self.share_prefix and exact
            else 0
        )
        read_only = self.read_positions_only and exact and supports_read_positions_loss(causal_lm)
        if not prefix and not read_only:
            return self(input_ids, attention_mask, images, labels).loss
        embeds = self.embed_inputs(input_ids, images)
        if not prefix:
            return read_positions_loss(causal_lm, embeds, attention_mask, labels)
        return prefix_shared_loss(causal_lm, embeds, attention_mask, labels, prefix, read_only=read_only)

    def training_step(self, batch: TrainBatch, batch_idx: int) -> Tensor:
        images = None if batch.images is None else self.encoder_pixels(batch.images)
        loss = self.training_loss(batch.input_ids, batch.attention_mask, images, batch.labels)
        n = len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log(
            "train/target_tokens", (batch.labels != IGNORE_INDEX).sum().float(), batch_size=n, reduce_fx="sum"
        )
        return loss

    def encoder_pixels(self, images: PackedImages) -> Tensor:
        """A batch's packed uint8 images (already on this module's device) -> the encoder's normalised input,
        fitted with the current stage's aspect: the resize and normalisation run on the accelerator."""
        if self.stage is None:
            raise RuntimeError(
                "configure_stage() must run before training batches: the stage sets the image aspect"
            )
        transform = self.encoder.image_transform(self.stage.aspect)
        # Pixels are prepared in float32 whatever the precision plugin's autocast would pick.
        with torch.autocast(images.data.device.type, enabled=False):
            pixels = images.to_pixels(transform)
        if self._trainer is not None:
            # The loop casts a batch's floating tensors for "true" half/double precision before the step;
            # the images only become floating here, so they get the same cast now.
            pixels = self._trainer.precision_plugin.convert_input(pixels)
        return pixels

    # -------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> Any:
        from transformers import get_cosine_schedule_with_warmup

        if self.stage is None:
            raise RuntimeError("configure_stage() must run before fitting")
        stage = self.stage
        groups: dict[tuple[float, float], list[Tensor]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            lr = (
                stage.projector_lr
                if name.startswith("projector.") and stage.projector_lr is not None
                else stage.lr
            )
            # As HF Trainer does for LLaVA: no weight decay on biases and norm weights.
            decay = stage.weight_decay if param.ndim >= 2 else 0.0
            groups.setdefault((lr, decay), []).append(param)
        if not groups:
            raise RuntimeError(f"stage {self.stage_name} has nothing to train")
        optimizer = torch.optim.AdamW(
            [{"params": p, "lr": lr, "weight_decay": wd} for (lr, wd), p in groups.items()],
            betas=(0.9, 0.999),
        )
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(stage.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------ checkpoints
    def trainable_keys(self) -> set[str]:
        """State-dict names of the trainable parameters (FSDP's wrapper names taken out)."""
        return {unwrapped_name(name) for name, p in self.named_parameters() if p.requires_grad}

    def configure_gradient_clipping(
        self,
        optimizer: Any,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        from lmm.strategies import clip_sharded_gradients

        if gradient_clip_val and clip_sharded_gradients(self.trainer.strategy, gradient_clip_val):
            return  # FSDP: the root module clips over every rank's shards
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        config = None if self.run_config is None else dataclasses.asdict(self.run_config)
        checkpoint["lmm"] = {"stage": self.stage_name, "config": config}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        sharded = self._trainer is not None and isinstance(self._trainer.strategy, FSDPStrategy)
        stage = checkpoint.get("lmm", {}).get("stage")
        check_checkpoint_keys(self, checkpoint["state_dict"], stage, check_shapes=not sharded)

    def sample_encoder(self, stage: StageConfig) -> SampleEncoder:
        """The per-sample preprocessing of a stage: its template and max length, this model's tokenizer and
        visual-token count (the stage's image aspect is applied on the device: ``encoder_pixels``)."""
        from datamodules.templates import get_template

        return SampleEncoder(
            self.llm.tokenizer, get_template(stage.template), self.encoder.num_tokens, stage.max_length
        )

    # ------------------------------------------------------------------------------------- generation
    def prepare_prompts(self, prompts: Sequence[str], images: Sequence[Tensor | None]) -> PromptBatch:
        """Tokenise chat-formatted prompts (each with at most one ``<image>``), expand and left-pad them."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
        tok = self.llm.tokenizer
        image_id, n_visual = self.llm.image_token_id, self.encoder.num_tokens
        rows = []
        for prompt, image in zip(prompts, images, strict=True):
            ids = tok(prompt, add_special_tokens=True)["input_ids"]
            count = ids.count(image_id)
            if count != (0 if image is None else 1):
                raise ValueError(
                    f"prompt has {count} <image> tokens but {'no' if image is None else 'one'} image"
                )
            if count:
                i = ids.index(image_id)
                ids = ids[:i] + [image_id] * n_visual + ids[i + 1 :]
            rows.append(ids)
        input_ids, attention_mask, offsets = left_pad(rows, tok.pad_token_id)
        spans = [
            (offset + ids.index(image_id), offset + ids.index(image_id) + n_visual)
            if image_id in ids
            else None
            for offset, ids in zip(offsets, rows, strict=True)
        ]
        present = [im for im in images if im is not None]
        stacked = torch.stack(list(present)) if present else None
        return PromptBatch(
            input_ids.to(self.device),
            attention_mask.to(self.device),
            spans,
            None if stacked is None else stacked.to(self.device),
        )

    @torch.no_grad()
    def generate_from(self, batch: PromptBatch, max_new_tokens: int = 64, **kwargs: Any) -> Tensor:
        """Greedy by default; returns the new tokens (B, T), padded with pad after each sample's EOS."""
        embeds = self.embed_inputs(batch.input_ids, batch.images)
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("eos_token_id", self.llm.tokenizer.eos_token_id)
        return self.llm.model.generate(
            inputs_embeds=embeds,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.llm.tokenizer.pad_token_id,
            **kwargs,
        )

    def decode(self, new_tokens: Tensor) -> list[str]:
        """New tokens -> texts, cut at the first EOS."""
        eos = self.llm.tokenizer.eos_token_id
        texts = []
        for row in new_tokens.tolist():
            if eos in row:
                row = row[: row.index(eos)]
            texts.append(self.llm.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    def generate(
        self, prompts: Sequence[str], images: Sequence[Tensor | None], max_new_tokens: int = 64, **kwargs: Any
    ) -> list[str]:
        was_training = self.training
        self.eval()
        try:
            batch = self.prepare_prompts(prompts, images)
            return self.decode(self.generate_from(batch, max_new_tokens, **kwargs))
        finally:
            self.train(was_training)


def _data_parallel() -> bool:
    """Whether this process is one of several ranks training together (DDP or FSDP)."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and (torch.distributed.get_world_size() > 1)
    )
