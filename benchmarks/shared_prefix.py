"""Training-step time with the batch's shared prefix computed once per batch and once per row (``trainer.share_prefix``).

Takes the first ``--batches`` micro-batches of a stage's stream as the run draws them (its own length
grouping), on the embedded default model (a random tower: the tower does not change the LLM's work), and runs
forward, backward and an AdamW step over them with ``LMM.training_loss`` both ways, alternating rounds so that
load drifts on a shared machine hit both alike. Each way starts from the same weights and optimizer state in
every round. Prints one table: tokens each way computes per batch, seconds per step, the ratio, and the
largest difference between the two ways' losses on the same batches (float rounding only).

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
from lmm.shared_prefix import shared_prefix_length  # noqa: E402


def run_steps(model, batches: list, share: bool) -> tuple[float, list[float]]:  # noqa: ANN001
    """Seconds per optimizer step over ``batches`` and each step's loss, from a copy of ``model``."""
    model = copy.deepcopy(model)
    model.share_prefix = share
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

    seconds: dict[bool, list[float]] = {False: [], True: []}
    losses: dict[bool, list[float]] = {}
    for _ in range(args.rounds):
        for share in (False, True):
            step, losses[share] = run_steps(model, batches, share)
            seconds[share].append(step)

    padded = statistics.mean(b.input_ids.numel() for b in batches)
    saved = statistics.mean(
        shared_prefix_length(b.input_ids, b.attention_mask, b.labels, model.llm.image_token_id) * (len(b) - 1)
        for b in batches
    )
    gap = max(abs(a - b) for a, b in zip(losses[False], losses[True], strict=True))
    print(f"stage {args.stage}, {len(batches)} micro-batches, {args.rounds} rounds, {args.threads} thread(s)")
    print("| prefix | tokens computed / batch | s / step (median) | all rounds (s) | ratio |")
    print("|---|---|---|---|---|")
    base = statistics.median(seconds[False])
    for share, tokens in ((False, padded), (True, padded - saved)):
        step = statistics.median(seconds[share])
        rounds = " ".join(f"{s:.3f}" for s in seconds[share])
        name = "once per batch" if share else "once per row"
        print(f"| {name} | {tokens:.0f} | {step:.3f} | {rounds} | {step / base:.2f} |")
    print(f"largest loss difference over the {len(batches)} steps: {gap:.2e}")


if __name__ == "__main__":
    main()
