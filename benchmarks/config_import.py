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


def import_seconds(code: str) -> float:
    """Cumulative import time of ``code``'s top-level imports, from ``-X importtime`` (seconds)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    total = 0
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if cumulative.strip().isdigit() and not name.startswith("  "):  # top level: one space of indent
            total += int(cumulative)
    return total / 1e6


def wall_seconds(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"| what | -X importtime, s (median of {args.runs}) | process wall, s (median) |")
    print("|---|---|---|")
    for label, code in TARGETS.items():
        imports = statistics.median(import_seconds(code) for _ in range(args.runs))
        wall = statistics.median(wall_seconds(code) for _ in range(args.runs))
        print(f"| {label} | {imports:.3f} | {wall:.2f} |")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "train.py", "stages.instruct.llm=lorra"], cwd=ROOT, capture_output=True, text=True
    )
    print(
        f"\n`python train.py stages.instruct.llm=lorra`: exit {proc.returncode} in {time.perf_counter() - start:.2f} s"
    )
    print(f"  {proc.stderr.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
