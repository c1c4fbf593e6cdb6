"""The released DiffLMM (a LoRA run of LLaVA-1.5 with DiffLMM's fused visual block) as the project's LMM.

As released for ``Shengcao1006/difflmm-llava-v1.5-7b-lora``: a LoRA run folder with ``config.json`` (the
``SDCLIPBlock`` projector and ``mm_vision_sd_*`` fields), a peft adapter (``adapter_config.json`` +
``adapter_model.safetensors`` or ``.bin``) and ``non_lora_trainables.bin`` holding the projector block, the
implicit captioner (``clip_projector``) and both positional embeddings (``clip_pe``, ``vt_pe``), used with the
base Vicuna folder and local SD-1.5 and CLIP folders. The LoRA is merged into the base weights as LLaVA's
``load_pretrained_model`` does; the ``SDCLIPBlock`` maps onto the fused encoder and projector (``difflmm_key_map``).
What the release does differently from a model trained here is recorded in the encoder's config
(``clip_resize: bilinear``), so the loaded model rebuilt from its config behaves the same. Every key is checked
before anything large is read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from encoders.config import ClipEncoderConfig, FusedEncoderConfig
from lmm.config import LLMConfig, ProjectorConfig
from lmm.llm import LLMBackbone
from lmm.model import LMM
from lmm.released.llama import load_llama, load_tokenizer
from lmm.released.llava15 import PROJECTOR_PREFIX, freeze_as_released, llava_aspect, local_folder
from lmm.released.weight_files import CheckpointError, load_weight_file, read_llava_config, require_field

log = logging.getLogger(__name__)


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
    return {f"{PROJECTOR_PREFIX}{k}": v for k, v in _DIFFLMM_KEYS.items()}


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
        return require_field(config, key, folder)

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
        clip_resize="bilinear",  # the release's sd_to_clip_img: F.interpolate bilinear, no antialias
        pixel_norm="clip",  # the release's SD tower normalised with CLIP's mean/std (see PixelNorm)
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
    state = load_weight_file(weights_file)
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
        f"{PROJECTOR_PREFIX}clip_norm_layer.weight" in state
        and f"{PROJECTOR_PREFIX}sd_proj_layer.0.weight" not in state
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
        key = f"{PROJECTOR_PREFIX}{name}"
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
    base_folder = local_folder(base, config.get("_name_or_path"), "base LLM", "--base", folder)
    sd_folder = Path(sd) if sd is not None else None
    if sd_folder is None:
        tower = config.get("mm_vision_tower")
        if not (isinstance(tower, str) and Path(tower).is_dir()):
            raise CheckpointError(
                f"{folder}: config.json names the SD tower {tower!r}, not a local folder; pass --sd"
            )
        sd_folder = Path(tower)
    clip_folder = local_folder(clip, config.get("mm_vision_sd_clip"), "CLIP tower", "--clip", folder)
    encoder_config = _difflmm_encoder_config(config, folder, sd_folder, clip_folder)
    trainables = folder / "non_lora_trainables.bin"
    if not trainables.is_file():
        raise CheckpointError(
            f"{folder}: no non_lora_trainables.bin (projector, captioner, positional embeddings)"
        )
    state = _normalise_non_lora_keys(load_weight_file(trainables))
    _check_difflmm_trainables(state, config, trainables)

    # LLaVA builds the base LLM with the LoRA run's config (same Llama fields as the base folder's).
    llama = load_llama(base_folder, config, dtype=dtype, attn_implementation=attn_implementation)
    llama = _merge_lora(llama, folder)
    backbone = LLMBackbone(
        LLMConfig(path=str(base_folder), attn_implementation=attn_implementation),
        model=llama,
        tokenizer=load_tokenizer(base_folder, config),
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
    freeze_as_released(model, llava_aspect(config, folder))
    model.source = {
        "format": "difflmm",
        "weights": str(folder),
        "base": str(base_folder),
        "sd": str(sd_folder),
        "clip": str(clip_folder),
    }
    log.info("loaded DiffLMM %s on %s (SD %s, CLIP %s)", folder, base_folder, sd_folder, clip_folder)
    return model.to(device=device, dtype=dtype).eval()
