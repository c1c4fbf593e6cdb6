"""Padding and training-step time with and without length grouping (``stages.<stage>.group_by_length``).

Takes the first ``--batches`` micro-batches of a stage's stream twice, as drawn and length-grouped, on the
embedded default model (a random tower: the tower does not change the LLM's work), then runs forward,
backward and an AdamW step over each set, alternating rounds so that load drifts on a shared machine hit both
alike. Prints one table: padded tokens per batch, real tokens per batch, seconds per step and the ratio.

    python benchmarks/length_grouping.py [--stage instruct] [--group 8] [--batches 48] [--rounds 3]
        [--threads 1] [overrides ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from lmm.build import build_datamodule, build_model  # noqa: E402
from lmm.config_loading import load_config  # noqa: E402


def stream_batches(config, model, stage: str, n: int, group: int | None = None) -> list:  # noqa: ANN001
    """The first ``n`` micro-batches of ``stage``'s stream as the datamodule gives them to the step, with
    ``group_by_length`` set to ``group`` (None: the stage's own)."""
    if group is not None:
        settings = dataclasses.replace(config.stages[stage], group_by_length=group)
        config = dataclasses.replace(config, stages={**config.stages, stage: settings})
    datamodule = build_datamodule(config, model, stage)
    out = []
    for batch in datamodule.train_dataloader():
        out.append(datamodule.on_before_batch_transfer(batch, 0))
        if len(out) == n:
            return out
    return out


def default_model(stage: str, threads: int, overrides: list[str]):  # noqa: ANN201
    """The embedded default's config (with ``overrides``) and its model in training mode for ``stage``, on a
    random tower (the tower does not change the LLM's work), generating the world if it is missing."""
    torch.set_num_threads(threads)
    config = load_config(None, ["encoder.pretrain=null", "data.num_workers=0", *overrides])
    if config.data.shapes is not None:
        from datamodules.shapes import ensure_world

        ensure_world(config.data.shapes, Path(config.data.root))
    model = build_model(config, None)
    model.configure_stage(stage, config.stages[stage], quiet=True)
    model.train()
    return config, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default="instruct")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--batches", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config, model = default_model(args.stage, args.threads, args.overrides)
    sets = {g: stream_batches(config, model, args.stage, args.batches, g) for g in (0, args.group)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    seconds: dict[int, list[float]] = {g: [] for g in sets}
    for _ in range(args.rounds):
        for group, batches in sets.items():
            start = time.perf_counter()
            for batch in batches:
                images = None if batch.images is None else model.encoder_pixels(batch.images)
                model(batch.input_ids, batch.attention_mask, images, batch.labels).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            seconds[group].append((time.perf_counter() - start) / len(batches))
    print(f"stage {args.stage}, {args.batches} micro-batches, {args.rounds} rounds, {args.threads} thread(s)")
    print("| grouping | padded tokens / batch | real tokens / batch | s / step (median) | ratio |")
    print("|---|---|---|---|---|")
    base = statistics.median(seconds[0])
    for group, batches in sets.items():
        padded = statistics.mean(b.input_ids.numel() for b in batches)
        real = statistics.mean(int(b.attention_mask.sum()) for b in batches)
        step = statistics.median(seconds[group])
        name = "as drawn" if group == 0 else f"group_by_length={group}"
        print(f"| {name} | {padded:.0f} | {real:.0f} | {step:.3f} | {step / base:.2f} |")


if __name__ == "__main__":
    main()
