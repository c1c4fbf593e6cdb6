"""The frozen CLIP vision encoder: patch tokens of a chosen (by default the penultimate) transformer layer.

Three back-ends behind one module. ``open_clip``: any ViT that open_clip knows by name (``ViT-L-14-336`` for
LLaVA-1.5), optionally resized by config for tiny test and default models, with weights from a local
open_clip/OpenAI checkpoint file (a state dict in ``.bin``/``.pt``/``.safetensors``, or OpenAI's TorchScript
archive). ``hf``: a local Hugging Face ``CLIPVisionModel`` folder (how LLaVA checkpoints name their tower).
Either way the output is the patch tokens of layer ``select_layer`` (CLS dropped, no final norm), computed
without running the layers above it, as LLaVA does with ``hidden_states[-2][:, 1:]``. ``convnet``: the
shapes world's convolutional tower (``encoders.conv_tower``), whose tokens are its last stage's cells.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from encoders.base import VisualEncoder, seeded_init
from encoders.config import ClipEncoderConfig
from encoders.transform import CLIP_MEAN, CLIP_STD

log = logging.getLogger(__name__)


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ClipEncoder(VisualEncoder):
    Config = ClipEncoderConfig

    def __init__(self, config: ClipEncoderConfig) -> None:
        super().__init__()
        self.config = config
        if config.pretrain is not None and config.weights is None:
            raise ValueError(
                "encoder.pretrain is set but encoder.weights is not: the in-world tower has not been trained "
                "or found in the cache yet (train.py does it first: lmm.towers.ensure_towers)"
            )
        if config.model == "hf":
            self.backend = "hf"
            self.tower, self._image_size, self._patch_size, self._width, self._mean, self._std = (
                _load_hf_tower(config)
            )
        else:  # open_clip's ViT or the convnet, which keeps open_clip's image_size and patch_size pairs
            self.backend = "convnet" if config.model == "convnet" else "open_clip"
            self.tower = _build_tower(config)
            self._image_size = self.tower.image_size[0]
            self._patch_size = self.tower.patch_size[0]
            self._width = self.tower.width if self.backend == "convnet" else self.tower.conv1.out_channels
            self._mean, self._std = CLIP_MEAN, CLIP_STD
        self.freeze_pretrained()

    @property
    def embed_dim(self) -> int:
        return self._width

    @property
    def grid(self) -> tuple[int, int]:
        side = self._image_size // self._patch_size
        return side, side

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return self._mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        return self._std

    def frozen_modules(self) -> Iterator[nn.Module]:
        yield self.tower

    def token_mixing(self, images: Tensor) -> Tensor | None:
        if self.backend != "convnet":
            return None  # a ViT's tokens mix by attention, which no fixed matrix describes
        return self.tower.token_mixing(images.float())  # weights only, in float32 whatever the tower's dtype

    def forward(self, images: Tensor) -> Tensor:
        images = images.to(dtype=next(self.tower.parameters()).dtype)
        if self.backend == "hf":
            # The HF tower was truncated at load time, so its last hidden state is the selected layer.
            hidden = self.tower(pixel_values=images, output_hidden_states=False).last_hidden_state
            return hidden[:, 1:]
        if self.backend == "convnet":
            return self.tower.forward_tokens(images)
        n_layers = len(self.tower.transformer.resblocks)
        block = (
            n_layers + self.config.select_layer if self.config.select_layer < 0 else self.config.select_layer
        )
        out = self.tower.forward_intermediates(
            images, indices=[block], stop_early=True, intermediates_only=True, output_fmt="NLC"
        )
        return out["image_intermediates"][0]


def build_vision_tower(config: ClipEncoderConfig) -> nn.Module:
    """The open_clip ``VisionTransformer`` (or ``ConvTower``) the encoder runs, randomly initialised from
    ``init_seed`` (``weights`` ignored): what in-world pretraining (``encoders.pretraining.contrastive``) trains."""
    return _build_tower(dataclasses.replace(config, weights=None))


def _build_tower(config: ClipEncoderConfig) -> nn.Module:
    """The open_clip ViT or the convnet of ``config``, with ``config.weights`` loaded when set."""
    tower = _build_conv_tower(config) if config.model == "convnet" else _build_open_clip_tower(config)
    if config.weights is not None:
        _load_visual_weights(tower, config)
    return tower


def _output_dim(config: ClipEncoderConfig, default: int) -> int:
    # An in-world pretrained tower keeps its contrastive projection, of the recipe's width.
    return config.pretrain.embed_dim if config.pretrain is not None else default


def _build_conv_tower(config: ClipEncoderConfig) -> nn.Module:
    from encoders.conv_tower import ConvTower

    with seeded_init(config.init_seed):
        return ConvTower(
            config.image_size,
            config.conv_channels,
            config.width,
            _output_dim(config, config.width),
            config.conv_depths,
            config.smoothing_steps,
            config.smoothing_sigma,
        )


def _build_open_clip_tower(config: ClipEncoderConfig) -> nn.Module:
    import open_clip
    from open_clip.transformer import LayerNorm, VisionTransformer

    arch = open_clip.get_model_config(config.model)
    if arch is None:
        raise ValueError(
            f"encoder.model {config.model!r} is not an open_clip architecture; "
            f"expected one of open_clip.list_models() (e.g. ViT-L-14-336), 'hf' or 'convnet'"
        )
    vision = dict(arch["vision_cfg"])
    for key in ("image_size", "patch_size", "width", "layers", "head_width"):
        if getattr(config, key) is not None:
            vision[key] = getattr(config, key)
    if not isinstance(vision.get("layers"), int) or "timm_model_name" in vision:
        raise ValueError(f"encoder.model {config.model!r}: only plain open_clip ViTs are supported")
    n_layers = vision["layers"]
    if not -n_layers <= config.select_layer < n_layers:
        raise ValueError(f"encoder.select_layer {config.select_layer} is outside a {n_layers}-layer ViT")
    width = vision["width"]
    with seeded_init(config.init_seed):
        return VisionTransformer(
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            width=width,
            layers=n_layers,
            heads=width // vision.get("head_width", 64),
            mlp_ratio=vision.get("mlp_ratio", 4.0),
            output_dim=_output_dim(config, arch["embed_dim"]),
            act_layer=QuickGELU if config.quick_gelu else nn.GELU,
            norm_layer=LayerNorm,
            pool_type=config.pool_type,
            pos_embed_type=config.pos_embed_type,
        )


def _load_visual_weights(tower: nn.Module, config: ClipEncoderConfig) -> None:
    state = _read_open_clip_state(Path(config.weights))
    visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise ValueError(
            f"{config.weights}: no 'visual.*' keys; expected an open_clip or OpenAI CLIP checkpoint"
        )
    own = tower.state_dict()
    wrong = [k for k, v in visual.items() if k in own and v.shape != own[k].shape]
    if wrong:
        key = wrong[0]
        raise ValueError(
            f"{config.weights}: does not match {config.model}: {key} has shape {list(visual[key].shape)}, "
            f"expected {list(own[key].shape)} ({len(wrong)} tensors differ)"
        )
    missing, unexpected = tower.load_state_dict(visual, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{config.weights}: does not match {config.model} "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    log.info("loaded CLIP vision weights from %s", config.weights)


def _read_open_clip_state(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weight file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if zipfile.is_zipfile(path) and any(
        n.split("/", 1)[-1].startswith("code/") for n in zipfile.ZipFile(path).namelist()
    ):
        # OpenAI's released .pt files are TorchScript archives. Loading one deserialises tensors and
        # TorchScript code (not arbitrary pickled Python); we only read its state dict and never call it.
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_hf_tower(config: ClipEncoderConfig) -> tuple[nn.Module, int, int, int, tuple, tuple]:
    from transformers import CLIPVisionModel

    if config.weights is None:
        raise ValueError("encoder.model 'hf' needs encoder.weights: a local CLIPVisionModel folder")
    folder = Path(config.weights)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json)")
    tower = CLIPVisionModel.from_pretrained(folder)
    # transformers 5 puts the encoder on the model itself; 4.x nested it under ``vision_model``.
    encoder = getattr(tower, "vision_model", tower).encoder
    layers = encoder.layers
    n_layers = len(layers)
    # hidden_states has n_layers + 1 entries (embeddings first): index k is the output of k layers.
    keep = n_layers + 1 + config.select_layer if config.select_layer < 0 else config.select_layer
    if not 1 <= keep <= n_layers:
        raise ValueError(f"encoder.select_layer {config.select_layer} is outside a {n_layers}-layer ViT")
    encoder.layers = layers[:keep]
    vcfg = tower.config
    mean, std = CLIP_MEAN, CLIP_STD
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        pcfg = json.loads(processor.read_text())
        mean = tuple(pcfg.get("image_mean", mean))
        std = tuple(pcfg.get("image_std", std))
    return tower, vcfg.image_size, vcfg.patch_size, vcfg.hidden_size, mean, std
