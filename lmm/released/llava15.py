"""Released LLaVA-1.5 checkpoints (original layout) loaded into the project's LMM, and LLaVA's preprocessing.

As released for ``liuhaotian/llava-v1.5-7b``: one Llama causal-LM folder whose ``config.json`` says
``model_type: llava`` (or ``llava_llama``, the later name), ``architectures: [LlavaLlamaForCausalLM]``, and
carries LLaVA's multimodal fields (``mm_vision_tower``, ``mm_projector_type: mlp2x_gelu``,
``mm_vision_select_layer: -2``, ``mm_vision_select_feature: patch``, ``mm_hidden_size``,
``image_aspect_ratio: pad``, ``mm_use_im_start_end: false``); its weight files (``pytorch_model-*.bin`` shards
with ``pytorch_model.bin.index.json``, or safetensors) hold the Llama weights plus ``model.mm_projector.0.*``
and ``model.mm_projector.2.*`` (and a copy of the CLIP tower, ``model.vision_tower.*``, that LLaVA itself
ignores and so do we). The tower comes from a local Hugging Face ``CLIPVisionModel`` folder. Every key is
checked before anything is loaded. ``LlavaImageTransform`` and ``tokenizer_image_token`` are LLaVA's own
image and prompt preprocessing, which ``lmm.groundable.LlavaGrounding`` uses to run a release exactly as the
reference does.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import functional as TF

from datamodules.templates import IMAGE_PLACEHOLDER
from encoders.config import ClipEncoderConfig
from encoders.transform import pad_to_square
from lmm.config import LLMConfig, ProjectorConfig, StageConfig
from lmm.llm import LLMBackbone
from lmm.model import LMM
from lmm.released.llama import load_llama, load_tokenizer
from lmm.released.weight_files import (
    CheckpointError,
    read_llava_config,
    read_weights,
    require_field,
    weight_shapes,
)

log = logging.getLogger(__name__)

#: ``model_type`` values of LLaVA's own ``LlavaConfig`` (renamed from ``llava`` to ``llava_llama`` in 2024).
LLAVA_MODEL_TYPES = ("llava", "llava_llama")
#: Where LLaVA keeps the projector's (and DiffLMM its whole SDCLIPBlock's) weights.
PROJECTOR_PREFIX = "model.mm_projector."


def local_folder(explicit: str | Path | None, from_config: Any, what: str, flag: str, folder: Path) -> Path:
    """An explicit local folder, else the config's entry when that is an existing local folder."""
    if explicit is not None:
        path = Path(explicit)
    elif isinstance(from_config, str) and Path(from_config).is_dir():
        path = Path(from_config)
    else:
        raise CheckpointError(
            f"{folder}: config.json names the {what} {from_config!r}, which is not a local folder; pass {flag}"
        )
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{what} folder {path} has no config.json")
    return path


def llava_aspect(config: Mapping[str, Any], folder: Path) -> str:
    aspect = config.get("image_aspect_ratio", "square")
    if aspect == "pad":
        return "pad"
    if aspect in (None, "square"):
        return "crop"  # LLaVA's default processing: CLIPImageProcessor's short-side resize + centre crop
    raise CheckpointError(
        f"{folder}/config.json: image_aspect_ratio {aspect!r} is not supported (pad or square)"
    )


def freeze_as_released(model: LMM, aspect: str) -> None:
    """Freeze everything and record the template and aspect the checkpoint was instruction-tuned with."""
    model.configure_stage(
        "released",
        StageConfig(
            template="vicuna_v1", aspect=aspect, llm="frozen", train_projector=False, train_encoder=False
        ),
    )


def load_llava15(
    folder: str | Path,
    clip: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> LMM:
    """A released LLaVA-1.5 folder (original layout) as the project's LMM, frozen, in eval mode.

    ``clip``: the local ``CLIPVisionModel`` folder of the tower (``openai/clip-vit-large-patch14-336`` for the
    release); default: ``mm_vision_tower`` when that is a local folder. The result gives the same logits as
    LLaVA for the same input ids and pixels (``tests/lmm/test_llava_checkpoint.py``).
    """
    folder = Path(folder)
    config = read_llava_config(folder)
    if config.get("model_type") not in LLAVA_MODEL_TYPES or "mm_vision_tower" not in config:
        raise CheckpointError(
            f"{folder}/config.json: not LLaVA's original layout (model_type {config.get('model_type')!r}, "
            "no mm_vision_tower); transformers' llava-hf folders load with grounding.hf"
        )
    projector_type = require_field(config, "mm_projector_type", folder)
    if projector_type not in ("mlp2x_gelu", "linear"):
        raise CheckpointError(
            f"{folder}/config.json: mm_projector_type {projector_type!r} is not mlp2x_gelu/linear"
        )
    if config.get("mm_use_im_start_end", False):
        raise CheckpointError(
            f"{folder}/config.json: mm_use_im_start_end true is not supported (LLaVA-1.5: false)"
        )
    feature = config.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise CheckpointError(
            f"{folder}/config.json: mm_vision_select_feature {feature!r} is not supported (patch)"
        )
    merge = config.get("mm_patch_merge_type", "flat")
    if merge != "flat":
        raise CheckpointError(f"{folder}/config.json: mm_patch_merge_type {merge!r} is not supported (flat)")
    select_layer = int(require_field(config, "mm_vision_select_layer", folder))
    mm_hidden = int(require_field(config, "mm_hidden_size", folder))
    hidden = int(require_field(config, "hidden_size", folder))
    aspect = llava_aspect(config, folder)
    clip_folder = local_folder(clip, config.get("mm_vision_tower"), "vision tower", "--clip", folder)

    projector_shapes = (
        {"model.mm_projector.weight": (hidden, mm_hidden), "model.mm_projector.bias": (hidden,)}
        if projector_type == "linear"
        else {
            "model.mm_projector.0.weight": (hidden, mm_hidden),
            "model.mm_projector.0.bias": (hidden,),
            "model.mm_projector.2.weight": (hidden, hidden),
            "model.mm_projector.2.bias": (hidden,),
        }
    )
    shapes = weight_shapes(folder)
    for key, shape in projector_shapes.items():
        if key not in shapes:
            raise CheckpointError(f"{folder}: missing projector weight {key!r} ({projector_type} layout)")
        if shapes[key][0] != shape:
            raise CheckpointError(
                f"{shapes[key][1]}: projector weight {key!r} has shape {shapes[key][0]}, expected {shape} "
                f"(hidden_size {hidden}, mm_hidden_size {mm_hidden})"
            )
    llama = load_llama(
        folder,
        config,
        dtype=dtype,
        attn_implementation=attn_implementation,
        extra=lambda key: key in projector_shapes,
    )
    backbone = LLMBackbone(
        LLMConfig(path=str(folder), attn_implementation=attn_implementation),
        model=llama,
        tokenizer=load_tokenizer(folder, config),
    )
    encoder = ClipEncoderConfig(model="hf", weights=str(clip_folder), select_layer=select_layer)
    model = LMM(encoder, ProjectorConfig(name=projector_type), backbone.config, llm_backbone=backbone)
    if model.encoder.embed_dim != mm_hidden:
        raise CheckpointError(
            f"{folder}/config.json: mm_hidden_size {mm_hidden} but the tower {clip_folder} is {model.encoder.embed_dim} wide"
        )
    weights = read_weights(folder, list(projector_shapes))
    # model.mm_projector.0.weight -> mlp.0.weight (mlp2x_gelu); model.mm_projector.weight -> mlp.weight (linear)
    state = {f"mlp.{key.removeprefix(PROJECTOR_PREFIX)}": value.float() for key, value in weights.items()}
    model.projector.load_state_dict(state, strict=True)
    freeze_as_released(model, aspect)
    model.source = {"format": "llava-1.5", "weights": str(folder), "clip": str(clip_folder)}
    log.info("loaded LLaVA-1.5 checkpoint %s (tower %s, aspect %s)", folder, clip_folder, aspect)
    return model.to(device=device, dtype=dtype).eval()


@dataclasses.dataclass(frozen=True)
class LlavaImageTransform:
    """LLaVA's ``process_images``: ``pad`` = ``expand2square`` with ``int(255 * mean)`` (LLaVA truncates where
    the project's transform rounds), then CLIPImageProcessor's bicubic resize; ``crop`` = short-side resize to
    ``size`` (long side ``int(size * long / short)``) and a centre crop at ``(H - size) // 2``."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    aspect: str = "pad"

    def __call__(self, image: Image.Image) -> Tensor:
        image = image.convert("RGB")
        if self.aspect == "pad":
            image = pad_to_square(image, tuple(int(255 * m) for m in self.mean))
            image = image.resize((self.size, self.size), Image.BICUBIC)
        elif self.aspect == "crop":
            width, height = image.size
            short, long = min(width, height), max(width, height)
            new_long = int(self.size * long / short)
            new = (self.size, new_long) if width <= height else (new_long, self.size)
            image = image.resize(new, Image.BICUBIC)
            left, top = (new[0] - self.size) // 2, (new[1] - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        else:
            raise ValueError(f"aspect {self.aspect!r} is not pad or crop")
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)


def tokenizer_image_token(prompt: str, tokenizer: Any, image_ids: Sequence[int]) -> list[int]:
    """LLaVA's ``tokenizer_image_token`` with ``image_ids`` in place of its ``-200`` marker.

    The prompt is split at ``<image>`` and each chunk tokenised on its own (BOS added); the first chunk keeps
    its BOS and every later chunk loses its first token, exactly as LLaVA does.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids: list[int] = chunks[0][:offset] if offset else []
    for i, chunk in enumerate(chunks):
        if i:
            ids.extend(image_ids)
        ids.extend(chunk[offset:])
    return ids
