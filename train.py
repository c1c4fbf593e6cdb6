"""Train an LMM stage by stage: ``python train.py [--config FILE ...] [group=name ...] [dotted.key=value ...]``.

Without ``--config`` the embedded default (``configs/default.yaml``) runs: it generates the synthetic shapes
world if needed, then caption-pretrains and instruction-tunes a tiny LLaVA-style model on the CPU, and
answers held-out questions about unseen images. Each stage in ``run_stages`` gets its own Lightning Trainer,
TensorBoard logger and checkpoint folder under the fixed run directory ``runs/<run_name>/``. Rerunning the
same command resumes: a finished stage is loaded and skipped, an unfinished one continues from its
``last.ckpt``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
import warnings
from functools import partial
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Frozen encoders stay in eval mode on purpose (VisualEncoder.train keeps them there).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

log = logging.getLogger("train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--config", action="append", default=None, help="YAML config (repeatable; later wins)"
    )
    parser.add_argument(
        "overrides", nargs="*", help="group=name (e.g. encoder=fused_tiny) or dotted.key=value"
    )
    return parser.parse_args(argv)


def setup_logging(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [
        logging.StreamHandler(sys.stderr),
        logging.FileHandler(run_dir / "train.log"),
    ]
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    for h in handlers:
        h.setFormatter(fmt)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in [h for h in root.handlers if getattr(h, "_train_py", False)]:  # a second main() in one process
        root.removeHandler(h)
        h.close()
    for h in handlers:
        h._train_py = True  # type: ignore[attr-defined]
        root.addHandler(h)
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_stage(config, model, name: str, requeue: RequeueSignal | None = None) -> dict:  # noqa: ANN001
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from datamodules.shards import ShardDataModule, SkippedSamplesLogger
    from lmm.checkpoint import load_stage_weights, read_checkpoint, stage_checkpoint
    from lmm.preprocess import collate

    stage = config.stages[name]
    model.configure_stage(name, stage)
    ranks = config.trainer.devices * config.trainer.num_nodes
    per_step = stage.micro_batch_size * ranks
    if stage.global_batch_size % per_step:
        raise ValueError(
            f"stages.{name}.global_batch_size {stage.global_batch_size} is not a multiple of "
            f"micro_batch_size x devices x nodes = {per_step}"
        )
    accumulate = stage.global_batch_size // per_step
    data_dir = Path(stage.data) if Path(stage.data).is_absolute() else Path(config.data.root) / stage.data
    encode = model.sample_encoder(stage)
    datamodule = ShardDataModule(
        data_dir,
        encode,
        partial(collate, pad_token_id=model.llm.tokenizer.pad_token_id),
        stage.micro_batch_size,
        num_workers=config.data.num_workers,
        seed=config.seed,
        shuffle_buffer=config.data.shuffle_buffer,
        world_size=ranks,
        sample_log=config.run_dir / "samples" / name if config.data.record_samples else None,
        decode_min_side=config.data.decode_min_side,
    )
    # The stream gives every rank the same known number of micro-batches per epoch.
    max_steps = stage.max_steps or math.ceil(stage.epochs * datamodule.batches_per_epoch / accumulate)

    ckpt_path = stage_checkpoint(config.run_dir, name)
    resume = newest_checkpoint(ckpt_path.parent)  # last.ckpt or a SLURM requeue checkpoint hpc_ckpt_*.ckpt
    if resume is not None:
        done_steps = read_checkpoint(resume).get("global_step", 0)
        if done_steps >= max_steps:
            log.info("stage %s already finished (%d steps): loading %s", name, done_steps, resume)
            load_stage_weights(model, resume, name)
            return {"stage": name, "skipped": True, "steps": done_steps}
        log.info("resuming stage %s from %s (step %d of %d)", name, resume, done_steps, max_steps)

    log.info(
        "stage %s: %d optimizer steps, global batch %d = %d micro x %d accumulation x %d ranks, data %s (%d samples)",
        name,
        max_steps,
        stage.global_batch_size,
        stage.micro_batch_size,
        accumulate,
        ranks,
        data_dir,
        datamodule.index.num_samples,
    )
    plugins: list = [] if "deepspeed" in str(config.trainer.strategy) else [atomic_checkpoint_io()]
    cluster_callbacks = []
    if SLURMEnvironment.detect():
        # Lightning's SLURM environment (ranks, nodes, master address), with its own requeue handler off:
        # that one saves inside the signal handler, mid-step; ours saves at the next optimizer step.
        plugins.append(SLURMEnvironment(auto_requeue=False))
        if config.trainer.slurm_requeue and requeue is not None:
            cluster_callbacks.append(requeue_callback(requeue, ckpt_path.parent))
    checkpointing = ModelCheckpoint(
        dirpath=ckpt_path.parent,
        filename="step-{step}",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=stage.checkpoint_every_n_steps,
    )
    trainer = L.Trainer(
        accelerator=config.trainer.accelerator,
        devices=config.trainer.devices,
        num_nodes=config.trainer.num_nodes,
        strategy=config.trainer.strategy,
        precision=config.trainer.precision,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=config.trainer.gradient_clip_val,
        log_every_n_steps=config.trainer.log_every_n_steps,
        deterministic=config.trainer.deterministic,
        enable_progress_bar=config.trainer.progress_bar,
        default_root_dir=ckpt_path.parent,  # where Lightning looks for hpc_ckpt_*.ckpt
        plugins=plugins,
        logger=TensorBoardLogger(
            save_dir=config.run_dir, name="tensorboard", version=name, default_hp_metric=False
        ),
        callbacks=[
            checkpointing,
            LearningRateMonitor(logging_interval="step"),
            SkippedSamplesLogger(),
            *cluster_callbacks,
            *grounding_callbacks(config),
        ],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    if any(getattr(cb, "requeued", False) for cb in cluster_callbacks):
        raise Requeued(f"stage {name} saved a requeue checkpoint at step {trainer.global_step}")
    # ModelCheckpoint's save_last at train end is skipped when its last periodic save already set its
    # "last saved" flag (a step before the end), so last.ckpt is written here unless the periodic save
    # fell on the final step itself (at 7B scale a second write costs minutes of weights + optimizer state).
    # The callback's own record decides, not the file: every rank must reach the same answer (the save is a
    # collective under FSDP/DeepSpeed) even where nodes do not share a disk. Unknown record: save again.
    if getattr(checkpointing, "_last_global_step_saved", -1) != trainer.global_step:
        trainer.save_checkpoint(ckpt_path, weights_only=False)
    if trainer.is_global_zero:
        for old in ckpt_path.parent.glob("hpc_ckpt_*.ckpt"):  # superseded by last.ckpt
            old.unlink(missing_ok=True)
    loss = trainer.callback_metrics.get("train/loss")
    summary = {
        "stage": name,
        "steps": trainer.global_step,
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss": None if loss is None else round(float(loss), 4),
    }
    log.info("stage %s done: %s", name, summary)
    return summary


# ------------------------------------------------------------------------------ checkpoints and SLURM
class Requeued(Exception):
    """The stage saved a requeue checkpoint and asked SLURM to requeue the job; the process should end."""


class RequeueSignal:
    """Remembers that the SLURM requeue signal (SIGUSR1: ``sbatch --signal=USR1@90``) arrived.

    The handler only records the time; the training loop acts on it at the next optimizer step, where
    weights, optimizer state, accumulated gradients and the data position are consistent.
    """

    def __init__(self) -> None:
        self.received_at: float | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if self.received_at is None:
            self.received_at = time.time()
            print(f"train.py: requeue signal {signum} received at {self.received_at:.3f}", file=sys.stderr)

    @classmethod
    def install_if_slurm(cls, signum: int = signal.SIGUSR1) -> RequeueSignal | None:
        """Install the handler in a SLURM job step, first thing (USR1 kills a process without a handler).

        Detects a job step as Lightning's ``SLURMEnvironment.detect`` does, without importing Lightning.
        """
        if "SLURM_NTASKS" not in os.environ or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
            return None
        flag = cls()
        try:
            signal.signal(signum, flag)
        except ValueError:  # not the main thread: leave the signal to whoever runs us
            return None
        return flag


def newest_checkpoint(folder: Path) -> Path | None:
    """The most recently written of ``last.ckpt`` and the requeue checkpoints ``hpc_ckpt_*.ckpt``."""
    candidates = [p for p in (folder / "last.ckpt", *folder.glob("hpc_ckpt_*.ckpt")) if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


def atomic_checkpoint_io():  # noqa: ANN201  (a Lightning CheckpointIO; Lightning is imported lazily)
    """Checkpoint writing that a kill cannot corrupt: temp file in the same folder, fsync, os.replace."""
    import torch
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict, path: str | Path, storage_options: object = None) -> None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a process killed mid-save
                stale.unlink(missing_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            try:
                with open(tmp, "wb") as f:
                    torch.save(checkpoint, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)  # the rename itself survives a crash
            finally:
                os.close(folder)

    return AtomicCheckpointIO()


def requeue_callback(flag: RequeueSignal, folder: Path):  # noqa: ANN201  (a Lightning Callback)
    """Saves ``hpc_ckpt_<n>.ckpt`` and runs ``scontrol requeue`` at the first optimizer step after the signal."""
    import subprocess

    import lightning as L

    class RequeueAtStep(L.Callback):
        def __init__(self) -> None:
            self.requeued = False
            self.step_at_start = -1
            self.first_step_logged = False

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            self.step_at_start = trainer.global_step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            if trainer.global_step == self.step_at_start:
                return  # inside a gradient accumulation window
            if not self.first_step_logged:
                self.first_step_logged = True
                log.info(
                    "first optimizer step of this process done: step %d at %.3f",
                    trainer.global_step,
                    time.time(),
                )
            pending = flag.received_at is not None
            if trainer.world_size > 1:  # every rank must save at the same step
                pending = trainer.strategy.reduce_boolean_decision(pending, all=False)
            if not pending or self.requeued:
                return
            old = sorted(folder.glob("hpc_ckpt_*.ckpt"))
            number = 1 + max((int(p.stem.rsplit("_", 1)[1]) for p in old), default=0)
            path = folder / f"hpc_ckpt_{number}.ckpt"
            trainer.save_checkpoint(path)
            for logger in trainer.loggers:
                logger.save()
            self.requeued = True
            trainer.should_stop = True
            for checkpoint in trainer.checkpoint_callbacks:  # no second copy as last.ckpt at train end
                checkpoint.save_last = False
            if not trainer.is_global_zero:
                return
            for p in old:
                p.unlink(missing_ok=True)
            job = os.environ.get("SLURM_JOB_ID", "")
            if os.environ.get("SLURM_ARRAY_JOB_ID"):
                job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            log.info("saved %s at step %d; requeueing SLURM job %s", path, trainer.global_step, job)
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode:
                log.warning("scontrol requeue %s failed: %s", job, result.stderr.strip())

    return RequeueAtStep()


def grounding_callbacks(config) -> list:  # noqa: ANN001
    if not config.grounding.enabled:
        return []
    from grounding.callback import GroundingCallback

    return [GroundingCallback(config.grounding, Path(config.data.root), config.run_dir / "grounding")]


def run_qa_eval(config, model) -> dict | None:  # noqa: ANN001
    from lmm.qa_eval import evaluate_qa, load_questions

    qa = config.qa_eval
    if qa.questions is None:
        return None
    path = Path(qa.questions) if Path(qa.questions).is_absolute() else Path(config.data.root) / qa.questions
    questions, chance = load_questions(path)
    if qa.limit:
        questions = questions[: qa.limit]
    result = evaluate_qa(
        model,
        questions,
        path.parent,
        qa.template,
        qa.aspect,
        qa.batch_size,
        qa.max_new_tokens,
        progress=config.trainer.progress_bar,
    )
    result["chance"] = chance
    (config.run_dir / "qa_eval.json").write_text(json.dumps(result, indent=1))
    lines = [f"QA accuracy on {result['n']} held-out questions: {result['accuracy']:.3f}"]
    for kind, acc in result["per_kind"].items():
        ref = chance.get(kind)
        lines.append(f"  {kind:<10} {acc:.3f}" + (f"   (chance {ref:.3f})" if ref is not None else ""))
    lines.append("examples:")
    for r in result["results"][: qa.show]:
        lines.append(f"  Q: {r['question']}  A: {r['prediction']!r}  (ref {r['answer']!r})")
    log.info("\n".join(lines))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    requeue = RequeueSignal.install_if_slurm()
    from lmm.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    import lightning as L
    import torch

    from lmm.checkpoint import build_model
    from lmm.config import save_config

    setup_logging(config.run_dir)
    save_config(config, config.run_dir / "config.yaml")
    log.info("run directory %s", config.run_dir)
    torch.set_float32_matmul_precision("high")
    if config.trainer.num_threads:
        torch.set_num_threads(config.trainer.num_threads)
    L.seed_everything(config.seed, workers=True, verbose=False)
    if config.data.shapes is not None:
        from datamodules.shapes import ensure_world

        ensure_world(config.data.shapes, Path(config.data.root))

    if requeue is not None:
        log.info(
            "SLURM job %s, restart %s: SIGUSR1 saves a checkpoint at the next optimizer step and requeues",
            os.environ.get("SLURM_JOB_ID"),
            os.environ.get("SLURM_RESTART_COUNT", "0"),
        )
    start = time.perf_counter()
    model = build_model(config)
    try:
        summaries = [run_stage(config, model, name, requeue) for name in config.run_stages]
    except Requeued as done:
        log.info("%s; SLURM requeued the job, exiting", done)
        return 0
    qa = run_qa_eval(config, model)
    report = {"stages": summaries, "seconds": round(time.perf_counter() - start, 1)}
    if qa is not None:
        report["qa_accuracy"] = qa["accuracy"]
    (config.run_dir / "summary.json").write_text(json.dumps(report, indent=1))
    log.info("finished in %.1f s: %s", report["seconds"], json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
