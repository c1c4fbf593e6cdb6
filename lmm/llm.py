"""The language-model backbone: a transformers causal LM with its tokenizer, loaded locally or built tiny.

``llm.path`` names a local Hugging Face causal-LM folder (Vicuna-7B for the real recipe); without it a
random Llama of the configured size is built from a seed (the embedded default), over the tokenizer in
``llm.tokenizer`` (the shapes world's word-level tokenizer). The tokenizer always ends up with a pad token
and the ``<image>`` placeholder; the placeholder never reaches the embedding table, because the LMM writes
visual tokens into those positions. LoRA is applied here, through peft, on every linear layer except the
output head.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from datamodules.templates import IMAGE_PLACEHOLDER
from encoders.base import seeded_init
from lmm.config import LLMConfig, LoraConfig

log = logging.getLogger(__name__)


class LLMBackbone(L.LightningModule):
    def __init__(self, config: LLMConfig, model: nn.Module | None = None, tokenizer: Any = None) -> None:
        """``model`` + ``tokenizer``: wrap an already built causal LM (e.g. one assembled from a released
        LLaVA checkpoint by ``lmm.released``) instead of loading ``config.path`` or building one."""
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

        self.config = config
        if (model is None) != (tokenizer is None):
            raise ValueError("LLMBackbone needs both a prebuilt model and its tokenizer, or neither")
        if model is None and config.path is not None and not (Path(config.path) / "config.json").is_file():
            raise FileNotFoundError(
                f"llm.path {config.path} is not a Hugging Face model folder (no config.json)"
            )
        if tokenizer is None:
            tokenizer_path = config.tokenizer or config.path
            if tokenizer_path is None:
                raise ValueError("llm.tokenizer (or llm.path) must name a local tokenizer folder")
            if not Path(tokenizer_path).is_dir():
                raise FileNotFoundError(f"llm.tokenizer folder {tokenizer_path} does not exist")
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        if tokenizer.pad_token is None:
            # LLaVA-1.5 pads Vicuna with its unk token.
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        if tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER) in (None, tokenizer.unk_token_id):
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer

        if model is not None:
            self.model = model
        elif config.path is not None:
            if not (Path(config.path) / "config.json").is_file():
                raise FileNotFoundError(
                    f"llm.path {config.path} is not a Hugging Face model folder (no config.json)"
                )
            overrides = (
                {} if config.attention_dropout is None else {"attention_dropout": config.attention_dropout}
            )
            self.model = AutoModelForCausalLM.from_pretrained(
                config.path, attn_implementation=config.attn_implementation, dtype=torch.float32, **overrides
            )
        else:
            llama = LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size,
                num_hidden_layers=config.num_layers,
                num_attention_heads=config.num_heads,
                num_key_value_heads=config.num_kv_heads or config.num_heads,
                max_position_embeddings=config.max_position_embeddings,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                attention_dropout=config.attention_dropout or 0.0,
            )
            llama._attn_implementation = config.attn_implementation
            with seeded_init(config.init_seed):
                self.model = LlamaForCausalLM(llama)
        self.model.generation_config.pad_token_id = tokenizer.pad_token_id
        self.lora_enabled = False

    @property
    def width(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)

    def embed(self, input_ids: Tensor) -> Tensor:
        # The placeholder id may lie outside the embedding table (it was added to a released tokenizer);
        # its rows are overwritten by visual tokens, so any valid id will do for the lookup.
        safe = input_ids.masked_fill(input_ids == self.image_token_id, 0)
        return self.model.get_input_embeddings()(safe)

    def enable_lora(self, lora: LoraConfig) -> None:
        """Wrap the causal LM with peft LoRA adapters on all linear layers but the output head (once)."""
        if self.lora_enabled:
            return
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        peft_config = PeftLoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(self.model, peft_config)
        self.lora_enabled = True

    def set_trainable(self, mode: str) -> None:
        """``frozen``: nothing trains. ``full``: every weight. ``lora``: only the adapters."""
        if mode not in ("frozen", "full", "lora"):
            raise ValueError(f"llm training mode {mode!r} is not one of frozen, full, lora")
        if mode == "lora" and not self.lora_enabled:
            raise RuntimeError("enable_lora() must run before set_trainable('lora')")
        for name, param in self.model.named_parameters():
            if mode == "full":
                param.requires_grad_("lora_" not in name or self.lora_enabled)
            elif mode == "lora":
                param.requires_grad_("lora_" in name)
            else:
                param.requires_grad_(False)

    def causal_lm(self) -> nn.Module:
        """The underlying transformers model (peft wrapper removed), for attention capture and generation."""
        return self.model.get_base_model() if self.lora_enabled else self.model
