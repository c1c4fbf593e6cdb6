"""Time per training step of the LMM LightningModule against a bare PyTorch loop on the same model and batch.

Both loops run the same work per step (forward, backward, gradient clipping, AdamW, cosine schedule) on
copies of one model, over one fixed batch from the shapes world, alternating rounds so that machine load
drifts affect both alike. The Lightning loop is the real ``Trainer.fit`` with the module's own
``training_step``, logging and optimizer configuration; its step time is measured between consecutive
batch starts, which includes everything Lightning adds around the step. Goal: ratio <= 1.05.

    python benchmarks/train_step.py [--steps 30] [--rounds 3] [overrides ...]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

from datamodules.shapes import ShapesWorldConfig, generate_world  # noqa: E402
from lmm.batch import TrainBatch, collate  # noqa: E402
from lmm.build import build_model  # noqa: E402
from lmm.config_loading import load_config  # noqa: E402


class RepeatBatch(IterableDataset):
    def __init__(self, batch: TrainBatch, n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self):
        for _ in range(self.n):
            yield self.batch


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, *args) -> None:
        self.starts.append(time.perf_counter())


def fixed_batch(model, root: Path, stage) -> TrainBatch:
    import webdataset as wds

    from datamodules.shards import ShardIndex, decode_sample

    encode = model.sample_encoder(stage)
    index = ShardIndex.load(root / stage.data)
    samples = []
    for raw in wds.tariterators.tarfile_samples([{"url": index.urls[0]}]):
        samples.append(encode(*decode_sample(raw)))
        if len(samples) == stage.micro_batch_size:
            break
    return collate(samples, model.llm.tokenizer.pad_token_id)


def bare_loop(model, batch: TrainBatch, steps: int, warmup: int, clip: float | None) -> float:
    from transformers import get_cosine_schedule_with_warmup

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=model.stage.lr, weight_decay=model.stage.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, 1, steps + warmup)
    times = []
    for i in range(steps + warmup):
        start = time.perf_counter()
        # the device-side image transform the training step runs
        images = None if batch.images is None else model.encoder_pixels(batch.images)
        loss = model(batch.input_ids, batch.attention_mask, images, batch.labels).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def lightning_loop(model, batch: TrainBatch, steps: int, warmup: int, clip: float | None) -> float:
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps + warmup,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=clip,
        callbacks=[timer],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, DataLoader(RepeatBatch(batch, steps + warmup), batch_size=None))
    gaps = [b - a for a, b in zip(timer.starts[warmup:], timer.starts[warmup + 1 :], strict=False)]
    return sum(gaps) / len(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stage", default="instruct")
    parser.add_argument("overrides", nargs="*", help="config overrides, as for train.py")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "shapes"
        generate_world(
            ShapesWorldConfig(n_pretrain=64, n_instruct=64, n_val=1, n_val_qa=1, n_objects=4), root
        )
        # The step's cost does not depend on the tower's weights: a random one spares the tower stage.
        overrides = [f"data.root={root}", "data.shapes=null", "encoder.pretrain=null", *args.overrides]
        config = load_config(None, overrides)
        stage = config.stages[args.stage]
        base = build_model(config)
        base.configure_stage(args.stage, stage)
        batch = fixed_batch(base, root, stage)
        clip = config.trainer.gradient_clip_val
        bare, light = [], []
        for _ in range(args.rounds):
            bare.append(bare_loop(copy.deepcopy(base), batch, args.steps, args.warmup, clip))
            light.append(lightning_loop(copy.deepcopy(base), batch, args.steps, args.warmup, clip))

    b, lt = statistics.median(bare), statistics.median(light)
    tokens = batch.input_ids.numel()
    print(
        f"\nstage {args.stage}: batch {tuple(batch.input_ids.shape)} ({tokens} tokens), "
        f"torch threads {torch.get_num_threads()}, {args.rounds} rounds x {args.steps} steps"
    )
    print(f"{'loop':<12}{'ms/step (median)':>18}    all rounds (ms)")
    print(f"{'bare torch':<12}{b * 1e3:>18.1f}    {'  '.join(f'{x * 1e3:.1f}' for x in bare)}")
    print(f"{'lightning':<12}{lt * 1e3:>18.1f}    {'  '.join(f'{x * 1e3:.1f}' for x in light)}")
    print(f"ratio lightning / bare = {lt / b:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
