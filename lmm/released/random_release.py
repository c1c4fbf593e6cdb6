"""A random-weight LLaVA-1.5 release at any preset shape, in the release's own layout: for timing at real
shapes and for smoke tests of the loading path (``python -m lmm.released.random_release --out DIR``)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmm.released.weight_files import SAFETENSORS_INDEX

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
    """``python -m lmm.released.random_release --out DIR [--preset vicuna-7b|tiny] [--device cuda]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lmm.released.random_release",
        description="write a random-weight LLaVA-1.5 release and CLIP folder (timing, smoke tests)",
    )
    r = parser
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
