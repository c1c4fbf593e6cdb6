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
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


def run_stage(config, model, name: str) -> dict:  # noqa: ANN001  (types imported lazily below)
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from datamodules.shards import ShardDataModule, SkippedSamplesLogger
    from lmm.checkpoint import load_stage_weights, read_checkpoint, stage_checkpoint
    from lmm.preprocess import SampleEncoder, collate
    from lmm.templates import get_template

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
    encode = SampleEncoder(
        model.llm.tokenizer,
        get_template(stage.template),
        model.encoder.num_tokens,
        stage.max_length,
        model.encoder.image_transform(stage.aspect),
    )
    datamodule = ShardDataModule(
        data_dir,
        encode,
        partial(collate, pad_token_id=model.llm.tokenizer.pad_token_id),
        stage.micro_batch_size,
        num_workers=config.data.num_workers,
        seed=config.seed,
        shuffle_buffer=config.data.shuffle_buffer,
    )
    max_steps = stage.max_steps or math.ceil(
        stage.epochs * datamodule.index.num_samples / stage.global_batch_size
    )

    ckpt_path = stage_checkpoint(config.run_dir, name)
    if ckpt_path.is_file():
        done_steps = read_checkpoint(ckpt_path).get("global_step", 0)
        if done_steps >= max_steps:
            log.info("stage %s already finished (%d steps): loading %s", name, done_steps, ckpt_path)
            load_stage_weights(model, ckpt_path, name)
            return {"stage": name, "skipped": True, "steps": done_steps}
        log.info("resuming stage %s from %s (step %d of %d)", name, ckpt_path, done_steps, max_steps)

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
        default_root_dir=config.run_dir,
        logger=TensorBoardLogger(
            save_dir=config.run_dir, name="tensorboard", version=name, default_hp_metric=False
        ),
        callbacks=[
            ModelCheckpoint(
                dirpath=ckpt_path.parent,
                filename="step-{step}",
                save_last=True,
                save_top_k=0,
                every_n_train_steps=stage.checkpoint_every_n_steps,
            ),
            LearningRateMonitor(logging_interval="step"),
            SkippedSamplesLogger(),
        ],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(
        model, datamodule=datamodule, ckpt_path=ckpt_path if ckpt_path.is_file() else None, weights_only=True
    )
    trainer.save_checkpoint(ckpt_path, weights_only=False)
    loss = trainer.callback_metrics.get("train/loss")
    summary = {
        "stage": name,
        "steps": trainer.global_step,
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss": None if loss is None else round(float(loss), 4),
    }
    log.info("stage %s done: %s", name, summary)
    return summary


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
    L.seed_everything(config.seed, workers=True, verbose=False)
    if config.data.shapes is not None:
        from datamodules.shapes import ensure_world

        ensure_world(config.data.shapes, Path(config.data.root))

    start = time.perf_counter()
    model = build_model(config)
    summaries = [run_stage(config, model, name) for name in config.run_stages]
    qa = run_qa_eval(config, model)
    report = {"stages": summaries, "seconds": round(time.perf_counter() - start, 1)}
    if qa is not None:
        report["qa_accuracy"] = qa["accuracy"]
    (config.run_dir / "summary.json").write_text(json.dumps(report, indent=1))
    log.info("finished in %.1f s: %s", report["seconds"], json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
