"""Released LLaVA-1.5 and DiffLMM checkpoints, in their own layouts, loaded into the project's LMM.

**LLaVA-1.5** (as released for ``liuhaotian/llava-v1.5-7b``): one Llama causal-LM folder whose ``config.json``
says ``model_type: llava`` (or ``llava_llama``, the later name), ``architectures: [LlavaLlamaForCausalLM]``,
and carries LLaVA's multimodal fields (``mm_vision_tower``, ``mm_projector_type: mlp2x_gelu``,
``mm_vision_select_layer: -2``, ``mm_vision_select_feature: patch``, ``mm_hidden_size``,
``image_aspect_ratio: pad``, ``mm_use_im_start_end: false``); its weight files (``pytorch_model-*.bin`` shards
with ``pytorch_model.bin.index.json``, or safetensors) hold the Llama weights plus ``model.mm_projector.0.*``
and ``model.mm_projector.2.*`` (and a copy of the CLIP tower, ``model.vision_tower.*``, that LLaVA itself
ignores and so do we). The tower comes from a local Hugging Face ``CLIPVisionModel`` folder. **DiffLMM** (as
released for ``Shengcao1006/difflmm-llava-v1.5-7b-lora``): a LoRA run folder with ``config.json`` (the
``SDCLIPBlock`` projector and ``mm_vision_sd_*`` fields), a peft adapter (``adapter_config.json`` +
``adapter_model.safetensors`` or ``.bin``) and ``non_lora_trainables.bin`` holding the projector block,
the implicit captioner (``clip_projector``) and both positional embeddings (``clip_pe``, ``vt_pe``), used with
the base Vicuna folder and local SD-1.5 and CLIP folders; the LoRA is merged into the base weights as
LLaVA's ``load_pretrained_model`` does. Every key is checked before anything is loaded: a missing,
mis-shaped or foreign one stops with a one-line ``CheckpointError`` naming it. ``LlavaGrounding`` runs a
loaded model for attend-and-segment exactly as the reference does: LLaVA's ``conv_llava_v1`` prompt,
``tokenizer_image_token``'s chunk-wise tokenisation, and ``expand2square`` with LLaVA's integer mean
colour. Weights are read with safetensors or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import re
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import functional as TF

from encoders.base import pad_to_square
from encoders.clip import ClipEncoderConfig
from encoders.fused import FusedEncoderConfig
from grounding.layout import single_block_layout
from grounding.protocol import PreparedBatch
from lmm.llm import LLMBackbone, LLMConfig
from lmm.model import LMM, PromptBatch, StageConfig
from lmm.projector import ProjectorConfig
from lmm.templates import IMAGE_PLACEHOLDER, get_template

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "LlavaGrounding",
    "LlavaImageTransform",
    "difflmm_key_map",
    "load_difflmm",
    "load_llava15",
    "read_llava_config",
    "tokenizer_image_token",
    "write_random_llava15",
]

#: ``model_type`` values of LLaVA's own ``LlavaConfig`` (renamed from ``llava`` to ``llava_llama`` in 2024).
LLAVA_MODEL_TYPES = ("llava", "llava_llama")
#: LLaVA marks the image position with this id in ``input_ids``; we use the tokenizer's ``<image>`` id instead.
LLAVA_IMAGE_TOKEN_INDEX = -200
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
#: Weight keys in a LLaVA checkpoint that are not Llama weights (handled or ignored separately).
_PROJECTOR_PREFIX = "model.mm_projector."
_IGNORED = (re.compile(r"^model\.vision_tower\."), re.compile(r"rotary_emb\.inv_freq$"))


class CheckpointError(ValueError):
    """A released checkpoint that does not have the expected layout; the message is one line naming the key."""


# ------------------------------------------------------------------------------------------------ files


def read_llava_config(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of a LLaVA-layout folder as a dict (never through ``AutoConfig``: LLaVA-1.5's
    ``model_type: llava`` would be read as transformers' own, differently shaped, ``LlavaConfig``)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a LLaVA checkpoint folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def _require_field(config: Mapping[str, Any], key: str, folder: Path) -> Any:
    if key not in config:
        raise CheckpointError(f"{folder}/config.json: missing field {key!r}")
    return config[key]


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face model folder, in the layouts ``save_pretrained`` has used."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a weight index (no 'weight_map')") from None
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            for file in files:
                if not file.is_file():
                    raise CheckpointError(f"{index}: lists shard {file.name}, which does not exist")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(
        f"{folder}: no weights (expected model.safetensors, pytorch_model.bin or a sharded index)"
    )


def _load_file(path: Path) -> dict[str, Tensor]:
    """All tensors of one weight file; ``.bin`` is memory-mapped, so reading only shapes stays cheap."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read ({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _weight_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Key -> (shape, file) over every weight file of the folder, without reading safetensors data."""
    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for file in _weight_files(folder):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = (tuple(handle.get_slice(key).get_shape()), file)
        else:
            for key, value in _load_file(file).items():
                shapes[key] = (tuple(value.shape), file)
    return shapes


def _read_keys(folder: Path, keys: Sequence[str]) -> dict[str, Tensor]:
    """The tensors of ``keys`` (all present: checked by the caller) from a folder's weight files."""
    wanted, found = set(keys), {}
    for file in _weight_files(folder):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                for key in wanted & set(handle.keys()):
                    found[key] = handle.get_tensor(key)
        else:
            state = _load_file(file)
            for key in wanted & state.keys():
                found[key] = state[key].clone()
    return found


# ------------------------------------------------------------------------------------------------ Llama


def llama_config_from(config: Mapping[str, Any]) -> Any:
    """A ``LlamaConfig`` from the Llama fields of a (LLaVA) ``config.json``; multimodal fields are dropped."""
    from transformers import LlamaConfig

    accepted = set(inspect.signature(LlamaConfig.__init__).parameters) | {"rope_theta", "rope_scaling"}
    accepted -= {"self", "architectures", "transformers_version", "dtype"}
    fields = {k: v for k, v in config.items() if k in accepted}
    if fields.get("rope_scaling") is None:
        fields.pop("rope_scaling", None)  # LLaVA writes null; transformers 5 warns about the old name
    return LlamaConfig(**fields)


def _check_llama_weights(folder: Path, llama_config: Any, extra: Callable[[str], bool]) -> None:
    """Every Llama weight present with its shape; other keys only where ``extra(key)`` accepts them."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LlamaForCausalLM(llama_config).state_dict().items()}
    if llama_config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    found = _weight_shapes(folder)
    for key, (shape, file) in found.items():
        if key in expected:
            if shape != expected[key]:
                raise CheckpointError(
                    f"{file}: weight {key!r} has shape {shape}, config.json implies {expected[key]}"
                )
        elif not extra(key) and not any(p.search(key) for p in _IGNORED):
            raise CheckpointError(f"{file}: unexpected weight {key!r} (not a Llama or LLaVA weight)")
    missing = [k for k in expected if k not in found]
    if missing:
        raise CheckpointError(
            f"{folder}: missing weight {missing[0]!r} ({len(missing)} Llama weights missing)"
        )


def load_llama(
    folder: str | Path,
    config: Mapping[str, Any],
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    extra: Callable[[str], bool] = lambda key: False,
) -> nn.Module:
    """A ``LlamaForCausalLM`` from a folder whose ``config.json`` may be LLaVA's, after checking every key."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    llama_config = llama_config_from(config)
    _check_llama_weights(folder, llama_config, extra)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the projector / tower keys were checked above; no "unused weights" list
    try:
        model = LlamaForCausalLM.from_pretrained(
            folder, config=llama_config, dtype=dtype, attn_implementation=attn_implementation
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval()


def _load_tokenizer(folder: Path, config: Mapping[str, Any]) -> Any:
    from transformers import AutoTokenizer

    try:
        # An explicit config keeps AutoTokenizer from parsing LLaVA's config.json as transformers' llava.
        return AutoTokenizer.from_pretrained(folder, config=llama_config_from(config))
    except Exception as err:
        raise CheckpointError(
            f"{folder}: cannot load the tokenizer ({str(err).splitlines()[0]}); a tokenizer.model-only folder "
            "needs `pip install sentencepiece`"
        ) from None


# ------------------------------------------------------------------------------------------------ LLaVA-1.5


def _local_folder(explicit: str | Path | None, from_config: Any, what: str, flag: str, folder: Path) -> Path:
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


def _llava_aspect(config: Mapping[str, Any], folder: Path) -> str:
    aspect = config.get("image_aspect_ratio", "square")
    if aspect == "pad":
        return "pad"
    if aspect in (None, "square"):
        return "crop"  # LLaVA's default processing: CLIPImageProcessor's short-side resize + centre crop
    raise CheckpointError(
        f"{folder}/config.json: image_aspect_ratio {aspect!r} is not supported (pad or square)"
    )


def _eval_stage(model: LMM, aspect: str) -> None:
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
            "no mm_vision_tower); transformers' llava-hf folders load with grounding.hf_models"
        )
    projector_type = _require_field(config, "mm_projector_type", folder)
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
    select_layer = int(_require_field(config, "mm_vision_select_layer", folder))
    mm_hidden = int(_require_field(config, "mm_hidden_size", folder))
    hidden = int(_require_field(config, "hidden_size", folder))
    aspect = _llava_aspect(config, folder)
    clip_folder = _local_folder(clip, config.get("mm_vision_tower"), "vision tower", "--clip", folder)

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
    shapes = _weight_shapes(folder)
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
        tokenizer=_load_tokenizer(folder, config),
    )
    encoder = ClipEncoderConfig(model="hf", weights=str(clip_folder), select_layer=select_layer)
    model = LMM(encoder, ProjectorConfig(name=projector_type), backbone.config, llm_backbone=backbone)
    if model.encoder.embed_dim != mm_hidden:
        raise CheckpointError(
            f"{folder}/config.json: mm_hidden_size {mm_hidden} but the tower {clip_folder} is {model.encoder.embed_dim} wide"
        )
    weights = _read_keys(folder, list(projector_shapes))
    # model.mm_projector.0.weight -> mlp.0.weight (mlp2x_gelu); model.mm_projector.weight -> mlp.weight (linear)
    state = {f"mlp.{key.removeprefix(_PROJECTOR_PREFIX)}": value.float() for key, value in weights.items()}
    model.projector.load_state_dict(state, strict=True)
    _eval_stage(model, aspect)
    model.source = {"format": "llava-1.5", "weights": str(folder), "clip": str(clip_folder)}
    log.info("loaded LLaVA-1.5 checkpoint %s (tower %s, aspect %s)", folder, clip_folder, aspect)
    return model.to(device=device, dtype=dtype).eval()


# ------------------------------------------------------------------------------------------------ DiffLMM

#: The DiffLMM release's ``SDCLIPBlock`` (mm_projector) parameters -> where they live in our fused LMM.
#: ``linear.0.weight`` is special: its input columns are reordered (the release concatenates SD then CLIP
#: channels, the fused encoder CLIP then SD).
_DIFFLMM_KEYS = {
    "clip_projector.0.weight": "encoder.diffusion.captioner.mlp.0.weight",
    "clip_projector.0.bias": "encoder.diffusion.captioner.mlp.0.bias",
    "clip_projector.2.weight": "encoder.diffusion.captioner.mlp.2.weight",
    "clip_projector.2.bias": "encoder.diffusion.captioner.mlp.2.bias",
    "clip_pe": "encoder.diffusion.captioner.pos_embed",
    "sd_norm_layer.weight": "encoder.norm.weight",
    "sd_norm_layer.bias": "encoder.norm.bias",
    "sd_proj_layer.0.weight": "encoder.reduce.weight",
    "sd_proj_layer.0.bias": "encoder.reduce.bias",
    "linear.0.weight": "projector.mlp.0.weight",
    "linear.0.bias": "projector.mlp.0.bias",
    "linear.2.weight": "projector.mlp.2.weight",
    "linear.2.bias": "projector.mlp.2.bias",
    "vt_pe": "projector.pos_embed",
}


def difflmm_key_map() -> dict[str, str]:
    """``model.mm_projector.<name>`` of ``non_lora_trainables.bin`` -> the LMM parameter it loads into."""
    return {f"{_PROJECTOR_PREFIX}{k}": v for k, v in _DIFFLMM_KEYS.items()}


def _normalise_non_lora_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """LLaVA's ``load_pretrained_model``: drop ``base_model.``, then ``model.`` when keys read ``model.model.``."""
    state = {(k[len("base_model.") :] if k.startswith("base_model.") else k): v for k, v in state.items()}
    if any(k.startswith("model.model.") for k in state):
        state = {(k[len("model.") :] if k.startswith("model.") else k): v for k, v in state.items()}
    return state


def _difflmm_encoder_config(
    config: Mapping[str, Any], folder: Path, sd: Path, clip: Path
) -> FusedEncoderConfig:
    def field(key: str) -> Any:
        return _require_field(config, key, folder)

    if field("mm_projector_type") != "SDCLIPBlock":
        raise CheckpointError(
            f"{folder}/config.json: mm_projector_type {config['mm_projector_type']!r} is not DiffLMM's SDCLIPBlock"
        )
    for key in ("mm_vision_sd_concat_clip", "mm_vision_sd_implicit_caption"):
        if field(key) is not True:
            raise CheckpointError(
                f"{folder}/config.json: {key} must be true for DiffLMM (got {config[key]!r})"
            )
    if int(field("mm_vision_sd_pe")) <= 0:
        raise CheckpointError(f"{folder}/config.json: mm_vision_sd_pe must be > 0 (positional embeddings)")
    if int(config.get("mm_vision_sd_ensemble_size", 1) or 1) != 1:
        raise CheckpointError(f"{folder}/config.json: mm_vision_sd_ensemble_size must be 1 (one noised copy)")
    hidden = int(field("hidden_size"))
    if hidden % 4:
        raise CheckpointError(
            f"{folder}/config.json: hidden_size {hidden} is not divisible by 4 (dm_dim = d / 4)"
        )
    return FusedEncoderConfig(
        sd_path=str(sd),
        scheduler="ddim",  # SDCLIPFeaturizer replaces the pipeline's scheduler with DDIM for add_noise
        image_size=int(field("mm_vision_resolution")),
        timestep=int(field("mm_vision_sd_timestep")),
        up_block=int(field("mm_vision_select_layer")),
        dm_dim=hidden // 4,
        clip=ClipEncoderConfig(model="hf", weights=str(clip), select_layer=-2),  # hidden_states[-2][:, 1:]
    )


def _merge_lora(llama: nn.Module, adapter: Path) -> nn.Module:
    """Apply the peft LoRA adapter in ``adapter`` to ``llama`` and merge it, after checking every key."""
    from peft import PeftConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    if not (adapter / "adapter_config.json").is_file():
        raise CheckpointError(f"{adapter}: no adapter_config.json (expected a peft LoRA adapter)")
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter / name).is_file():
            weights_file = adapter / name
            break
    else:
        raise CheckpointError(f"{adapter}: no adapter_model.safetensors or adapter_model.bin")
    state = _load_file(weights_file)
    peft_config = PeftConfig.from_pretrained(str(adapter))
    peft_config.inference_mode = True
    peft_model = get_peft_model(llama, peft_config)
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    for key, value in state.items():
        if key not in expected:
            raise CheckpointError(f"{weights_file}: unexpected adapter weight {key!r}")
        if tuple(value.shape) != expected[key]:
            raise CheckpointError(
                f"{weights_file}: adapter weight {key!r} has shape {tuple(value.shape)}, expected {expected[key]}"
            )
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(
            f"{weights_file}: missing adapter weight {missing[0]!r} ({len(missing)} missing)"
        )
    set_peft_model_state_dict(peft_model, state)
    return peft_model.merge_and_unload().eval()


def _check_difflmm_trainables(state: Mapping[str, Tensor], config: Mapping[str, Any], file: Path) -> None:
    """Keys and shapes of ``non_lora_trainables.bin`` against config.json, before any large weight is read."""
    mapping = difflmm_key_map()
    if (
        f"{_PROJECTOR_PREFIX}clip_norm_layer.weight" in state
        and f"{_PROJECTOR_PREFIX}sd_proj_layer.0.weight" not in state
    ):
        raise CheckpointError(
            f"{file}: SDCLIPBlock variant without sd_proj_layer (clip_norm_layer + concat-first) is not the "
            "released DiffLMM projector this loader maps"
        )
    for key in state:
        if key not in mapping:
            raise CheckpointError(f"{file}: unexpected weight {key!r} (not part of DiffLMM's SDCLIPBlock)")
    for key in mapping:
        if key not in state:
            raise CheckpointError(f"{file}: missing weight {key!r}")
    d = int(config["hidden_size"])
    dm = d // 4
    c_in = int(config.get("mm_vision_sd_clip_proj_in", 1024))
    c_out = int(config.get("mm_vision_sd_clip_proj_out", 768))
    pe = int(config["mm_vision_sd_pe"])
    channels = config.get("mm_hidden_size")
    select = int(config["mm_vision_select_layer"])
    sd = channels[select] if isinstance(channels, list) and 0 <= select < len(channels) else None
    expected: dict[str, tuple[int | None, ...]] = {
        "clip_projector.0.weight": (c_out, c_in),
        "clip_projector.0.bias": (c_out,),
        "clip_projector.2.weight": (c_out, c_out),
        "clip_projector.2.bias": (c_out,),
        "clip_pe": (pe, c_out),
        "sd_norm_layer.weight": (sd,),
        "sd_norm_layer.bias": (sd,),
        "sd_proj_layer.0.weight": (dm, sd, 1, 1),
        "sd_proj_layer.0.bias": (dm,),
        "linear.0.weight": (d, dm + c_in),
        "linear.0.bias": (d,),
        "linear.2.weight": (d, d),
        "linear.2.bias": (d,),
        "vt_pe": (pe, d),
    }
    for name, shape in expected.items():
        key = f"{_PROJECTOR_PREFIX}{name}"
        found = tuple(state[key].shape)
        if len(found) != len(shape) or any(
            e is not None and e != f for e, f in zip(shape, found, strict=True)
        ):
            wanted = tuple("?" if e is None else e for e in shape)
            raise CheckpointError(
                f"{file}: weight {key!r} has shape {found}, config.json implies {wanted}".replace("'?'", "?")
            )


def _map_difflmm_projector(
    state: Mapping[str, Tensor], model: LMM, file: Path, dm_dim: int
) -> dict[str, Tensor]:
    """``non_lora_trainables.bin`` (already checked) -> LMM parameters, checked against the built model."""
    params = dict(model.named_parameters())
    out: dict[str, Tensor] = {}
    for source, target in difflmm_key_map().items():
        value = state[source].float()
        if source.endswith(("clip_pe", "vt_pe")):
            value = value.unsqueeze(0)  # (N, C) -> our (1, N, C)
        if source.endswith("linear.0.weight"):
            # release: [SD (d/4) | CLIP] input channels; ours: [CLIP | SD (d/4)]
            value = torch.cat([value[:, dm_dim:], value[:, :dm_dim]], dim=1)
        if tuple(value.shape) != tuple(params[target].shape):
            raise CheckpointError(
                f"{file}: weight {source!r} has shape {tuple(state[source].shape)}, which does not fit "
                f"{target} {tuple(params[target].shape)} of the model built from the SD/CLIP folders"
            )
        out[target] = value
    return out


def _difflmm_clip_inputs(self: Any, images: Tensor) -> Tensor:
    """DiffLMM's ``sd_to_clip_img``: bilinear (no antialias) resize of the SD input, then CLIP normalisation."""
    size = self.clip.image_size
    pixels = images.float()
    if pixels.shape[-1] != size or pixels.shape[-2] != size:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    pixels = pixels * 0.5 + 0.5
    mean = pixels.new_tensor(self.clip.image_mean).view(1, 3, 1, 1)
    std = pixels.new_tensor(self.clip.image_std).view(1, 3, 1, 1)
    return (pixels - mean) / std


def load_difflmm(
    folder: str | Path,
    base: str | Path | None = None,
    sd: str | Path | None = None,
    clip: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    noise: str = "stochastic",
    attn_implementation: str = "sdpa",
) -> LMM:
    """The released DiffLMM (LoRA run folder + base Vicuna + SD-1.5 + CLIP folders) as the project's LMM.

    ``noise``: ``stochastic`` samples the VAE posterior and fresh noise on every call, as the release does;
    ``fixed`` is deterministic (posterior mean, a fixed noise map). The CLIP branch resizes the 384 px SD input
    bilinearly to the tower's size, as the release does (the project's encoder default is bicubic).
    """
    folder = Path(folder)
    config = read_llava_config(folder)
    base_folder = _local_folder(base, config.get("_name_or_path"), "base LLM", "--base", folder)
    sd_folder = Path(sd) if sd is not None else None
    if sd_folder is None:
        tower = config.get("mm_vision_tower")
        if not (isinstance(tower, str) and Path(tower).is_dir()):
            raise CheckpointError(
                f"{folder}: config.json names the SD tower {tower!r}, not a local folder; pass --sd"
            )
        sd_folder = Path(tower)
    clip_folder = _local_folder(clip, config.get("mm_vision_sd_clip"), "CLIP tower", "--clip", folder)
    encoder_config = _difflmm_encoder_config(config, folder, sd_folder, clip_folder)
    trainables = folder / "non_lora_trainables.bin"
    if not trainables.is_file():
        raise CheckpointError(
            f"{folder}: no non_lora_trainables.bin (projector, captioner, positional embeddings)"
        )
    state = _normalise_non_lora_keys(_load_file(trainables))
    _check_difflmm_trainables(state, config, trainables)

    # LLaVA builds the base LLM with the LoRA run's config (same Llama fields as the base folder's).
    llama = load_llama(base_folder, config, dtype=dtype, attn_implementation=attn_implementation)
    llama = _merge_lora(llama, folder)
    backbone = LLMBackbone(
        LLMConfig(path=str(base_folder), attn_implementation=attn_implementation),
        model=llama,
        tokenizer=_load_tokenizer(base_folder, config),
    )
    encoder_config.noise = noise
    model = LMM(
        encoder_config,
        ProjectorConfig(name="mlp2x_gelu", positional_embedding=True),
        backbone.config,
        llm_backbone=backbone,
    )
    channels = config.get("mm_hidden_size")
    select = encoder_config.up_block
    if (
        isinstance(channels, list)
        and 0 <= select < len(channels)
        and channels[select] != model.encoder.diffusion.embed_dim
    ):
        raise CheckpointError(
            f"{folder}/config.json: mm_hidden_size[{select}] = {channels[select]} but the U-Net's up_blocks[{select}] "
            f"gives {model.encoder.diffusion.embed_dim} channels"
        )
    mapped = _map_difflmm_projector(state, model, trainables, encoder_config.dm_dim)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert not unexpected, unexpected
    model.encoder.diffusion.clip_inputs = types.MethodType(_difflmm_clip_inputs, model.encoder.diffusion)
    _eval_stage(model, _llava_aspect(config, folder))
    model.source = {
        "format": "difflmm",
        "weights": str(folder),
        "base": str(base_folder),
        "sd": str(sd_folder),
        "clip": str(clip_folder),
    }
    log.info("loaded DiffLMM %s on %s (SD %s, CLIP %s)", folder, base_folder, sd_folder, clip_folder)
    return model.to(device=device, dtype=dtype).eval()


# ------------------------------------------------------------------------------------------------ grounding


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


class LlavaGrounding:
    """A loaded LLaVA-1.5 / DiffLMM LMM as a ``grounding.protocol.GroundableModel``, run as the reference runs it.

    Prompts use ``conv_llava_v1`` (the ``vicuna_v1`` template), token ids come from ``tokenizer_image_token``,
    and images from ``LlavaImageTransform``; batches are left-padded, so each sample's image span is known.
    """

    def __init__(self, model: LMM, aspect: str | None = None, template: str = "vicuna_v1") -> None:
        self.model = model
        self.aspect = aspect or (model.stage.aspect if model.stage is not None else "pad")
        self.template = get_template(template)
        encoder = model.encoder
        self.transform = LlavaImageTransform(
            encoder.image_size, encoder.image_mean, encoder.image_std, self.aspect
        )
        self.tokenizer = model.llm.tokenizer
        self.grid = encoder.grid
        # conv_llava_v1 ends each reply with "</s>"; LLaVA's generation stops at EOS.
        self.stop_token_ids = [self.tokenizer.eos_token_id]

    @property
    def language_model(self) -> nn.Module:
        return self.model.llm.causal_lm()

    def prepare(self, images: Sequence[Image.Image], questions: Sequence[str]) -> PreparedBatch:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        tok = self.tokenizer
        n_visual = self.model.encoder.num_tokens
        image_ids = [self.model.llm.image_token_id] * n_visual
        rows = [
            tokenizer_image_token(self.template.prompt(q, has_image=True), tok, image_ids) for q in questions
        ]
        length = max(map(len, rows))
        input_ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        spans = []
        for b, ids in enumerate(rows):
            offset = length - len(ids)
            input_ids[b, offset:] = torch.tensor(ids)
            attention_mask[b, offset:] = 1
            start = offset + ids.index(image_ids[0])
            spans.append((start, start + n_visual))
        device = self.model.device
        dtype = next(self.model.projector.parameters()).dtype
        pixels = torch.stack([self.transform(image) for image in images]).to(device=device, dtype=dtype)
        batch = PromptBatch(input_ids.to(device), attention_mask.to(device), list(spans), pixels)
        layouts = [
            single_block_layout(range(*span), self.grid, (image.height, image.width), self.aspect)
            for span, image in zip(spans, images, strict=True)
        ]
        return PreparedBatch(inputs=batch, layouts=layouts)

    def generate(self, batch: PreparedBatch, max_new_tokens: int) -> Tensor:
        return self.model.generate_from(
            batch.inputs, max_new_tokens=max_new_tokens, eos_token_id=self.stop_token_ids
        )


# ------------------------------------------------------------------------------------------------ random checkpoints

#: Llama shapes for ``write_random_llava15``: Vicuna-7B's, and a tiny one for smoke tests.
LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    "vicuna-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    ),
}
#: CLIP tower shapes: ViT-L/14 at 336 px (LLaVA-1.5's), and a tiny one.
CLIP_PRESETS: dict[str, dict[str, Any]] = {
    "vicuna-7b": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    ),
    "tiny": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    ),
}


def _word_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer of ``vocab_size`` made-up words (``<unk>``, ``<s>``, ``</s>``, ``w3``, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )


def write_random_llava15(
    out: str | Path,
    preset: str = "vicuna-7b",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    shard_bytes: int = 4 << 30,
) -> tuple[Path, Path]:
    """Write a random-weight LLaVA-1.5 release (``out/llava``, sharded safetensors + index, LLaVA's config.json,
    a made-up word tokenizer) and its CLIP tower folder (``out/clip``), for timing at real shapes and smoke
    tests. Weights are drawn tensor by tensor (normal, std 0.02; norms 1, biases 0), so memory stays at a shard.
    """
    from safetensors.torch import save_file
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    if preset not in LLAMA_PRESETS:
        raise ValueError(f"preset {preset!r} is not one of {sorted(LLAMA_PRESETS)}")
    out = Path(out)
    llava, clip = out / "llava", out / "clip"
    llava.mkdir(parents=True, exist_ok=True)
    clip.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(seed)

    clip_config = CLIPVisionConfig(**CLIP_PRESETS[preset], hidden_act="quick_gelu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPVisionModel(clip_config).to(dtype).save_pretrained(clip)
    size = clip_config.image_size
    CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    ).save_pretrained(clip)

    tokenizer = _word_tokenizer(LLAMA_PRESETS[preset]["vocab_size"])
    tokenizer.save_pretrained(llava)
    llama = LlamaConfig(
        **LLAMA_PRESETS[preset], bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5
    )
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(llama).state_dict().items()}
    d, mm = llama.hidden_size, clip_config.hidden_size
    shapes.update(
        {
            "model.mm_projector.0.weight": (d, mm),
            "model.mm_projector.0.bias": (d,),
            "model.mm_projector.2.weight": (d, d),
            "model.mm_projector.2.bias": (d,),
        }
    )

    def draw(key: str, shape: tuple[int, ...]) -> Tensor:
        if key.endswith("norm.weight"):
            return torch.ones(shape, dtype=dtype)
        if key.endswith("bias"):
            return torch.zeros(shape, dtype=dtype)
        value = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator)
        return value.cpu()

    shards: list[list[str]] = [[]]
    used = 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * torch.finfo(dtype).bits // 8
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes
    weight_map, total = {}, 0
    for i, keys in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {key: draw(key, shapes[key]) for key in keys}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(llava / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (llava / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")

    config = {
        k: v for k, v in llama.to_dict().items() if k not in ("dtype", "transformers_version", "model_type")
    }
    config.update(
        {
            "architectures": ["LlavaLlamaForCausalLM"],
            "model_type": "llava_llama",
            "image_aspect_ratio": "pad",
            "mm_hidden_size": mm,
            "mm_projector_type": "mlp2x_gelu",
            "mm_use_im_patch_token": False,
            "mm_use_im_start_end": False,
            "mm_vision_select_feature": "patch",
            "mm_vision_select_layer": -2,
            "mm_vision_tower": str(clip),
            "mm_patch_merge_type": "flat",
            "torch_dtype": str(dtype).removeprefix("torch."),
            "use_mm_proj": True,
        }
    )
    (llava / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return llava, clip


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lmm.llava_checkpoint random --out DIR [--preset vicuna-7b|tiny] [--device cuda]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lmm.llava_checkpoint", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "random", help="write a random-weight LLaVA-1.5 release and CLIP folder (timing, smoke tests)"
    )
    r.add_argument("--out", required=True, type=Path)
    r.add_argument("--preset", choices=sorted(LLAMA_PRESETS), default="vicuna-7b")
    r.add_argument("--device", default="cpu", help="where the random numbers are drawn (cuda is much faster)")
    r.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    r.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    llava, clip = write_random_llava15(
        args.out, args.preset, seed=args.seed, dtype=getattr(torch, args.dtype), device=args.device
    )
    print(f"wrote {llava} (load with --weights {llava} --clip {clip})")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
