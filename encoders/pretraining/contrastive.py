"""``ContrastivePretraining``: a CLIP vision tower and a tiny text tower learn image-caption pairs with
open_clip's ``ClipLoss``, as CLIP was pretrained; afterwards only the vision tower is kept (frozen by the LMM).

The vision tower is exactly the one ``encoders.clip.ClipEncoder`` runs (``build_vision_tower``: the same
open_clip ``VisionTransformer``, initialised from the encoder's ``init_seed``), its pooled, projected output
is the image embedding; the text tower is open_clip's ``TextTransformer`` at the recipe's size over open_clip's
BPE tokenizer (argmax pooling at the end-of-text token, as CLIP). Both embeddings are L2-normalised and
compared with a learnable temperature, clamped at 100 as open_clip's training loop does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.base import seeded_init
from encoders.clip import QuickGELU, build_vision_tower
from encoders.config import ClipEncoderConfig, TextTowerConfig
from encoders.pretraining.history import LossHistory
from encoders.pretraining.optim import adamw_cosine
from encoders.transform import CLIP_MEAN, CLIP_STD, ImageTransform

#: open_clip's BPE vocabulary size (its SimpleTokenizer).
CLIP_VOCAB_SIZE = 49408


class CaptionTokenizer:
    """open_clip's BPE tokenizer at a fixed context length: start token, text, end token, zero padding."""

    def __init__(self, context_length: int) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.context_length = context_length
        self._tokenizer = SimpleTokenizer(context_length=context_length)

    def __call__(self, texts: Sequence[str]) -> Tensor:
        return self._tokenizer(list(texts))


def build_text_tower(config: TextTowerConfig, embed_dim: int, quick_gelu: bool, seed: int) -> nn.Module:
    """open_clip's ``TextTransformer`` at ``config``'s size, projecting to ``embed_dim``; per-token outputs
    (after the final LayerNorm) come with the pooled embedding (``output_tokens``)."""
    from open_clip.transformer import LayerNorm, TextTransformer

    with seeded_init(seed):
        return TextTransformer(
            context_length=config.context_length,
            vocab_size=CLIP_VOCAB_SIZE,
            width=config.width,
            heads=config.heads,
            layers=config.layers,
            output_dim=embed_dim,
            act_layer=QuickGELU if quick_gelu else nn.GELU,
            norm_layer=LayerNorm,
            output_tokens=True,
        )


class ContrastivePretraining(LossHistory):
    """Batches of (uint8 squares from ``image_transform()``, caption strings) -> ClipLoss."""

    def __init__(self, encoder: ClipEncoderConfig) -> None:
        super().__init__()
        if encoder.pretrain is None:
            raise ValueError("encoder.pretrain is unset: nothing to pretrain")
        self.encoder_config = encoder
        self.recipe = encoder.pretrain
        self.visual = build_vision_tower(encoder)
        self.text = build_text_tower(
            self.recipe.text, self.recipe.embed_dim, encoder.quick_gelu, seed=self.recipe.seed
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.tokenizer = CaptionTokenizer(self.recipe.text.context_length)
        from open_clip.loss import ClipLoss

        self.loss_fn = ClipLoss()

    def image_transform(self) -> ImageTransform:
        return ImageTransform(self.visual.image_size[0], CLIP_MEAN, CLIP_STD, self.recipe.aspect)

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised images and token ids -> L2-normalised (image, text) embeddings."""
        image_features = F.normalize(self.visual(images), dim=-1)
        text_features = F.normalize(self.text(tokens)[0], dim=-1)
        return image_features, text_features

    def training_step(self, batch: tuple[Tensor, list[str]], batch_idx: int) -> Tensor:
        squares, captions = batch
        images = self.image_transform().normalize(squares)
        tokens = self.tokenizer(captions).to(images.device)
        image_features, text_features = self(images, tokens)
        loss = self.loss_fn(image_features, text_features, self.logit_scale.exp())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(captions))
        # Image -> caption top-1 within the batch: with distinct captions, how often the tower tells apart
        # captions that differ in one word.
        matches = (image_features @ text_features.T).argmax(1) == torch.arange(
            len(captions), device=loss.device
        )
        self.log("train/batch_accuracy", matches.float().mean(), batch_size=len(captions))
        self.log("train/logit_scale", self.logit_scale.exp(), batch_size=len(captions))
        self.record(loss.item())
        return loss

    def on_train_batch_end(self, *args: Any) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0, math.log(100))

    def configure_optimizers(self) -> dict[str, Any]:
        recipe = self.recipe
        return adamw_cosine(self, recipe.lr, recipe.weight_decay, recipe.warmup_steps, self.trainer.max_steps)

    def vision_state(self) -> dict[str, Tensor]:
        """The vision tower alone, keyed as an open_clip checkpoint (``visual.*``): what the encoder loads."""
        return {f"visual.{k}": v.detach().contiguous() for k, v in self.visual.state_dict().items()}

    def text_state(self) -> dict[str, Tensor]:
        """The text tower alone (what the in-world U-Net is conditioned with)."""
        return {k: v.detach().contiguous() for k, v in self.text.state_dict().items()}
