"""Train an LMM stage by stage: ``python train.py [--config FILE ...] [group=name ...] [dotted.key=value ...]``.

Without ``--config`` the embedded default (``configs/default.yaml``) runs: it generates the synthetic shapes
world if needed, then caption-pretrains and instruction-tunes a tiny LLaVA-style model on the CPU, and
answers held-out questions about unseen images. Each stage in ``run_stages`` gets its own Lightning Trainer,
TensorBoard logger and checkpoint folder under the fixed run directory ``runs/<run_name>/``. Rerunning the
same command resumes: a finished stage is loaded and skipped, an unfinished one continues from its
``last.ckpt``. The config is read and checked completely before anything is written or imported beyond it:
the schema checks every value, relative paths are made absolute (``lmm.run_paths``: the run directory then
works from any folder), ``lmm.preflight`` checks what the paths point at, and ``lmm.run_binding`` refuses a
rerun whose config would change what the run already trained, ``lmm.run_tokenizer`` one whose tokenizer folder
no longer holds the vocabulary the run trained over (the run keeps a copy). Each problem is one line; the exit
status is 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from lmm.slurm import Requeued, RequeueSignal

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


def setup_logging(log_file: Path) -> None:
    """Log to stderr and the run's ``train.log`` (replacing the handlers of an earlier ``main`` in-process)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr), logging.FileHandler(log_file)]
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in [h for h in root.handlers if getattr(h, "_train_py", False)]:
        root.removeHandler(h)
        h.close()
    for h in handlers:
        h.setFormatter(fmt)
        h._train_py = True  # type: ignore[attr-defined]
        root.addHandler(h)
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    requeue = RequeueSignal.install_if_slurm()  # first thing: SIGUSR1 kills a process without a handler
    from lmm.config_loading import ConfigError, load_config
    from lmm.preflight import preflight
    from lmm.run_binding import RunBindingError, check_run_binding, is_launch_rank_zero, record_invocation
    from lmm.run_paths import resolve_config_paths
    from lmm.run_tokenizer import TokenizerMismatch, check_run_tokenizer, snapshot_tokenizer

    try:
        config = resolve_config_paths(load_config(args.config, args.overrides), Path.cwd())
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    problems = preflight(config)
    for problem in problems:
        print(f"config error: {problem}", file=sys.stderr)
    if problems:
        return 2
    try:
        binding = check_run_binding(config)
        check_run_tokenizer(config)
    except (RunBindingError, TokenizerMismatch) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    import lightning as L
    import torch

    from lmm.build import build_model, with_initial_weights
    from lmm.qa_eval import run_qa_eval
    from lmm.run_dir import RunDir, load_trained_stages
    from lmm.run_summary import merge_stage_summaries, read_stage_summaries, write_summary
    from lmm.training import run_stage

    run = RunDir(config.run_dir)
    rank_zero = is_launch_rank_zero()
    setup_logging(run.log_file)
    config = with_initial_weights(config, run.init_dir)
    run.write_config(config)
    log.info("run directory %s", run.path)
    if rank_zero:
        record_invocation(run, binding, sys.argv[1:] if argv is None else list(argv))
    for key, (old, new) in binding.changed.items():
        log.info("config changed since the last invocation: %s = %r (was %r)", key, new, old)
    torch.set_float32_matmul_precision("high")
    if config.trainer.num_threads:
        torch.set_num_threads(config.trainer.num_threads)
    L.seed_everything(config.seed, workers=True, verbose=False)
    start = time.perf_counter()
    prepared = []
    if config.data.shapes is not None:
        from datamodules.shapes import ensure_world

        ensure_world(config.data.shapes, Path(config.data.root))
        prepared.append({"stage": "world", "seconds": round(time.perf_counter() - start, 1)})
    try:  # again: a world regenerated just now may have other words than the run trained with
        check_run_tokenizer(config)
    except TokenizerMismatch as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if rank_zero:
        snapshot_tokenizer(config)
    # In-world pretrained visual towers (encoder.pretrain): trained once into the tower cache, then reused.
    from lmm.towers import ensure_towers

    config, tower_stages = ensure_towers(config)
    prepared += tower_stages
    if tower_stages:
        run.write_config(config)  # now naming the cached tower files the encoder loads
        L.seed_everything(config.seed, workers=True, verbose=False)
    if requeue is not None:
        log.info(
            "SLURM job %s, restart %s: SIGUSR1 saves a checkpoint at the next optimizer step and requeues",
            os.environ.get("SLURM_JOB_ID"),
            os.environ.get("SLURM_RESTART_COUNT", "0"),
        )

    model = build_model(config, run.init_dir)
    summaries = []
    try:
        for i, name in enumerate(config.run_stages):
            summaries.append(run_stage(config, model, name, requeue))
            if config.trainer.strategy == "fsdp" and not summaries[-1].get("skipped"):
                # FSDP wrapped the model's modules in place; the next stage (freezing, LoRA) and the QA
                # evaluation need the plain model: rebuild it from the checkpoints, as load_run does.
                model, _ = load_trained_stages(config, run, config.run_stages[: i + 1])
    except Requeued as done:
        log.info("%s; SLURM requeued the job, exiting", done)
        return 0
    if not rank_zero:  # the evaluation and the summary are rank 0's
        return 0
    qa = run_qa_eval(config, model)
    stages = merge_stage_summaries(read_stage_summaries(run.summary_file), prepared + summaries)
    report = {"stages": stages, "seconds": round(time.perf_counter() - start, 1)}
    if qa is not None:
        report["qa_accuracy"] = qa["accuracy"]
    write_summary(run.summary_file, report)
    log.info("finished in %.1f s: %s", report["seconds"], json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
