"""A Llama causal LM from a released folder whose ``config.json`` may be LLaVA's, every key checked first."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmm.released.weight_files import CheckpointError, weight_shapes

#: Keys a LLaVA-layout folder holds besides Llama weights that loading ignores, as LLaVA does: the copy of
#: the vision tower (the tower comes from its own folder) and old rotary buffers.
IGNORED_KEYS = (re.compile(r"^model\.vision_tower\."), re.compile(r"rotary_emb\.inv_freq$"))


def llama_config_from(config: Mapping[str, Any]) -> Any:
    """A ``LlamaConfig`` from the Llama fields of a (LLaVA) ``config.json``; multimodal fields are dropped."""
    from transformers import LlamaConfig

    accepted = set(inspect.signature(LlamaConfig.__init__).parameters) | {"rope_theta", "rope_scaling"}
    accepted -= {"self", "architectures", "transformers_version", "dtype"}
    fields = {k: v for k, v in config.items() if k in accepted}
    if fields.get("rope_scaling") is None:
        fields.pop("rope_scaling", None)  # LLaVA writes null; transformers 5 warns about the old name
    return LlamaConfig(**fields)


def check_llama_weights(folder: Path, llama_config: Any, extra: Callable[[str], bool]) -> None:
    """Every Llama weight present with its shape; other keys only where ``extra(key)`` accepts them."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LlamaForCausalLM(llama_config).state_dict().items()}
    if llama_config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    found = weight_shapes(folder)
    for key, (shape, file) in found.items():
        if key in expected:
            if shape != expected[key]:
                raise CheckpointError(
                    f"{file}: weight {key!r} has shape {shape}, config.json implies {expected[key]}"
                )
        elif not extra(key) and not any(p.search(key) for p in IGNORED_KEYS):
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
    check_llama_weights(folder, llama_config, extra)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the projector / tower keys were checked above; no "unused weights" list
    try:
        model = LlamaForCausalLM.from_pretrained(
            folder, config=llama_config, dtype=dtype, attn_implementation=attn_implementation
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval()


def load_tokenizer(folder: Path, config: Mapping[str, Any]) -> Any:
    from transformers import AutoTokenizer

    try:
        # An explicit config keeps AutoTokenizer from parsing LLaVA's config.json as transformers' llava.
        return AutoTokenizer.from_pretrained(folder, config=llama_config_from(config))
    except Exception as err:
        raise CheckpointError(
            f"{folder}: cannot load the tokenizer ({str(err).splitlines()[0]}); a tokenizer.model-only folder "
            "needs `pip install sentencepiece`"
        ) from None
