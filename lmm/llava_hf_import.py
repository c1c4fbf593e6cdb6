"""A transformers LLaVA folder (llava-hf format) as the initial weights of the project's LMM.

``load_llava_hf_into_lmm(folder, unpack_dir)`` reads a ``LlavaForConditionalGeneration`` folder (llava-hf's
releases, or one written by ``lmm.export``) and unpacks it into the two local folders the project's config
already knows how to load, so a run started from it can be rebuilt from its config like any other run
(frozen weights are never checkpointed; they are reloaded from these folders):

- ``<unpack_dir>/clip``: the vision tower as a ``CLIPVisionModel`` with a ``preprocessor_config.json``
  (mean and std) -> ``encoder: {name: clip, model: hf, weights: <unpack_dir>/clip, select_layer: L}`` with
  ``L`` = the folder's ``vision_feature_layer``;
- ``<unpack_dir>/llm``: the language model as a causal-LM folder with the tokenizer (``<image>`` included)
  -> ``llm: {path: <unpack_dir>/llm}``;

and returns those configs with the projector's weights (``mlp2x_gelu``) and the image aspect the folder's
processor applies (``pad`` when it pads to a square first). ``lmm_from_llava_hf`` builds the LMM from them.
What the project's LMM cannot represent is refused with a one-line message: the CLS feature kept
(``vision_feature_select_strategy: full``), several feature layers, a projector other than Linear -> GELU ->
Linear with biases, a vision tower that is not CLIP.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from encoders.config import ClipEncoderConfig
from lmm.config import LLMConfig, ProjectorConfig
from lmm.model import LMM

log = logging.getLogger(__name__)

#: Written last into ``unpack_dir``: which folder was unpacked there (a rerun with the same source reuses it).
UNPACKED_MARKER = "unpacked_from.json"
#: The projector's weights, beside the unpacked folders (``Projector`` keys).
PROJECTOR_FILE = "projector.safetensors"


class LlavaHfError(ValueError):
    """A folder that is not a llava-hf LLaVA the project's LMM can represent; one line naming why."""


@dataclasses.dataclass
class LlavaHfParts:
    """The configs that rebuild a llava-hf model in the project, and the projector's weights."""

    encoder: ClipEncoderConfig
    projector: ProjectorConfig
    projector_state: dict[str, Tensor]  # keys of ``lmm.projector.Projector`` (``mlp.0.weight``, ...)
    llm: LLMConfig
    aspect: str  # what the folder's image processor does: pad, crop or resize
    image_token_id: int


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise LlavaHfError(f"{folder}: no config.json (expected a transformers LLaVA folder)")
    config = json.loads(path.read_text(encoding="utf-8"))
    if "mm_vision_tower" in config:
        raise LlavaHfError(
            f"{folder}: LLaVA's original layout (mm_vision_tower); load it with lmm.released.llava15"
        )
    if config.get("model_type") != "llava":
        raise LlavaHfError(
            f"{folder}: model_type {config.get('model_type')!r} is not 'llava' (LlavaForConditionalGeneration)"
        )
    return config


def _check_representable(config: Any, folder: Path) -> int:
    """The vision feature layer, after checking everything else maps onto the project's LMM."""
    if config.vision_config.model_type not in ("clip_vision_model", "clip"):
        raise LlavaHfError(f"{folder}: vision tower {config.vision_config.model_type!r} is not CLIP")
    if config.vision_feature_select_strategy != "default":
        raise LlavaHfError(
            f"{folder}: vision_feature_select_strategy {config.vision_feature_select_strategy!r} keeps the CLS "
            "feature; the project's CLIP encoder drops it ('default')"
        )
    if not isinstance(config.vision_feature_layer, int):
        raise LlavaHfError(
            f"{folder}: several vision_feature_layer values {config.vision_feature_layer}; one is supported"
        )
    if config.projector_hidden_act != "gelu" or not config.multimodal_projector_bias:
        raise LlavaHfError(
            f"{folder}: projector ({config.projector_hidden_act}, bias {config.multimodal_projector_bias}) is not "
            "mlp2x_gelu (Linear -> exact GELU -> Linear, with biases)"
        )
    return int(config.vision_feature_layer)


def _aspect(image_processor: Any) -> str:
    if getattr(image_processor, "do_pad", False):
        return "pad"
    if getattr(image_processor, "do_center_crop", False):
        return "crop"
    return "resize"


def _same_source(unpack_dir: Path, folder: Path) -> bool:
    marker = unpack_dir / UNPACKED_MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text(encoding="utf-8")).get("source") == str(folder.resolve())


@torch.no_grad()
def load_llava_hf_into_lmm(folder: str | Path, unpack_dir: str | Path) -> LlavaHfParts:
    """Unpack a llava-hf folder into ``unpack_dir/{clip,llm}`` (once) and return the configs; see the module."""
    from transformers import (
        AutoModelForCausalLM,
        AutoProcessor,
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    folder, unpack_dir = Path(folder), Path(unpack_dir)
    _read_config(folder)
    config = LlavaConfig.from_pretrained(folder)
    layer = _check_representable(config, folder)
    processor = AutoProcessor.from_pretrained(folder)
    image_processor = processor.image_processor
    if processor.image_token != "<image>":
        raise LlavaHfError(
            f"{folder}: image token {processor.image_token!r}; the project's templates use '<image>'"
        )
    if processor.tokenizer.convert_tokens_to_ids("<image>") != config.image_token_id:
        raise LlavaHfError(
            f"{folder}: the tokenizer's <image> id {processor.tokenizer.convert_tokens_to_ids('<image>')} is not "
            f"config.json's image_token_index {config.image_token_id}"
        )
    clip_dir, llm_dir = unpack_dir / "clip", unpack_dir / "llm"
    llava = LlavaForConditionalGeneration.from_pretrained(folder, dtype="auto")
    projector = llava.model.multi_modal_projector
    projector_state = {
        "mlp.0.weight": projector.linear_1.weight.detach().float().clone(),
        "mlp.0.bias": projector.linear_1.bias.detach().float().clone(),
        "mlp.2.weight": projector.linear_2.weight.detach().float().clone(),
        "mlp.2.bias": projector.linear_2.bias.detach().float().clone(),
    }
    if not _same_source(unpack_dir, folder):
        clip_dir.mkdir(parents=True, exist_ok=True)
        llm_dir.mkdir(parents=True, exist_ok=True)
        llava.model.vision_tower.save_pretrained(clip_dir)
        CLIPImageProcessor(
            image_mean=list(image_processor.image_mean), image_std=list(image_processor.image_std)
        ).save_pretrained(clip_dir)
        with torch.device("meta"):
            causal = AutoModelForCausalLM.from_config(config.text_config)
        base_prefix = causal.base_model_prefix
        state = {f"{base_prefix}.{k}": v for k, v in llava.model.language_model.state_dict().items()}
        if not config.text_config.tie_word_embeddings:
            state["lm_head.weight"] = llava.lm_head.weight
        causal.load_state_dict(state, strict=not config.text_config.tie_word_embeddings, assign=True)
        if config.text_config.tie_word_embeddings:
            causal.tie_weights()
        causal.generation_config = llava.generation_config
        causal.save_pretrained(llm_dir)
        processor.tokenizer.save_pretrained(llm_dir)
        save_file(projector_state, str(unpack_dir / PROJECTOR_FILE))
        (unpack_dir / UNPACKED_MARKER).write_text(
            json.dumps({"source": str(folder.resolve())}), encoding="utf-8"
        )
        log.info("unpacked %s into %s", folder, unpack_dir)
    del llava
    return LlavaHfParts(
        encoder=ClipEncoderConfig(model="hf", weights=str(clip_dir), select_layer=layer),
        projector=ProjectorConfig(name="mlp2x_gelu"),
        projector_state=projector_state,
        llm=LLMConfig(path=str(llm_dir)),
        aspect=_aspect(image_processor),
        image_token_id=int(config.image_token_id),
    )


def lmm_from_llava_hf(folder: str | Path, unpack_dir: str | Path) -> LMM:
    """The project's LMM with a llava-hf folder's weights (not yet configured for a stage)."""
    parts = load_llava_hf_into_lmm(folder, unpack_dir)
    model = LMM(parts.encoder, parts.projector, parts.llm)
    model.projector.load_state_dict(parts.projector_state, strict=True)
    if model.llm.image_token_id != parts.image_token_id:
        raise LlavaHfError(f"{unpack_dir}/llm: the tokenizer's <image> id is not {parts.image_token_id}")
    return model
