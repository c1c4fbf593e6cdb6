"""``VaePretraining``: the diffusion encoder's ``AutoencoderKL`` learns to reconstruct the world's images.

The loss is Stable Diffusion's autoencoder objective without its perceptual and adversarial terms: L1 + MSE
reconstruction of the image decoded from a posterior sample, plus ``kl_weight`` times the KL divergence of
the posterior from the unit Gaussian. Afterwards ``latent_scale`` measures the latents' spread, which becomes
the VAE's ``scaling_factor`` (as SD's 0.18215 was chosen: latents of unit variance for the U-Net).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from encoders.config import DiffusionEncoderConfig
from encoders.diffusion import build_vae
from encoders.pretraining.history import LossHistory
from encoders.pretraining.optim import adamw_cosine
from encoders.transform import ImageTransform

#: Stable Diffusion's input range [-1, 1].
SD_MEAN = (0.5, 0.5, 0.5)
SD_STD = (0.5, 0.5, 0.5)


class VaePretraining(LossHistory):
    """Batches of (uint8 squares from ``image_transform()``, captions, ignored) -> reconstruction + KL."""

    def __init__(self, encoder: DiffusionEncoderConfig) -> None:
        super().__init__()
        if encoder.pretrain is None:
            raise ValueError("encoder.pretrain is unset: nothing to pretrain")
        self.encoder_config = encoder
        self.recipe = encoder.pretrain.vae
        self.vae = build_vae(encoder)

    def image_transform(self) -> ImageTransform:
        return ImageTransform(
            self.encoder_config.image_size, SD_MEAN, SD_STD, self.encoder_config.pretrain.aspect
        )

    def training_step(self, batch: tuple[Tensor, list[str]], batch_idx: int) -> Tensor:
        images = self.image_transform().normalize(batch[0])
        posterior = self.vae.encode(images).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        rec = F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images)
        kl = posterior.kl().mean()
        loss = rec + self.recipe.kl_weight * kl
        n = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/reconstruction", rec, batch_size=n)
        self.log("train/kl", kl, batch_size=n)
        self.record(loss.item())
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_cosine(self, self.recipe.lr, 0.0, self.trainer.max_steps // 20, self.trainer.max_steps)

    @torch.no_grad()
    def latent_scale(self, batches: Iterable[Tensor]) -> float:
        """1 / standard deviation of posterior samples over ``batches`` of uint8 squares."""
        was_training = self.training
        self.eval()
        samples = [
            self.vae.encode(self.image_transform().normalize(b.to(self.device))).latent_dist.sample()
            for b in batches
        ]
        self.train(was_training)
        return float(1.0 / torch.cat(samples).std())
