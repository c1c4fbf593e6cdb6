"""Which decoder layers ground? ``python -m grounding layer-sweep --run runs/<name> [--sets 0 1 -1 0,1]``.

Runs the training-time grounding evaluation of a trained run (its ``grounding:`` config and validation set:
attend-and-segment, GLaMM's GCG metrics, phrase pointing accuracy) once per layer setting: the mean over all
decoder layers (the reference), then each layer alone, or the comma-separated sets given with ``--sets``.
The validation set, phrase-similarity encoder and refiner are loaded once. Prints one table and writes
``--out`` (JSON, one record per setting).

The attend-and-segment options (``--peak``, ``--phrase-tokens``, ``--combine``, ...) change the run's settings
for every layer setting, and ``--limit 0`` takes every validation image, so a finished run can be re-evaluated
under other settings: ``--sets all --limit 0 --phrase-tokens chunk --combine mean`` is the mean over all layers
alone, on the whole set, with every word of a phrase averaged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from grounding.capture import select_layers
from grounding.commands.models import ModelLoadError, load_model
from grounding.commands.options import add_attend_arguments, attend_settings, describe
from grounding.evaluator import GroundingEvaluator

COLUMNS = ("pointing", "recall", "miou", "ap50")
THRESHOLD_COLUMNS = ("threshold_recall", "threshold_miou", "threshold_ap50")


def parse_sets(sets: list[str] | None, n_layers: int) -> list[list[int] | None]:
    """``None`` (all layers) first, then each ``--sets`` entry (``"0,1"``; ``all`` is the first one, so
    ``--sets all`` alone runs only it), or each single layer by default."""
    if not sets:
        return [None, *([i] for i in range(n_layers))]
    parsed: list[list[int] | None] = [None]
    for entry in sets:
        if entry == "all":
            continue
        try:
            parsed.append([int(x) for x in entry.split(",") if x.strip()])
        except ValueError:
            raise SystemExit(f"error: --sets entry {entry!r} is not comma-separated layer indices") from None
    return parsed


def sweep(
    run: Path,
    sets: list[str] | None,
    limit: int | None,
    device: str | None,
    options: argparse.Namespace | None = None,
    description_words: list[str] | None = None,
    threshold_also: float | None = None,
) -> list[dict[str, Any]]:
    """Records of the run's grounding evaluation per layer setting; ``limit`` 0: every image; ``options``: the
    attend-and-segment options given (``add_attend_arguments``), applied over the run's own settings;
    ``description_words``: ``["world"]`` or words that replace the run's ``grounding.description_words``."""
    if limit is not None and limit < 0:
        raise SystemExit(f"error: --limit must be >= 0 (0: every image), got {limit}")
    try:
        loaded = load_model(argparse.Namespace(run=run, device=device))
    except ModelLoadError as err:
        raise SystemExit(f"error: {err}") from None
    config = loaded.run_config  # the run's own grounding settings and data root
    grounding = config.grounding
    if options is not None:
        settings = attend_settings(options, grounding)
        grounding = dataclasses.replace(grounding, **dataclasses.asdict(settings))
    if limit is not None:
        grounding = dataclasses.replace(grounding, limit=limit or None)
    if description_words is not None:
        words = description_words[0] if description_words == ["world"] else description_words
        grounding = dataclasses.replace(grounding, description_words=words)
    if threshold_also is not None:
        try:
            grounding = dataclasses.replace(grounding, threshold_also=threshold_also)
        except ValueError as err:
            raise SystemExit(f"error: --threshold-also: {err}") from None
    print(f"settings: {describe(grounding.attend_settings())}; images: {grounding.limit or 'all'}")
    try:
        evaluator = GroundingEvaluator(grounding, Path(config.data.root))
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    problem = evaluator.description_words_problem()
    if problem is not None:
        raise SystemExit(f"error: {problem}")
    model = loaded.model
    n_layers = model.language_model.config.num_hidden_layers
    settings = parse_sets(sets, n_layers)
    for layers in settings:
        if layers is not None:
            try:
                select_layers(layers, n_layers)
            except ValueError as err:
                raise SystemExit(f"error: --sets: {err}") from None
    records = []
    for layers in tqdm(settings, desc="layer settings", unit="setting"):
        metrics = evaluator.metrics(evaluator.predict(model, layers=layers))
        records.append({"layers": "all" if layers is None else layers, **metrics})
    return records


def format_table(records: list[dict[str, Any]]) -> str:
    # The threshold refiner's masks beside the refiner's when the run scores them (grounding.threshold_also).
    columns = COLUMNS + tuple(c for c in THRESHOLD_COLUMNS if records and c in records[0])
    lines = [f"| {'layers':<12} | " + " | ".join(f"{c:>8}" for c in columns) + " |"]
    lines.append(f"|{'-' * 14}|" + "|".join("-" * (max(len(c), 8) + 2) for c in columns) + "|")
    for r in records:
        name = r["layers"] if r["layers"] == "all" else ",".join(map(str, r["layers"]))
        lines.append(f"| {name:<12} | " + " | ".join(f"{r[c]:>{max(len(c), 8)}.3f}" for c in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m grounding layer-sweep", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--run", required=True, type=Path, help="run directory (runs/<name>) of a trained LMM"
    )
    parser.add_argument(
        "--sets",
        nargs="+",
        default=None,
        metavar="L[,L...]",
        help="layer sets to try after all layers (default: each layer alone; 'all': only the mean over all); "
        "negative indices count from the end. argparse reads a set that starts with '-' and has a comma as an "
        "option: write 0,-1 rather than -1,0",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="images, 0 for all (default: the run's grounding.limit)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON records (default: RUN/grounding/layers.json)"
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--description-words",
        nargs="+",
        default=None,
        metavar="WORD",
        help="words that decide whether a description is right ('world': the shapes world's colours and "
        "kinds; default: the run's grounding.description_words)",
    )
    parser.add_argument(
        "--threshold-also",
        type=float,
        default=None,
        metavar="F",
        help="also score the threshold refiner's masks cut at F from the same maps and points "
        "(default: the run's grounding.threshold_also)",
    )
    add_attend_arguments(parser, "the run's grounding settings", exclude=("layers",))
    args = parser.parse_args(argv)
    out = args.out or args.run / "grounding" / "layers.json"
    try:  # before the work, not after it: a read-only run needs --out
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.with_name(f".{out.name}.probe")
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise SystemExit(f"error: cannot write {out} ({err.strerror}); pass --out") from None
    records = sweep(
        args.run, args.sets, args.limit, args.device, args, args.description_words, args.threshold_also
    )
    print(format_table(records))
    out.write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
