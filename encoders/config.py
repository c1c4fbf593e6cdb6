"""The schema of the ``encoder:`` config section: one dataclass per encoder, standard library only.

The config loader picks the dataclass by the section's ``name`` from ``ENCODER_CONFIGS`` without importing
any encoder implementation (torch, diffusers, open_clip), so a config is checked in milliseconds. Each
implementation imports its dataclass from here and declares it as its ``Config``; ``encoders.registry``
keeps the two registries in step. Choice fields are ``Literal`` types, which the loader enforces;
``__post_init__`` checks ranges and raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

#: How an image is fitted to the encoder's square. ``crop``: resize the short side, centre-crop (LLaVA
#: pretraining). ``pad``: pad to a square with the mean colour, then resize (LLaVA-1.5 instruction
#: tuning). ``resize``: squash to a square.
Aspect = Literal["crop", "pad", "resize"]
ASPECT_MODES: tuple[str, ...] = get_args(Aspect)

NoiseMode = Literal["auto", "stochastic", "fixed"]
SchedulerName = Literal["ddpm", "ddim"]
#: How the diffusion encoder resizes its SD input to the CLIP tower's size for the implicit captioner.
#: ``bicubic``: antialiased bicubic, close to CLIP's own transform of the original image (models trained
#: here). ``bilinear``: no antialiasing, as the released DiffLMM's ``sd_to_clip_img`` does.
ClipResize = Literal["bicubic", "bilinear"]
#: Pixel normalisation of the diffusion encoder's input (what the VAE sees): ``sd`` = Stable Diffusion's
#: [-1, 1] (mean/std 0.5, padding colour 127); ``clip`` = CLIP's mean/std (padding colour 122, 116, 104), what
#: DiffLMM's released weights were trained on (its SD tower passed mean=/std= to CLIPImageProcessor, which
#: ignores those keywords and keeps CLIP's).
PixelNorm = Literal["sd", "clip"]
PoolType = Literal["tok", "avg"]
PosEmbedType = Literal["learnable", "sin_cos_2d"]


def _positive(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


@dataclasses.dataclass
class TextTowerConfig:
    """The text tower beside a contrastively pretrained CLIP: open_clip's ``TextTransformer`` at this size,
    over open_clip's own BPE tokenizer (49408 tokens, works offline). Its per-token outputs also condition
    the in-world U-Net (``DiffusionPretrainConfig``), as CLIP's text encoder conditions Stable Diffusion."""

    context_length: int = 32
    width: int = 64
    heads: int = 2
    layers: int = 2

    def __post_init__(self) -> None:
        _positive(self, "context_length", "width", "heads", "layers")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")


@dataclasses.dataclass
class ClipPretrainConfig:
    """In-world contrastive pretraining of a CLIP vision tower (``encoder.pretrain``).

    The tower (the encoder's own architecture, initialised from its ``init_seed``) and a text tower learn
    the world's image-caption pairs with open_clip's ``ClipLoss``; the vision tower is then cached (keyed by
    a hash of the architecture, this recipe and the data) and loaded frozen by every run that names the same
    recipe. ``train.py`` trains it when the cache has no entry for it.
    """

    text: TextTowerConfig = dataclasses.field(default_factory=TextTowerConfig)
    #: Width of the joint image-text space (the towers' projections); also the vision tower's ``proj``.
    embed_dim: int = 128
    steps: int = 400
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    #: How images are fitted to the tower's square while it learns (as the LMM stages do: ``Aspect``).
    aspect: Aspect = "pad"
    #: Seed of the data order (the tower's initialisation comes from the encoder's ``init_seed``).
    seed: int = 0
    #: No caption twice in a batch (``datamodules.captions.DistinctCaptionBatches``): a repeated caption would
    #: be scored as a wrong match of its own image. Needs at least ``batch_size`` different captions.
    distinct_captions: bool = True

    def __post_init__(self) -> None:
        _positive(self, "embed_dim", "steps", "batch_size", "lr")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


def default_conv_depths(stages: int) -> tuple[int, ...]:
    """The convnet tower's default layout: one stride-1 conv after every stage's stride-2 conv but the last's."""
    return (1,) * (stages - 1) + (0,)


@dataclasses.dataclass
class ClipEncoderConfig:
    """Schema of ``encoder:`` when ``name: clip``. Size fields left at None keep the named architecture's."""

    name: str = "clip"
    #: open_clip architecture name (``ViT-L-14-336``), ``hf`` to load ``weights`` as a CLIPVisionModel folder, or
    #: ``convnet``: the small convolutional tower of ``encoders.conv_tower`` (local tokens), sized by
    #: ``image_size``, ``conv_channels`` and ``width``; its tokens are its last stage's, whatever ``select_layer``.
    model: str = "ViT-L-14-336"
    #: Local weight file (open_clip/OpenAI) or HF folder; None = random initialisation from ``init_seed``.
    weights: str | None = None
    select_layer: int = -2
    quick_gelu: bool = True  # OpenAI's CLIP was trained with QuickGELU; open_clip's LAION weights use GELU
    image_size: int | None = None
    patch_size: int | None = None
    width: int | None = None
    layers: int | None = None
    head_width: int | None = None
    #: How the tower pools its tokens into the image embedding (open_clip's ``pool_type``): ``tok`` = the CLS
    #: token (CLIP's); ``avg`` = the mean of the patch tokens, so contrastive pretraining writes what a caption
    #: says into the tokens of the object it names. Only the embedding (never the LMM's tokens) depends on it.
    pool_type: PoolType = "tok"
    #: open_clip's ``pos_embed_type``: ``learnable`` (CLIP's) or ``sin_cos_2d``, a fixed 2-D sine-cosine
    #: embedding of unit amplitude that contrastive pretraining cannot wash out, so every token keeps saying
    #: where it is (captions rarely need it, answers to "where is ...?" do).
    pos_embed_type: PosEmbedType = "learnable"
    #: ``convnet`` only: the stem's width, then each stride-2 stage's before the last (which has ``width``); the
    #: tower's stride, ``patch_size``, is 2 to the number of entries.
    conv_channels: tuple[int, ...] = (16, 32, 64)
    #: ``convnet`` only: how many stride-1 3x3 convs follow each stage's stride-2 conv, one count per entry of
    #: ``conv_channels``; None = one in every stage but the last (receptive field 29 px with three stages).
    conv_depths: tuple[int, ...] | None = None
    #: ``convnet`` only: rounds of colour-guided smoothing of the tokens the LMM reads (0 = none): each round
    #: averages every token with its 3 x 3 neighbours, weighted by ``exp(-d^2 / 2 sigma^2)`` with ``d`` the
    #: distance of their cells' mean colours, so a shape's tokens share what its outline shows and the background
    #: does not (``encoders.token_smoothing``). Not applied to the contrastive embedding: a cached tower serves
    #: every setting. The fused encoder smooths its U-Net half with the same weights; the diffusion encoder alone
    #: only feeds the smoothed tokens to its captioner.
    smoothing_steps: int = 0
    smoothing_sigma: float = 0.3
    init_seed: int = 0
    #: Pretrain the tower in-world (contrastively, cached) instead of loading ``weights`` or keeping a random
    #: one. ``train.py`` fills ``weights`` with the cached file, so the run's config.yaml names it.
    pretrain: ClipPretrainConfig | None = None

    def __post_init__(self) -> None:
        _positive(self, "image_size", "patch_size", "width", "layers", "head_width")
        if self.pretrain is not None and self.model == "hf":
            raise ValueError("pretrain needs an open_clip architecture (model), not 'hf'")
        if self.pool_type != "tok" and self.model == "hf":
            raise ValueError("pool_type applies to open_clip architectures (model), not 'hf'")
        if self.pos_embed_type != "learnable" and self.model == "hf":
            raise ValueError("pos_embed_type applies to open_clip architectures (model), not 'hf'")
        if self.model == "convnet":
            self._check_convnet()
        elif self.conv_depths is not None:
            raise ValueError(f"conv_depths applies to model 'convnet', not {self.model!r}")
        elif self.smoothing_steps:
            raise ValueError(
                f"smoothing_steps applies to model 'convnet', not {self.model!r} (its tokens already hold their "
                "positions, which smoothing would blur)"
            )
        if self.image_size is not None and self.patch_size is not None and self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.width is not None and self.head_width is not None and self.width % self.head_width:
            raise ValueError(f"width {self.width} is not a multiple of head_width {self.head_width}")

    def _check_convnet(self) -> None:
        missing = [name for name in ("image_size", "width") if getattr(self, name) is None]
        if missing:
            raise ValueError(
                f"model 'convnet' needs {' and '.join(missing)} (there is no named architecture)"
            )
        vit_only = [name for name in ("layers", "head_width") if getattr(self, name) is not None]
        if vit_only:
            raise ValueError(
                f"{', '.join(vit_only)}: ViT sizes; model 'convnet' is sized by conv_channels and width"
            )
        if self.smoothing_steps < 0:
            raise ValueError(f"smoothing_steps must be >= 0, got {self.smoothing_steps}")
        if self.smoothing_sigma <= 0:
            raise ValueError(f"smoothing_sigma must be > 0, got {self.smoothing_sigma}")
        if not self.conv_channels or min(self.conv_channels) <= 0:
            raise ValueError(f"conv_channels must be positive widths, got {list(self.conv_channels)}")
        if self.conv_depths is not None and (
            len(self.conv_depths) != len(self.conv_channels) or min(self.conv_depths) < 0
        ):
            raise ValueError(
                f"conv_depths {list(self.conv_depths)}: one count >= 0 per entry of conv_channels "
                f"({len(self.conv_channels)})"
            )
        stride = 2 ** len(self.conv_channels)
        if self.patch_size is not None and self.patch_size != stride:
            raise ValueError(
                f"patch_size {self.patch_size}: a convnet with {len(self.conv_channels)} conv_channels has stride "
                f"{stride} (leave patch_size unset or make them agree)"
            )
        if self.image_size % stride:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of the convnet's stride {stride}"
            )
        if self.pool_type != "avg":
            raise ValueError(
                "model 'convnet' has no CLS token: its embedding is the mean token (pool_type: avg)"
            )
        if self.pos_embed_type != "sin_cos_2d":
            raise ValueError(
                "model 'convnet' adds fixed positions to its tokens (pos_embed_type: sin_cos_2d): nothing would "
                "train a learnable table, since its pooled embedding is a mean over positions"
            )


@dataclasses.dataclass
class VaePretrainConfig:
    """In-world training of the diffusion encoder's VAE: reconstruction (L1 + MSE) plus a small KL term."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-6
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "lr")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")


@dataclasses.dataclass
class UnetPretrainConfig:
    """In-world training of the U-Net: DDPM's noise-prediction loss on the frozen VAE's latents, conditioned
    on the captions' text-tower tokens (the CLIP recipe's text tower), so its cross-attention learns to read
    what the caption says is where."""

    steps: int = 400
    batch_size: int = 32
    lr: float = 5e-4
    #: Fraction of captions replaced by the empty caption (as Stable Diffusion trains for guidance).
    uncond_prob: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "lr")
        if not 0.0 <= self.uncond_prob < 1.0:
            raise ValueError(f"uncond_prob must be in [0, 1), got {self.uncond_prob}")


@dataclasses.dataclass
class DiffusionPretrainConfig:
    """In-world pretraining of the diffusion encoder's VAE and U-Net (``encoder.pretrain``), each cached
    like the CLIP tower; ``train.py`` fills ``sd_path`` with the cached Stable-Diffusion-layout folder."""

    vae: VaePretrainConfig = dataclasses.field(default_factory=VaePretrainConfig)
    unet: UnetPretrainConfig = dataclasses.field(default_factory=UnetPretrainConfig)
    #: How images are fitted to the encoder's square while the towers learn (``Aspect``).
    aspect: Aspect = "pad"


@dataclasses.dataclass
class DiffusionEncoderConfig:
    """Schema of ``encoder:`` when ``name: diffusion``.

    ``sd_path`` names a local diffusers folder in the SD layout; without it the VAE, U-Net and scheduler
    are SD-1.5's architecture updated by ``vae_config`` / ``unet_config`` / ``scheduler_config`` (any
    constructor argument of the diffusers class) and randomly initialised from ``init_seed``. ``clip`` is
    the frozen CLIP encoder whose patch tokens feed the captioner; its grid must equal the feature grid.
    """

    name: str = "diffusion"
    #: Local Stable-Diffusion folder with unet/, vae/ and scheduler/ subfolders; None = random init.
    sd_path: str | None = None
    #: Weight-file variant to load from sd_path (e.g. ``fp16`` for diffusion_pytorch_model.fp16.safetensors).
    variant: str | None = None
    #: Scheduler class used for ``add_noise`` (only the noise schedule of scheduler/ matters).
    scheduler: SchedulerName = "ddpm"
    #: Side of the square input image in pixels (the SD input, in [-1, 1]).
    image_size: int = 384
    #: Diffusion timestep of the one noising step.
    timestep: int = 100
    #: Index of the U-Net up block whose output is the feature map; the U-Net is not run past it.
    up_block: int = 1
    #: auto (stochastic while training, fixed in eval) | stochastic | fixed.
    noise: NoiseMode = "auto"
    #: Seed of the fixed noise map (``fixed`` mode); it is rebuilt from here, never checkpointed.
    noise_seed: int = 0
    #: Seed of the random initialisation (frozen SD parts when sd_path is None, and the captioner).
    init_seed: int = 0
    #: Resampling of the SD input to the CLIP tower's size for the captioner (see ``ClipResize``).
    clip_resize: ClipResize = "bicubic"
    #: Input normalisation (see ``PixelNorm``): sd for models trained here, clip for the released DiffLMM. The
    #: VAE encodes the transformed image as is; the CLIP branch always maps it back with x * 0.5 + 0.5 before
    #: CLIP's normalisation, as the release's sd_to_clip_img does (under clip: what DiffLMM saw).
    pixel_norm: PixelNorm = "sd"
    unet_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    vae_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    scheduler_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    clip: ClipEncoderConfig = dataclasses.field(default_factory=ClipEncoderConfig)
    #: Pretrain the VAE and U-Net (of ``vae_config`` / ``unet_config``) in-world, cached, instead of
    #: loading ``sd_path`` or keeping random ones; needs ``clip.pretrain`` (its text tower conditions the U-Net).
    pretrain: DiffusionPretrainConfig | None = None

    def __post_init__(self) -> None:
        _positive(self, "image_size")
        if self.timestep < 0:
            raise ValueError(f"timestep must be >= 0, got {self.timestep}")
        if self.up_block < 0:
            raise ValueError(f"up_block must be >= 0, got {self.up_block}")
        if self.pretrain is not None:
            if self.clip.pretrain is None:
                raise ValueError(
                    "pretrain needs clip.pretrain: the U-Net learns from the CLIP recipe's text tower"
                )
            cross = self.unet_config.get("cross_attention_dim", 768)
            text_width = self.clip.pretrain.text.width
            if cross != text_width:
                raise ValueError(
                    f"pretrain conditions the U-Net on the text tower's tokens: unet_config.cross_attention_dim "
                    f"({cross}) must equal clip.pretrain.text.width ({text_width})"
                )


@dataclasses.dataclass
class FusedEncoderConfig(DiffusionEncoderConfig):
    """Schema of ``encoder:`` when ``name: fused``: the diffusion encoder's fields plus ``dm_dim``."""

    name: str = "fused"
    #: Width the diffusion features are reduced to before the concatenation; DiffLMM: LLM width / 4.
    dm_dim: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "dm_dim")


#: Registry name -> schema of the built-in encoders (``encoders.registry.register_encoder`` adds others).
ENCODER_CONFIGS: dict[str, type] = {
    "clip": ClipEncoderConfig,
    "diffusion": DiffusionEncoderConfig,
    "fused": FusedEncoderConfig,
}


def encoder_config_class(name: str) -> type:
    """The schema dataclass of encoder ``name``, with a one-line error listing the known names."""
    try:
        return ENCODER_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; expected one of {sorted(ENCODER_CONFIGS)}") from None
