"""The paper's general-VQA table beside the measured one, from lmms-eval result files.

    python -m lmm.vqa_table tasks                       # the lmms-eval task list of the table
    lmms-eval --model emergent_grounding --model_args run=runs/NAME,multi_image=middle \\
        --tasks $(python -m lmm.vqa_table tasks) --batch_size 8 --output_path eval_out/
    python -m lmm.vqa_table table --results eval_out/    # measured vs published

The published numbers are LLaVA-1.5-7B's (full fine-tuning and LoRA, Vicuna-7B-v1.5), from the LLaVA-v1.5
table of ``docs/MODEL_ZOO.md`` in ``haotian-liu/LLaVA`` (commit 19d8945); the DiffLMM paper's own VQA table
(arXiv 2410.08209) is not in the reference repository (``Shengcao-Cao/groundLMM``'s README has no numbers),
so it is not reproduced here. Each row says where the measurement differs from the published protocol:
VQAv2 and VizWiz were published on their test servers' splits (lmms-eval's ``*_test`` tasks write submission
files; the table measures the validation splits), MMBench on its test split (dev here, with lmms-eval's
static answer matching, no OpenAI key), LLaVA-Bench and MM-Vet need a GPT-4 judge (an OpenAI key).
``shapes_qa`` (``lmm.lmms_eval_shapes_task``) is the project's own held-out set and has no published number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

SOURCE = "haotian-liu/LLaVA docs/MODEL_ZOO.md, LLaVA-v1.5 table (commit 19d8945)"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One column of the published table and how lmms-eval measures it."""

    name: str
    tasks: tuple[str, ...]  # lmms-eval tasks; several are averaged (POPE's three splits)
    metric: str  # metric key in lmms-eval's results, without the ",filter" suffix
    scale: float  # lmms-eval's value x scale = the published unit
    llava15_7b: float | None  # full fine-tuning, liuhaotian/llava-v1.5-7b
    llava15_7b_lora: float | None  # liuhaotian/llava-v1.5-7b-lora
    note: str = ""


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "VQAv2", ("vqav2_val",), "exact_match", 100, 78.5, 79.1, "published: test-dev (server); measured: val"
    ),
    Benchmark("GQA", ("gqa",), "exact_match", 100, 62.0, 63.0, "testdev-balanced, as published"),
    Benchmark(
        "VizWiz",
        ("vizwiz_vqa_val",),
        "exact_match",
        100,
        50.0,
        47.8,
        "published: test-dev (server); measured: val",
    ),
    Benchmark(
        "SQA-IMG", ("scienceqa_img",), "exact_match", 100, 66.8, 68.4, "ScienceQA test, image questions"
    ),
    Benchmark("TextVQA", ("textvqa_val",), "exact_match", 100, 58.2, 58.2, "val, as published"),
    Benchmark(
        "POPE",
        ("pope_random", "pope_pop", "pope_adv"),
        "pope_f1_score",
        100,
        85.9,
        86.4,
        "F1, mean of the random / popular / adversarial splits as LLaVA reports",
    ),
    Benchmark("MME", ("mme",), "mme_perception_score", 1, 1510.7, 1476.9, "perception score"),
    Benchmark(
        "MMBench",
        ("mmbench_en_dev_static",),
        "gpt_eval_score",
        1,
        64.3,
        66.1,
        "published: test (server); measured: dev, static answer matching",
    ),
    Benchmark(
        "MMBench-CN",
        ("mmbench_cn_dev",),
        "gpt_eval_score",
        1,
        58.3,
        58.9,
        "published: test; dev needs an OpenAI key",
    ),
    Benchmark(
        "SEED",
        ("seedbench",),
        "seed_all",
        100,
        58.6,
        60.1,
        "image + video questions, a video by its middle frame (run with multi_image=middle)",
    ),
    Benchmark(
        "LLaVA-Bench-Wild",
        ("llava_in_the_wild",),
        "gpt_eval_llava_all",
        1,
        65.4,
        67.9,
        "GPT-4 judge (OpenAI key)",
    ),
    Benchmark("MM-Vet", ("mmvet",), "gpt_eval_score", 1, 31.1, 30.2, "GPT-4 judge (OpenAI key)"),
    Benchmark("MMStar", ("mmstar",), "average", 100, None, None, "not in LLaVA's table"),
    Benchmark(
        "Shapes QA", ("shapes_qa",), "exact_match", 100, None, None, "this project's held-out questions"
    ),
)


def task_list(benchmarks: Sequence[Benchmark] = BENCHMARKS, include_shapes: bool = False) -> list[str]:
    """The lmms-eval tasks of the table, in order (the shapes task only on request: it needs --include_path)."""
    return [t for b in benchmarks if include_shapes or b.name != "Shapes QA" for t in b.tasks]


def read_results(folder: str | Path) -> dict[str, dict[str, float]]:
    """Every ``*_results.json`` under ``folder`` (lmms-eval's ``--output_path``) -> {task: {metric: value}};
    for a task measured more than once, the newest file wins. Metric keys lose their ``,filter`` suffix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--results {folder} is not a folder")
    files = sorted(folder.rglob("*_results.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no lmms-eval *_results.json under {folder}")
    measured: dict[str, dict[str, float]] = {}
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        results = data.get("results")
        if not isinstance(results, Mapping):
            raise ValueError(f"{path}: no 'results' object (not an lmms-eval results file)")
        for task, metrics in results.items():
            values = {}
            for key, value in metrics.items():
                name, _, _ = key.partition(",")
                if (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and not name.endswith("_stderr")
                ):
                    values.setdefault(name, float(value))
            measured[task] = values
    return measured


def measured_value(benchmark: Benchmark, measured: Mapping[str, Mapping[str, float]]) -> float | None:
    """The benchmark's number in the published unit, or None unless every one of its tasks was measured."""
    values = [measured.get(task, {}).get(benchmark.metric) for task in benchmark.tasks]
    if any(v is None for v in values):
        return None
    return sum(values) / len(values) * benchmark.scale


def format_table(measured: Mapping[str, Mapping[str, float]], label: str = "measured") -> str:
    """A Markdown table: benchmark, measured, LLaVA-1.5-7B (full, LoRA), lmms-eval tasks, note."""

    def cell(value: float | None) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.1f}"

    rows = [
        f"| benchmark | {label} | LLaVA-1.5-7B | LLaVA-1.5-7B (LoRA) | lmms-eval task (metric) | note |",
        "|---|---|---|---|---|---|",
    ]
    for b in BENCHMARKS:
        rows.append(
            f"| {b.name} | {cell(measured_value(b, measured))} | {cell(b.llava15_7b)} | {cell(b.llava15_7b_lora)} "
            f"| {', '.join(b.tasks)} ({b.metric}) | {b.note} |"
        )
    rows.append(f"\nPublished numbers: {SOURCE}.")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmm.vqa_table", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tasks = sub.add_parser("tasks", help="print the table's lmms-eval tasks, comma-separated")
    tasks.add_argument("--shapes", action="store_true", help="add shapes_qa (needs --include_path)")
    table = sub.add_parser("table", help="print measured vs published from lmms-eval result files")
    table.add_argument("--results", type=Path, required=True, help="lmms-eval --output_path folder")
    table.add_argument("--label", default="measured", help="column title for the measured model")
    args = parser.parse_args(argv)
    if args.command == "tasks":
        print(",".join(task_list(include_shapes=args.shapes)))
        return 0
    print(format_table(read_results(args.results), args.label))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
