"""DiffLMM's diffusion encoder: one-step Stable-Diffusion U-Net features conditioned by an implicit captioner.

Images in [-1, 1] (384 px for SD-1.5) are VAE-encoded, scaled by the VAE's scaling factor, noised to
timestep ``t`` with the scheduler's ``add_noise``, and pushed once through the U-Net with the implicit
caption as ``encoder_hidden_states``; the output of ``up_blocks[up_block]`` (1280 channels at 24x24 for
SD-1.5 at 384 px) is the feature map, and the U-Net stops there because its remaining blocks only serve
denoising. The implicit captioner is the one trainable part: the frozen CLIP encoder's patch tokens go
through Linear -> GELU -> Linear to the U-Net's cross-attention width, plus a learnable positional
embedding, and serve directly as the conditioning tokens; gradients reach it through the frozen U-Net. The
VAE, U-Net and scheduler come from a local folder in the Stable-Diffusion layout (``unet/``, ``vae/``,
``scheduler/``) or, without one, are built at random from SD-1.5's architecture with config overrides (the
tiny test and default models). Noise: ``stochastic`` samples the VAE posterior and fresh noise on every
call (the reference implementation), ``fixed`` uses the posterior mean and a noise map generated from
``noise_seed``, and ``auto`` (default) is stochastic while training and fixed in eval mode. ``pixel_norm:
clip`` normalises the input with CLIP's mean/std instead of [-1, 1], as the released DiffLMM was trained.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.base import VisualEncoder, seeded_init
from encoders.clip import ClipEncoder
from encoders.config import DiffusionEncoderConfig, NoiseMode, SchedulerName
from encoders.transform import CLIP_MEAN, CLIP_STD

log = logging.getLogger(__name__)

NOISE_MODES: tuple[str, ...] = get_args(NoiseMode)
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)
#: The Stable-Diffusion components the encoder needs, as subfolders of ``sd_path``.
SD_COMPONENTS = ("unet", "vae", "scheduler")


def sd15_unet_config() -> dict[str, Any]:
    """Stable Diffusion 1.5's U-Net architecture (its ``unet/config.json``), the base of random builds."""
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 768,
        # diffusers' legacy name: for SD-1.5 this is the number of heads, not the head width.
        "attention_head_dim": 8,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def sd15_vae_config() -> dict[str, Any]:
    """Stable Diffusion 1.5's VAE architecture (its ``vae/config.json``)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }


def sd15_scheduler_config() -> dict[str, Any]:
    """Stable Diffusion 1.5's noise schedule (the fields ``add_noise`` depends on)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
    }


class ImplicitCaptioner(nn.Module):
    """CLIP patch tokens -> U-Net conditioning tokens: Linear -> GELU -> Linear, plus a positional embedding."""

    def __init__(self, in_dim: int, dim: int, num_tokens: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, num_tokens, dim))
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.mlp(tokens) + self.pos_embed


class DiffusionEncoder(VisualEncoder):
    """Images in [-1, 1] -> (B, h*w, C) features of U-Net ``up_blocks[up_block]``; see the module docstring.

    ``encode`` returns the feature map and the CLIP tokens it computed, so the fused encoder reuses them.
    """

    Config = DiffusionEncoderConfig

    def __init__(self, config: DiffusionEncoderConfig) -> None:
        super().__init__()
        self.noise = config.noise
        if config.scheduler not in SCHEDULERS:
            raise ValueError(f"encoder.scheduler {config.scheduler!r} is not one of {SCHEDULERS}")
        self.config = config
        if config.pretrain is not None and config.sd_path is None:
            raise ValueError(
                "encoder.pretrain is set but encoder.sd_path is not: the in-world VAE and U-Net have not been "
                "trained or found in the cache yet (train.py does it first: lmm.towers.ensure_towers)"
            )
        if config.sd_path is not None:
            self.vae, self.unet, self.scheduler = _load_sd_folder(config)
        else:
            self.vae, self.unet, self.scheduler = _build_random_sd(config)
        check_unet_supported(self.unet)
        n_up = len(self.unet.up_blocks)
        if not 0 <= config.up_block < n_up:
            raise ValueError(f"encoder.up_block {config.up_block} is outside the U-Net's {n_up} up blocks")
        n_steps = self.scheduler.config.num_train_timesteps
        if not 0 <= config.timestep < n_steps:
            raise ValueError(f"encoder.timestep {config.timestep} is outside the scheduler's [0, {n_steps})")

        # The VAE downsamples by 2 in every block but the last; its conv has no padding correction, so a
        # side that is not a multiple would silently lose border pixels.
        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if config.image_size % vae_factor:
            raise ValueError(
                f"encoder.image_size {config.image_size} is not a multiple of the VAE's downsampling {vae_factor}"
            )
        self._latent_size = config.image_size // vae_factor
        side = unet_feature_size(self.unet, self._latent_size, config.up_block)
        self._grid = (side, side)
        self._channels = _up_block_channels(self.unet, config.up_block)

        self.clip = ClipEncoder(config.clip)
        if self.clip.grid != self._grid:
            raise ValueError(
                f"diffusion features at {config.image_size} px land on a {side}x{side} grid "
                f"(latents {self._latent_size}, up_blocks[{config.up_block}]) but the CLIP encoder's grid is "
                f"{self.clip.grid[0]}x{self.clip.grid[1]}; change encoder.image_size or encoder.clip"
            )
        cross_dim = self.unet.config.cross_attention_dim
        with seeded_init(config.init_seed):
            self.captioner = ImplicitCaptioner(self.clip.embed_dim, cross_dim, self.clip.num_tokens)

        # One noise map shared by every image keeps an image's features independent of its batch. It is a
        # non-persistent buffer: rebuilt from noise_seed, so checkpoints that drop frozen state lose nothing.
        generator = torch.Generator().manual_seed(config.noise_seed)
        shape = (1, self.vae.config.latent_channels, self._latent_size, self._latent_size)
        self.register_buffer("fixed_noise", torch.randn(shape, generator=generator), persistent=False)
        self.register_buffer("timesteps", torch.tensor([config.timestep], dtype=torch.long), persistent=False)
        self.freeze_pretrained()

    @property
    def embed_dim(self) -> int:
        return self._channels

    @property
    def grid(self) -> tuple[int, int]:
        return self._grid

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return CLIP_MEAN if self.config.pixel_norm == "clip" else (0.5, 0.5, 0.5)

    @property
    def image_std(self) -> tuple[float, float, float]:
        return CLIP_STD if self.config.pixel_norm == "clip" else (0.5, 0.5, 0.5)

    @property
    def noise(self) -> str:
        """The noise mode (``DiffusionEncoderConfig.noise``); settable on a built encoder, e.g. to validate
        a model trained with stochastic features in fixed mode."""
        return self._noise

    @noise.setter
    def noise(self, mode: str) -> None:
        if mode not in NOISE_MODES:
            raise ValueError(f"encoder.noise {mode!r} is not one of {NOISE_MODES}")
        self._noise = mode

    @property
    def stochastic(self) -> bool:
        """Whether a call now samples the posterior and the noise."""
        if self.noise == "auto":
            return self.training
        return self.noise == "stochastic"

    def frozen_modules(self) -> Iterator[nn.Module]:
        yield self.vae
        yield self.unet
        yield self.clip

    def clip_inputs(self, images: Tensor) -> Tensor:
        """SD input in [-1, 1] at ``image_size`` -> the CLIP encoder's size and normalisation.

        ``clip_resize: bicubic`` (antialiased) approximates the PIL bicubic resize CLIP's own transform would
        apply to the original image; ``bilinear`` (no antialias) is the released DiffLMM's ``sd_to_clip_img``.
        When the sizes already agree the pixels pass through unresampled.
        """
        pixels = images.float() * 0.5 + 0.5
        size = self.clip.image_size
        if pixels.shape[-1] != size or pixels.shape[-2] != size:
            if self.config.clip_resize == "bilinear":
                pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
            else:
                pixels = F.interpolate(
                    pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False
                )
        mean = pixels.new_tensor(self.clip.image_mean).view(1, 3, 1, 1)
        std = pixels.new_tensor(self.clip.image_std).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def noisy_latents(self, images: Tensor) -> Tensor:
        """VAE-encode, scale, and noise to ``timestep`` (stochastic or fixed, per ``self.stochastic``)."""
        stochastic = self.stochastic
        vae_dtype = next(self.vae.parameters()).dtype
        # Nothing trainable precedes the VAE, so its activations need no graph.
        with torch.no_grad():
            posterior = self.vae.encode(images.to(vae_dtype)).latent_dist
            latents = posterior.sample() if stochastic else posterior.mean
            latents = latents * self.vae.config.scaling_factor
        if stochastic:
            noise = torch.randn_like(latents)
        else:
            noise = self.fixed_noise.to(latents.dtype).expand_as(latents)
        timesteps = self.timesteps.expand(latents.shape[0])
        return self.scheduler.add_noise(latents, noise, timesteps)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, S, S) in [-1, 1] -> (feature map (B, C, h, w), CLIP tokens (B, h*w, D_clip))."""
        with torch.no_grad():
            clip_tokens = self.clip(self.clip_inputs(images))
        unet_dtype = next(self.unet.parameters()).dtype
        captions = self.captioner(clip_tokens.to(self.captioner.pos_embed.dtype))
        sample = self.noisy_latents(images).to(unet_dtype)
        features = unet_features(
            self.unet, sample, self.timesteps, captions.to(unet_dtype), up_block=self.config.up_block
        )
        return features, clip_tokens

    def forward(self, images: Tensor) -> Tensor:
        features, _ = self.encode(images)
        return features.flatten(2).transpose(1, 2)


def check_unet_supported(unet: nn.Module) -> None:
    """Raise a one-line error for U-Net features the truncated forward does not mirror."""
    config = unet.config
    unsupported = []
    if unet.class_embedding is not None:
        unsupported.append("class embeddings (class_embed_type / num_class_embeds)")
    if config.addition_embed_type is not None:
        unsupported.append(f"added conditioning (addition_embed_type={config.addition_embed_type!r})")
    if unet.encoder_hid_proj is not None:
        unsupported.append(f"encoder_hid_proj (encoder_hid_dim_type={config.encoder_hid_dim_type!r})")
    if getattr(unet, "position_net", None) is not None:
        unsupported.append("GLIGEN position net (attention_type='gated')")
    if not isinstance(config.cross_attention_dim, int):
        unsupported.append("per-block cross_attention_dim")
    if unsupported:
        raise ValueError(f"the diffusion encoder does not support a U-Net with {', '.join(unsupported)}")


def unet_features(
    unet: nn.Module, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, up_block: int
) -> Tensor:
    """Run ``UNet2DConditionModel`` up to and including ``up_blocks[up_block]`` and return that block's output.

    A copy of the path diffusers' ``UNet2DConditionModel.forward`` takes for an SD-1.5-style U-Net (no
    masks, adapters, ControlNet residuals, class or added embeddings: ``check_unet_supported``), in the
    same order with the same arguments, so the result equals the full forward's ``up_blocks[up_block]``
    output bit for bit.
    """
    # Sides that are not multiples of the total upsampling make diffusers pass explicit upsample sizes.
    up_factor = 2**unet.num_upsamplers
    forward_upsample_size = any(dim % up_factor != 0 for dim in sample.shape[-2:])
    upsample_size = None

    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)

    sample = unet.conv_in(sample)
    down_block_res_samples: tuple[Tensor, ...] = (sample,)
    for down_block in unet.down_blocks:
        if getattr(down_block, "has_cross_attention", False):
            sample, res_samples = down_block(
                hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states
            )
        else:
            sample, res_samples = down_block(hidden_states=sample, temb=emb)
        down_block_res_samples += res_samples

    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample = unet.mid_block(sample, emb)

    for i, block in enumerate(unet.up_blocks[: up_block + 1]):
        is_final_block = i == len(unet.up_blocks) - 1
        res_samples = down_block_res_samples[-len(block.resnets) :]
        down_block_res_samples = down_block_res_samples[: -len(block.resnets)]
        if not is_final_block and forward_upsample_size:
            upsample_size = down_block_res_samples[-1].shape[2:]
        if getattr(block, "has_cross_attention", False):
            sample = block(
                hidden_states=sample,
                temb=emb,
                res_hidden_states_tuple=res_samples,
                encoder_hidden_states=encoder_hidden_states,
                upsample_size=upsample_size,
            )
        else:
            sample = block(
                hidden_states=sample,
                temb=emb,
                res_hidden_states_tuple=res_samples,
                upsample_size=upsample_size,
            )
    return sample


def unet_feature_size(unet: nn.Module, latent_size: int, up_block: int) -> int:
    """Side of ``up_blocks[up_block]``'s output for square latents of side ``latent_size``, without running it."""
    side = latent_size
    residual_sides = [side]
    for down_block in unet.down_blocks:
        residual_sides += [side] * len(down_block.resnets)
        if down_block.downsamplers is not None:
            side = math.ceil(side / 2)  # 3x3 stride-2 conv with padding 1
            residual_sides.append(side)
    for i, block in enumerate(unet.up_blocks[: up_block + 1]):
        del residual_sides[-len(block.resnets) :]
        if block.upsamplers is not None:
            # An upsampler restores the side of the residuals the next block consumes (diffusers passes that
            # size explicitly when the sides do not halve evenly); a trailing one just doubles.
            side = residual_sides[-1] if i < len(unet.up_blocks) - 1 else side * 2
    return side


def _up_block_channels(unet: nn.Module, up_block: int) -> int:
    return list(reversed(unet.config.block_out_channels))[up_block]


def build_vae(config: DiffusionEncoderConfig) -> nn.Module:
    """A randomly initialised ``AutoencoderKL`` of SD-1.5's architecture updated by ``vae_config`` (from
    ``init_seed``): what in-world pretraining (``encoders.pretraining.vae``) trains."""
    from diffusers import AutoencoderKL

    with seeded_init(config.init_seed):
        return AutoencoderKL(**{**sd15_vae_config(), **config.vae_config})


def build_unet(config: DiffusionEncoderConfig) -> nn.Module:
    """A randomly initialised ``UNet2DConditionModel`` of SD-1.5's architecture updated by ``unet_config``."""
    from diffusers import UNet2DConditionModel

    with seeded_init(config.init_seed):
        unet = UNet2DConditionModel(**{**sd15_unet_config(), **config.unet_config})
    check_unet_supported(unet)
    return unet


def build_scheduler(config: DiffusionEncoderConfig, name: str = "ddpm") -> Any:
    """The noise scheduler of SD-1.5's schedule updated by ``scheduler_config``."""
    return _scheduler_class(name)(**{**sd15_scheduler_config(), **config.scheduler_config})


def _build_random_sd(config: DiffusionEncoderConfig) -> tuple[nn.Module, nn.Module, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with seeded_init(config.init_seed):
        vae = AutoencoderKL(**{**sd15_vae_config(), **config.vae_config})
        unet = UNet2DConditionModel(**{**sd15_unet_config(), **config.unet_config})
    scheduler = _scheduler_class(config.scheduler)(**{**sd15_scheduler_config(), **config.scheduler_config})
    return vae, unet, scheduler


def _load_sd_folder(config: DiffusionEncoderConfig) -> tuple[nn.Module, nn.Module, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = Path(config.sd_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"encoder.sd_path {folder} is not a folder")
    for component in SD_COMPONENTS:
        _check_component(folder, component, config.variant)
    if (config.unet_config or config.vae_config or config.scheduler_config) and config.pretrain is None:
        # (With ``pretrain`` they described the architecture the in-world towers in sd_path were trained with.)
        log.warning("encoder.unet_config/vae_config/scheduler_config are ignored: loading %s", folder)
    vae = AutoencoderKL.from_pretrained(
        folder, subfolder="vae", variant=config.variant, local_files_only=True
    )
    unet = UNet2DConditionModel.from_pretrained(
        folder, subfolder="unet", variant=config.variant, local_files_only=True
    )
    # SD-1.5 ships a PNDM config; add_noise only needs the beta schedule, which every scheduler reads the same.
    scheduler = _scheduler_class(config.scheduler).from_pretrained(folder, subfolder="scheduler")
    log.info("loaded Stable-Diffusion VAE, U-Net and scheduler from %s", folder)
    return vae, unet, scheduler


def _scheduler_class(name: str) -> type:
    from diffusers import DDIMScheduler, DDPMScheduler

    return {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[name]


def _check_component(folder: Path, component: str, variant: str | None) -> None:
    sub = folder / component
    if not sub.is_dir():
        raise FileNotFoundError(f"Stable-Diffusion folder {folder} has no '{component}/' subfolder")
    config_name = "scheduler_config.json" if component == "scheduler" else "config.json"
    if not (sub / config_name).is_file():
        raise FileNotFoundError(f"Stable-Diffusion folder {folder}: '{component}/' has no {config_name}")
    if component == "scheduler":
        return
    names = [
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model.bin.index.json",
    ]
    if variant is not None:
        # diffusers puts the variant before the last suffix: model.fp16.safetensors, model.safetensors.index.fp16.json
        names = [".".join([*n.split(".")[:-1], variant, n.split(".")[-1]]) for n in names]
    if not any((sub / name).is_file() for name in names):
        raise FileNotFoundError(
            f"Stable-Diffusion folder {folder}: '{component}/' has no weight file (expected {names[0]} or {names[1]})"
        )
