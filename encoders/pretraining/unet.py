"""``UnetPretraining``: the diffusion encoder's U-Net learns to denoise the world's latents, given its captions.

DDPM training as Stable Diffusion's: the frozen in-world VAE encodes an image (a posterior sample, scaled by
its ``scaling_factor``), diffusers' ``DDPMScheduler`` noises it at a uniformly drawn timestep, and the U-Net
predicts the noise (MSE) with the caption's per-token text-tower outputs as ``encoder_hidden_states``; a
fraction of captions is replaced by the empty one, as SD does. Conditioning on what the caption says is what
makes the U-Net's cross-attention mean something before the implicit captioner (DiffLMM) takes its place.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.config import DiffusionEncoderConfig
from encoders.diffusion import build_scheduler, build_unet
from encoders.pretraining.contrastive import CaptionTokenizer
from encoders.pretraining.history import LossHistory
from encoders.pretraining.optim import adamw_cosine
from encoders.pretraining.vae import SD_MEAN, SD_STD
from encoders.transform import ImageTransform


class UnetPretraining(LossHistory):
    """Batches of (uint8 squares, captions) -> DDPM noise-prediction loss. ``vae`` (an in-world trained
    ``AutoencoderKL``) and ``text`` (the CLIP recipe's text tower, ``build_text_tower``) stay frozen."""

    def __init__(self, encoder: DiffusionEncoderConfig, vae: nn.Module, text: nn.Module) -> None:
        super().__init__()
        if encoder.pretrain is None:
            raise ValueError("encoder.pretrain is unset: nothing to pretrain")
        self.encoder_config = encoder
        self.recipe = encoder.pretrain.unet
        self.vae = vae.requires_grad_(False).eval()
        self.text = text.requires_grad_(False).eval()
        self.unet = build_unet(encoder)
        self.scheduler = build_scheduler(encoder, "ddpm")
        self.tokenizer = CaptionTokenizer(text.context_length)

    def train(self, mode: bool = True) -> UnetPretraining:
        super().train(mode)
        self.vae.eval()  # frozen parts keep their eval behaviour whatever Lightning asks
        self.text.eval()
        return self

    def image_transform(self) -> ImageTransform:
        return ImageTransform(
            self.encoder_config.image_size, SD_MEAN, SD_STD, self.encoder_config.pretrain.aspect
        )

    @torch.no_grad()
    def condition(self, captions: list[str]) -> Tensor:
        """Captions -> the text tower's per-token outputs ``(B, context_length, width)``."""
        return self.text(self.tokenizer(captions).to(self.device))[1]

    def training_step(self, batch: tuple[Tensor, list[str]], batch_idx: int) -> Tensor:
        squares, captions = batch
        images = self.image_transform().normalize(squares)
        drop = torch.rand(len(captions)) < self.recipe.uncond_prob
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        with torch.no_grad():
            latents = self.vae.encode(images).latent_dist.sample() * self.vae.config.scaling_factor
            cond = self.condition(captions)
        noise = torch.randn_like(latents)
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (latents.shape[0],), device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        prediction = self.unet(noisy, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(prediction, noise)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(captions))
        self.record(loss.item())
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_cosine(self, self.recipe.lr, 0.0, self.trainer.max_steps // 20, self.trainer.max_steps)
