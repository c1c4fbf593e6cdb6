"""Training-step time of the ways ``LMM.training_loss`` computes a batch: the plain pass, the batch's shared prefix
computed once per batch (``trainer.share_prefix``), and on top of that the last decoder layer's MLP and the LM head
computed only at the positions the loss reads (``trainer.read_positions_only``, ``lmm.loss_positions``).

Takes the first ``--batches`` micro-batches of a stage's stream as the run draws them (its own length
grouping), on the embedded default model (a random tower: the tower does not change the LLM's work), and runs
forward, backward and an AdamW step over them each way, alternating rounds so that load drifts on a shared
machine hit every way alike. Each way starts from the same weights and optimizer state in every round. Prints
one table: tokens each way computes per batch (through every layer but the last), the positions the last
layer's MLP computes, seconds per step, the ratio to the plain pass, and the largest difference between a way's
losses and the plain pass's on the same batches (float rounding only).

    python benchmarks/shared_prefix.py [--stage instruct] [--batches 40] [--rounds 3] [--threads 1]
        [overrides ...]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.length_grouping import default_model, stream_batches  # noqa: E402
from lmm.loss_positions import read_positions  # noqa: E402
from lmm.shared_prefix import shared_prefix_length  # noqa: E402

#: (name, share_prefix, read_positions_only)
WAYS = (
    ("plain", False, False),
    ("prefix once per batch", True, False),
    ("prefix once, last MLP and head at read positions", True, True),
)


def run_steps(model, batches: list, share: bool, read_only: bool) -> tuple[float, list[float]]:  # noqa: ANN001
    """Seconds per optimizer step over ``batches`` and each step's loss, from a copy of ``model``."""
    model = copy.deepcopy(model)
    model.share_prefix, model.read_positions_only = share, read_only
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    losses = []
    start = time.perf_counter()
    for batch in batches:
        images = None if batch.images is None else model.encoder_pixels(batch.images)
        loss = model.training_loss(batch.input_ids, batch.attention_mask, images, batch.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return (time.perf_counter() - start) / len(batches), losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default="instruct")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config, model = default_model(args.stage, args.threads, args.overrides)
    batches = stream_batches(config, model, args.stage, args.batches)

    seconds: dict[str, list[float]] = {name: [] for name, *_ in WAYS}
    losses: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, share, read_only in WAYS:
            step, losses[name] = run_steps(model, batches, share, read_only)
            seconds[name].append(step)

    padded = statistics.mean(b.input_ids.numel() for b in batches)
    saved = statistics.mean(
        shared_prefix_length(b.input_ids, b.attention_mask, b.labels, model.llm.image_token_id) * (len(b) - 1)
        for b in batches
    )
    read = statistics.mean(int(read_positions(b.labels).sum()) for b in batches)
    print(f"stage {args.stage}, {len(batches)} micro-batches, {args.rounds} rounds, {args.threads} thread(s)")
    print(
        "| pass | tokens computed / batch | last layer's MLP: positions | s / step (median) | all rounds (s) | ratio | largest loss difference |"
    )
    print("|---|---|---|---|---|---|---|")
    base = statistics.median(seconds["plain"])
    for name, share, read_only in WAYS:
        tokens = padded - saved if share else padded
        step = statistics.median(seconds[name])
        rounds = " ".join(f"{s:.3f}" for s in seconds[name])
        gap = max(abs(a - b) for a, b in zip(losses["plain"], losses[name], strict=True))
        print(
            f"| {name} | {tokens:.0f} | {read if read_only else tokens:.0f} | {step:.3f} | {rounds} "
            f"| {step / base:.2f} | {gap:.1e} |"
        )


if __name__ == "__main__":
    main()
