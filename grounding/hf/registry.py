"""Transformers models that attend-and-segment can ground, by name: ``name -> loader``.

Every loader has the signature ``load(weights, *, device, dtype, prompt_format=None, attn_implementation="sdpa",
**model_options)`` and
returns a ``GroundableModel`` whose ``settings`` dict records what the run used (``settings.json``
material). ``weights`` is a local folder with the model and its processor files (no downloads).

| name | class | tokens of one image | read by default | options |
|---|---|---|---|---|
| ``hf-llava`` | ``LlavaForConditionalGeneration`` | one 24x24 grid (pad-to-square box) | the grid | ``aspect`` (pad, crop) |
| ``hf-llava-next`` | ``LlavaNextForConditionalGeneration`` | 24x24 base, then unpadded high-res grid + newline column | high-res | ``blocks`` (highres, base) |
| ``hf-llava-onevision`` | ``LlavaOnevisionForConditionalGeneration`` | 27x27 base, then unpadded (maybe shrunk) high-res grid + newline column | high-res | ``blocks`` (highres, base) |
| ``hf-qwen2-vl`` | ``Qwen2VLForConditionalGeneration`` | one (h/28)x(w/28) grid of merged patches | the grid | ``max_pixels`` (1008*1008) |
| ``hf-qwen2.5-vl`` | ``Qwen2_5_VLForConditionalGeneration`` | same | the grid | ``max_pixels`` (1008*1008) |
| ``hf-qwen3-vl`` | ``Qwen3VLForConditionalGeneration`` | one (h/32)x(w/32) grid | the grid | ``max_pixels`` (1008*1008) |
| ``hf-internvl`` | ``InternVLForConditionalGeneration`` | rows x cols tiles of 16x16, then a 16x16 thumbnail | tiles stitched | ``blocks`` (tile, thumbnail), ``min_patches`` (3), ``max_patches`` (9) |
| ``hf-gemma3`` | ``Gemma3ForConditionalGeneration`` | one 16x16 grid | the grid | none |
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from grounding.hf import gemma3, internvl, llava, llava_next, qwen_vl
from grounding.hf.base import HFGroundable, PromptFormat

__all__ = ["MODELS", "load", "model_options_of"]

Loader = Callable[..., HFGroundable]

MODELS: Mapping[str, Loader] = MappingProxyType(
    {
        "hf-llava": llava.load,
        "hf-llava-next": llava_next.load_llava_next,
        "hf-llava-onevision": llava_next.load_llava_onevision,
        "hf-qwen2-vl": qwen_vl.load_qwen2_vl,
        "hf-qwen2.5-vl": qwen_vl.load_qwen2_5_vl,
        "hf-qwen3-vl": qwen_vl.load_qwen3_vl,
        "hf-internvl": internvl.load,
        "hf-gemma3": gemma3.load,
    }
)


def load(
    name: str,
    weights: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prompt_format: PromptFormat | None = None,
    attn_implementation: str = "sdpa",
    **model_options: Any,
) -> HFGroundable:
    """The registered model ``name`` from the local folder ``weights`` (see the table in the module docstring).

    ``prompt_format(question, image_token) -> prompt`` replaces the processor's chat template;
    ``attn_implementation`` is ``sdpa`` (default) or ``eager``; ``model_options`` are the model's own.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    loader = MODELS[name]
    allowed = sorted(model_options_of(name))
    unknown = sorted(set(model_options) - set(allowed))
    if unknown:
        raise TypeError(f"{name} has no option(s) {unknown}; its options are {allowed}")
    return loader(
        Path(weights),
        device=device,
        dtype=dtype,
        prompt_format=prompt_format,
        attn_implementation=attn_implementation,
        **model_options,
    )


def model_options_of(name: str) -> dict[str, Any]:
    """A model's options and their defaults (the keyword arguments its loader takes beyond the common ones)."""
    common = {"weights", "device", "dtype", "prompt_format", "attn_implementation"}
    parameters = inspect.signature(MODELS[name]).parameters.values()
    return {p.name: p.default for p in parameters if p.name not in common}
