"""Expected GPU memory per device for LLaVA-1.5-7B (Vicuna-7B + CLIP ViT-L/14-336) on 8 GPUs, by stage and strategy.

Arithmetic, not a measurement: the parameter counts follow from the architectures, the bytes per parameter
from how each strategy stores weights, gradients and Adam's two moments under ``trainer.precision:
bf16-mixed``, and the activations from what a Llama decoder layer keeps for its backward pass. Micro-batch
sizes and the LoRA rank come from ``configs/llava15_7b.yaml`` and ``configs/llava15_7b_lora.yaml``; the tokens
per sample are typical lengths (576 image tokens plus text), not the 2048 maximum (which doubles activations):

    python benchmarks/memory_7b.py [--pretrain-tokens 640] [--instruct-tokens 1024] [--gpus 8]

Strategies, per GPU (P: all parameters, T: trainable ones, N: GPUs):
- DDP (Lightning, bf16-mixed): fp32 weights 4P; fp32 gradients 4T plus DDP's fp32 communication buckets 4T;
  Adam 8T; autocast's bf16 copies of the trainable weights 2T.
- FSDP full_shard (``lmm.strategies``, bf16-mixed): fp32 shards 4P/N, gradients 4T/N, Adam 8T/N; plus the units
  gathered in bf16 at a time: the root unit (embeddings, head, CLIP tower, projector) and two decoder layers
  (the current one and the prefetched next), and one decoder layer's full bf16 gradient before its reduce-scatter.
- DeepSpeed ZeRO-2 (bf16): bf16 weights 2P; fp32 master weights 4T/N, Adam 8T/N; bf16 gradient partition 2T/N
  plus Lightning's default reduce and all-gather buckets (2 x 2e8 elements in bf16).
Activations: with activation checkpointing (``trainer.fsdp.activation_checkpointing``, the FSDP configs) every
decoder layer keeps only its bf16 input, and one layer at a time is recomputed in full; without, every layer keeps
everything. The loss adds the logits (bf16, an fp32 copy for the cross-entropy, and its fp32 gradient). The frozen
CLIP tower runs without autograd and keeps nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmm.config_loading import CONFIG_DIR, load_config  # noqa: E402

GB = 1024**3
# Vicuna-7B (Llama-2-7B shape) and OpenAI CLIP ViT-L/14 at 336 px.
HIDDEN, LAYERS, INTERMEDIATE, VOCAB = 4096, 32, 11008, 32000
CLIP_WIDTH, CLIP_LAYERS, CLIP_PATCH, CLIP_IMAGE, CLIP_OUT = 1024, 24, 14, 336, 1024


def llama_layer() -> int:
    attention = 4 * HIDDEN * HIDDEN
    mlp = 3 * HIDDEN * INTERMEDIATE
    return attention + mlp + 2 * HIDDEN  # two RMSNorm weights


def clip_tower() -> int:
    tokens = (CLIP_IMAGE // CLIP_PATCH) ** 2 + 1
    embed = (
        3 * CLIP_PATCH**2 * CLIP_WIDTH + CLIP_WIDTH + tokens * CLIP_WIDTH + 2 * CLIP_WIDTH
    )  # conv, cls, pos, ln_pre
    block = (
        4 * CLIP_WIDTH**2 + 4 * CLIP_WIDTH + 8 * CLIP_WIDTH**2 + 5 * CLIP_WIDTH + 4 * CLIP_WIDTH
    )  # attn, mlp, lns
    return embed + CLIP_LAYERS * block


def lora(rank: int) -> int:
    """LoRA on every linear layer of every decoder layer (q, k, v, o, gate, up, down)."""
    per_layer = 4 * rank * (HIDDEN + HIDDEN) + 3 * rank * (HIDDEN + INTERMEDIATE)
    return LAYERS * per_layer


def activation_bytes_per_token(checkpointing: bool) -> float:
    """Bytes a micro-batch keeps per token for the backward pass (bf16 compute, SDPA: no seq x seq matrix)."""
    # One decoder layer keeps: the RMSNorm inputs in fp32 (2 x 4h), the normed inputs (2 x 2h), q, k, v and the
    # attention output (4 x 2h), the gate and up projections, SiLU(gate) and their product (4 x 2i).
    full_layer = 2 * 4 * HIDDEN + 2 * 2 * HIDDEN + 4 * 2 * HIDDEN + 4 * 2 * INTERMEDIATE
    logits = VOCAB * (2 + 4 + 4)
    if checkpointing:
        return LAYERS * 2 * HIDDEN + full_layer + logits
    return LAYERS * full_layer + logits


def states(strategy: str, total: int, trainable: int, gpus: int, root: int) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes per GPU."""
    layer = llama_layer()
    if strategy == "DDP":
        return 4 * total + 2 * trainable, 8 * trainable, 8 * trainable
    if strategy == "FSDP full_shard":
        gathered = 2 * root + 2 * 2 * layer
        unsharded_grad = 2 * min(layer, trainable)
        return 4 * total / gpus + gathered, 4 * trainable / gpus + unsharded_grad, 8 * trainable / gpus
    if strategy == "ZeRO-2":
        buckets = 2 * 2e8 * 2
        return 2 * total, 2 * trainable / gpus + buckets, 12 * trainable / gpus
    raise ValueError(strategy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-tokens", type=int, default=640, help="tokens per pretraining sample")
    parser.add_argument("--instruct-tokens", type=int, default=1024, help="tokens per instruction sample")
    parser.add_argument("--gpus", type=int, default=8)
    args = parser.parse_args(argv)
    full = load_config([str(CONFIG_DIR / "llava15_7b.yaml")])
    lora_config = load_config([str(CONFIG_DIR / "llava15_7b_lora.yaml")])

    embed = VOCAB * HIDDEN
    llm = 2 * embed + LAYERS * llama_layer() + HIDDEN
    clip = clip_tower()
    projector = CLIP_OUT * HIDDEN + HIDDEN + HIDDEN * HIDDEN + HIDDEN
    adapters = lora(lora_config.stages["instruct"].lora.r)
    root = (
        2 * embed + HIDDEN + clip + projector
    )  # what FSDP's root unit holds (everything but decoder layers)
    print(
        f"parameters: Vicuna-7B {llm / 1e9:.3f} B (decoder layer {llama_layer() / 1e6:.1f} M), CLIP ViT-L/14-336 "
        f"{clip / 1e6:.1f} M, projector {projector / 1e6:.1f} M, LoRA r={lora_config.stages['instruct'].lora.r} "
        f"{adapters / 1e6:.1f} M"
    )
    print(
        f"activations per token: {activation_bytes_per_token(True) / 1024:.0f} KiB with activation checkpointing, "
        f"{activation_bytes_per_token(False) / 1024:.0f} KiB without (logits alone {VOCAB * 10 / 1024:.0f} KiB)"
    )
    total = llm + clip + projector
    stages = [
        (
            "pretrain (projector)",
            projector,
            total,
            full.stages["pretrain"].micro_batch_size,
            args.pretrain_tokens,
        ),
        (
            "instruct, full LLM",
            llm + projector,
            total,
            full.stages["instruct"].micro_batch_size,
            args.instruct_tokens,
        ),
        (
            "instruct, LoRA",
            adapters + projector,
            total + adapters,
            lora_config.stages["instruct"].micro_batch_size,
            args.instruct_tokens,
        ),
    ]
    header = (
        "stage",
        "micro-batch x tokens",
        "strategy",
        "weights",
        "grads",
        "Adam",
        "states",
        "activations (AC / none)",
        "total with AC",
    )
    print(f"\nGiB per GPU, {args.gpus} GPUs, bf16-mixed")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("-" * (len(h) + 2) for h in header) + "|")
    for name, trainable, params, micro, tokens in stages:
        with_ac = micro * tokens * activation_bytes_per_token(True)
        without = micro * tokens * activation_bytes_per_token(False)
        for strategy in ("DDP", "FSDP full_shard", "ZeRO-2"):
            weights, grads, adam = states(strategy, params, trainable, args.gpus, root)
            model_states = weights + grads + adam
            cells = (
                name,
                f"{micro} x {tokens}",
                strategy,
                f"{weights / GB:.1f}",
                f"{grads / GB:.1f}",
                f"{adam / GB:.1f}",
                f"{model_states / GB:.1f}",
                f"{with_ac / GB:.1f} / {without / GB:.1f}",
                f"{(model_states + with_ac) / GB:.1f}",
            )
            print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
