"""Moved to ``grounding.hf`` (one module per model family and a registry); this module keeps the old names.

``load_hf_llava(folder, kind=...)`` behaves as before: LLaVA-1.5 with LLaVA's ``conv_llava_v1`` prompt
(``template="vicuna_v1"``) or the processor's chat template (``template="chat"``), and LLaVA-NeXT read on its
base grid (``blocks="base"``; the registry's ``hf-llava-next`` reads the high-resolution grid by default).
"""

from __future__ import annotations

from pathlib import Path

import torch

from grounding.hf.base import HFGroundable
from grounding.hf.llava import VICUNA_V1_SYSTEM, HFLlava, vicuna_v1_prompt
from grounding.hf.llava import load as _load_llava
from grounding.hf.llava_next import HFLlavaNext, load_llava_next

__all__ = ["HFLlava", "HFLlavaNext", "VICUNA_V1_SYSTEM", "load_hf_llava", "vicuna_v1_prompt"]

TEMPLATES = ("vicuna_v1", "chat")
KINDS = ("llava", "llava_next")


def load_hf_llava(
    folder: str | Path,
    *,
    kind: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    template: str = "vicuna_v1",
    aspect: str | None = None,
) -> HFGroundable:
    """A llava-hf folder (LLaVA-1.5 or LLaVA-NeXT) as before; ``kind`` defaults to config.json's model_type."""
    import json

    folder = Path(folder)
    if template not in TEMPLATES:
        raise ValueError(f"template {template!r} is not one of {TEMPLATES}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a transformers LLaVA folder)")
    model_type = kind or json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if model_type not in KINDS:
        raise ValueError(f"{folder}: model_type {model_type!r} is not one of {list(KINDS)}")
    prompt_format = vicuna_v1_prompt if template == "vicuna_v1" else None
    common = dict(
        device=device, dtype=dtype, prompt_format=prompt_format, attn_implementation=attn_implementation
    )
    if model_type == "llava":
        return _load_llava(folder, aspect=aspect or "pad", **common)
    if aspect not in (None, "resize"):
        raise ValueError("LLaVA-NeXT's base grid is the whole image squashed to a square: aspect 'resize'")
    return load_llava_next(folder, blocks="base", **common)
