"""The encoder ablation: ``python -m lmm.ablation [--towers pretrained|random] [--encoders clip fused]
[--seeds 0 1 2] [key=value ...]``.

Trains the embedded default (``python train.py``) once per encoder and seed and reports, per encoder, the mean
and sample standard deviation over seeds of the final grounding metrics on the shapes world's validation set
(pointing accuracy, mask recall, mIoU, AP50, description accuracy), held-out QA accuracy and wall time, plus
the difference of the means (fused - clip) with its standard error. By default (``--towers pretrained``, the
paper's setting) ``clip`` selects ``encoder=clip_conv_pretrained`` (the embedded default's convolutional CLIP
tower, pretrained in-world) and ``fused`` ``encoder=fused_tiny_pretrained`` (DiffLMM's U-Net + CLIP features,
with the same CLIP tower and an in-world VAE and U-Net); ``--towers random`` selects ``clip_tiny`` and
``fused_tiny``, frozen random ViT towers. A seed sets the
run's ``seed`` (data order and the projector's initialisation) and ``llm.init_seed``; the towers are the same
for every seed (random ones from their fixed ``init_seed``; pretrained ones trained once into the tower cache,
which every run shares), so the spread is that of the LMM's training, not of the towers'. Extra
``key=value`` arguments go to every run. Each run keeps its own run directory
(``runs/<prefix>-<encoder>-s<seed>``); a rerun skips runs that finished (their ``summary.json`` exists) and
resumes the others. Results go to ``runs/<prefix>/results.json`` and ``table.md`` (the means, then one row per run
with the torch threads it trained with: wall times compare only at equal threads).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: towers -> encoder name -> the overrides that select it on top of configs/default.yaml. ``random``: frozen
#: random towers; ``pretrained``: towers pretrained in-world (cached, shared by every run), as the default's.
TOWERS: dict[str, dict[str, list[str]]] = {
    "random": {"clip": ["encoder=clip_tiny"], "fused": ["encoder=fused_tiny"]},
    "pretrained": {"clip": ["encoder=clip_conv_pretrained"], "fused": ["encoder=fused_tiny_pretrained"]},
}
ENCODERS = tuple(TOWERS["random"])
#: (key in a run's results, column title).
METRICS: tuple[tuple[str, str], ...] = (
    ("pointing", "pointing"),
    ("recall", "mask recall"),
    ("miou", "mIoU"),
    ("ap50", "AP50"),
    ("qa", "QA"),
    ("description", "description"),
    ("seconds", "wall (s)"),
)


@dataclasses.dataclass(frozen=True)
class AblationRun:
    encoder: str
    seed: int
    run_name: str
    overrides: tuple[str, ...]


def plan_runs(
    encoders: Sequence[str],
    seeds: Sequence[int],
    overrides: Sequence[str] = (),
    prefix: str = "ablation",
    towers: str = "pretrained",
) -> list[AblationRun]:
    """One run per (encoder, seed), encoders outermost."""
    if towers not in TOWERS:
        raise ValueError(f"unknown towers {towers!r}; expected one of {sorted(TOWERS)}")
    unknown = [e for e in encoders if e not in ENCODERS]
    if unknown:
        raise ValueError(f"unknown encoders {unknown}; expected some of {sorted(ENCODERS)}")
    owned = [o for o in overrides if o.partition("=")[0] in ("run_name", "seed", "llm.init_seed", "encoder")]
    if owned:
        raise ValueError(f"overrides {owned} would replace what the ablation sets per run; leave them out")
    runs = []
    for encoder in encoders:
        for seed in seeds:
            name = f"{prefix}-{encoder}-s{seed}"
            args = (
                *TOWERS[towers][encoder],
                f"run_name={name}",
                f"seed={seed}",
                f"llm.init_seed={seed}",
                *overrides,
            )
            runs.append(AblationRun(encoder, seed, name, args))
    return runs


def collect(run_dir: Path) -> dict[str, Any]:
    """A finished run's results: the last grounding evaluation, QA accuracy, and the run's wall time (towers
    it trained itself excluded: they are the cache's, shared by all runs) with the torch threads it ran at."""
    from lmm.run_dir import RunDir

    run = RunDir(run_dir)
    summary = json.loads(run.summary_file.read_text())
    history = json.loads((run.grounding_dir / "metrics.json").read_text())
    if not history:
        raise ValueError(f"{run_dir}: the grounding history is empty")
    last = history[-1]
    towers = sum(
        s.get("seconds", 0.0) for s in summary["stages"] if str(s.get("stage", "")).startswith("tower:")
    )
    result = {key: last.get(key) for key, _ in METRICS if key in last}
    result["qa"] = summary.get("qa_accuracy")
    result["seconds"] = round(summary["seconds"] - towers, 1)
    result["tower_seconds"] = round(towers, 1)
    result["qa_per_kind"] = (
        json.loads(run.qa_file.read_text()).get("per_kind", {}) if run.qa_file.is_file() else {}
    )
    # The run's own threads, not the ablation's: the binding check that let it be reused ignores them.
    result["threads"] = run.read_config().trainer.num_threads
    return result


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, tuple[float, float]]]:
    """encoder -> metric -> (mean, std) over its runs."""
    out = {}
    for encoder, rows in results.items():
        out[encoder] = {
            key: mean_std([r[key] for r in rows])
            for key, _ in METRICS
            if rows and all(r.get(key) is not None for r in rows)
        }
    return out


def difference(
    results: dict[str, list[dict[str, Any]]], key: str, a: str = "fused", b: str = "clip"
) -> tuple[float, float] | None:
    """mean(a) - mean(b) for ``key`` and its standard error sqrt(s_a^2 / n_a + s_b^2 / n_b)."""
    if a not in results or b not in results:
        return None
    (ma, sa), (mb, sb) = mean_std([r[key] for r in results[a]]), mean_std([r[key] for r in results[b]])
    return ma - mb, math.sqrt(sa**2 / len(results[a]) + sb**2 / len(results[b]))


def format_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """A markdown table: per encoder, mean ± std over seeds of every metric, then fused - clip."""
    stats = summarize(results)
    header = "| encoder | runs | " + " | ".join(title for _, title in METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 2)]
    for encoder, rows in results.items():
        cells = []
        for key, _ in METRICS:
            if key not in stats[encoder]:
                cells.append("-")
                continue
            mean, std = stats[encoder][key]
            digits = _digits(key)
            # One run has no spread to show: a 0 would read as "no variation", so say there is none to measure.
            spread = f"{std:.{digits}f}" if len(rows) > 1 else "n/a"
            cells.append(f"{mean:.{digits}f} ± {spread}")
        lines.append(f"| {encoder} | {len(rows)} | " + " | ".join(cells) + " |")
    diffs = []
    for key, title in METRICS[:-1]:
        d = difference(results, key)
        if d is not None:
            one_run = min(len(results["fused"]), len(results["clip"])) < 2
            diffs.append(f"{title} {d[0]:+.3f} (s.e. {'n/a: one run' if one_run else f'{d[1]:.3f}'})")
    if diffs:
        lines += ["", "fused - clip: " + ", ".join(diffs)]
    lines += ["", *format_runs(results)]
    return "\n".join(lines)


def format_runs(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One markdown row per run, with the torch threads it trained with: wall times are only comparable at
    equal thread counts (and machine load), which the means above cannot show."""
    header = "| encoder | seed | " + " | ".join(title for _, title in METRICS) + " | threads |"
    lines = [header, "|" + "---|" * (len(METRICS) + 3)]
    for encoder, rows in results.items():
        for row in rows:
            cells = ["-" if row.get(key) is None else f"{row[key]:.{_digits(key)}f}" for key, _ in METRICS]
            lines.append(f"| {encoder} | {row['seed']} | " + " | ".join(cells) + f" | {row['threads']} |")
    return lines


def _digits(key: str) -> int:
    return 0 if key == "seconds" else 3


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmm.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=ENCODERS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--towers",
        default="pretrained",
        choices=sorted(TOWERS),
        help="frozen random or in-world pretrained towers",
    )
    parser.add_argument("--out", type=Path, default=None, help="results.json and table.md (runs/<prefix>/)")
    parser.add_argument(
        "--prefix", default=None, help="run names: <prefix>-<encoder>-s<seed> (ablation[-pretrained])"
    )
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for every run (e.g. runs_dir=...)")
    argv = list(sys.argv[1:] if argv is None else argv)
    # key=value arguments may follow a list option (``--seeds 0 1 trainer.num_threads=1``), which would take them.
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prefix is None:
        args.prefix = "ablation" if args.towers == "random" else f"ablation-{args.towers}"
    if args.out is None:
        args.out = Path("runs") / args.prefix
    from lmm.config_loading import ConfigError, load_config
    from lmm.run_binding import RunBindingError, check_run_binding
    from lmm.run_paths import resolve_config_paths

    try:  # every run's config is checked before the first one starts
        runs = plan_runs(args.encoders, args.seeds, args.overrides, args.prefix, args.towers)
        configs = {run.run_name: load_config(None, list(run.overrides)) for run in runs}
        for config in configs.values():
            # A finished run is reused only if it was trained with what the ablation asks for now (the default
            # may have changed since): the same check train.py makes before continuing a run.
            check_run_binding(resolve_config_paths(config, Path.cwd()))
    except (ConfigError, ValueError, RunBindingError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        run_dir = configs[run.run_name].run_dir
        if not (run_dir / "summary.json").is_file():
            print(f"[ablation] {run.run_name}: python train.py {' '.join(run.overrides)}", flush=True)
            code = subprocess.call([sys.executable, str(ROOT / "train.py"), *run.overrides])
            if code != 0:
                print(f"[ablation] {run.run_name} failed with exit status {code}", file=sys.stderr)
                return code
        else:
            print(f"[ablation] {run.run_name}: finished before, reusing {run_dir}", flush=True)
        row = {"seed": run.seed, "run": str(run_dir), **collect(run_dir)}
        results.setdefault(run.encoder, []).append(row)
    table = format_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"runs": results, "seconds": round(time.perf_counter() - start, 1)}, indent=1)
    )
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
