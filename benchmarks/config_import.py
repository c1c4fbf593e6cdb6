"""How long reading a config costs: the schema's import time against the model stack's, in fresh interpreters.

``python -X importtime`` reports each import's cumulative time; the table gives, per target, the cumulative
microseconds of the top-level imports it triggers (median over ``--runs`` fresh processes), and the wall time
of a whole ``load_config`` of the default config plus a bad value, which is what ``python train.py`` pays
before it can refuse a typo. Goal: the schema (``import lmm.config``) at most 1.0 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TARGETS = {
    "import lmm.config (the schema)": "import lmm.config",
    "load_config() (schema + OmegaConf + configs/default.yaml)": "from lmm.config_loading import load_config; load_config()",
    "import lmm.model (the model stack, for comparison)": "import lmm.model",
}


def import_seconds(code: str, root: Path) -> float:
    """Cumulative import time of ``code``'s top-level imports, from ``-X importtime`` (seconds)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    total = 0
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if cumulative.strip().isdigit() and not name.startswith("  "):  # top level: one space of indent
            total += int(cumulative)
    return total / 1e6


def wall_seconds(code: str, root: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--against",
        type=Path,
        help="another checkout (e.g. a git worktree of an older commit) measured side by side with this one",
    )
    parser.add_argument(
        "--train-timeout", type=float, default=120.0, help="stop a train.py that starts training"
    )
    args = parser.parse_args(argv)
    roots = {"this checkout": ROOT} | ({f"{args.against}": args.against.resolve()} if args.against else {})
    print(f"| checkout | what | -X importtime, s (median of {args.runs}) | process wall, s (median) |")
    print("|---|---|---|---|")
    for name, root in roots.items():
        for label, code in TARGETS.items():
            try:
                imports = statistics.median(import_seconds(code, root) for _ in range(args.runs))
                wall = statistics.median(wall_seconds(code, root) for _ in range(args.runs))
            except subprocess.CalledProcessError:
                print(f"| {name} | {label} | n/a (fails there) | |")
                continue
            print(f"| {name} | {label} | {imports:.3f} | {wall:.2f} |")
    for name, root in roots.items():
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "train.py", "stages.instruct.llm=lorra"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=args.train_timeout,
            )
            outcome = f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:160]}"
        except subprocess.TimeoutExpired:
            outcome = f"still training after {args.train_timeout:.0f} s: the typo was not refused (stopped)"
        seconds = time.perf_counter() - start
        print(f"\n{name}: `python train.py stages.instruct.llm=lorra` after {seconds:.1f} s: {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
