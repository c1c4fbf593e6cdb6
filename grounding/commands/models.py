"""Which model a grounding command runs: a run trained here (``--run``) or released weights (``--model``).

Every command that grounds images takes the same options and gets back a ``LoadedModel``: the
``GroundableModel``, the attend-and-segment settings its unset options default to (a run's own ``grounding:``
settings, which it was evaluated with; the paper's for released weights), and a record of what was loaded
for ``settings.json``. This module is where ``grounding`` meets ``lmm``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from grounding.commands.options import attend_settings, describe
from grounding.config import AttendConfig
from grounding.protocol import GroundableModel

#: Released models of the project's own class that ``--model`` loads: name -> what ``--weights`` names. The
#: transformers models of ``grounding.hf.registry`` (``hf-*``) load from their own folders.
PROJECT_RELEASES = {
    "llava-1.5": "the llava-v1.5-7b folder (LLaVA's original layout)",
    "difflmm": "the DiffLMM LoRA run folder (adapter + non_lora_trainables.bin)",
}
#: The prompt a transformers model gets by default: LLaVA-1.5's is the reference's conv_llava_v1; every other
#: model is prompted with its processor's own chat template, as the reference's later scripts do.
DEFAULT_TEMPLATES = {"hf-llava": "vicuna_v1"}
DTYPES = ("auto", "float32", "float16", "bfloat16")


class ModelLoadError(Exception):
    """A model that cannot be loaded as asked; the message is one line naming the file or option."""


@dataclasses.dataclass
class LoadedModel:
    model: GroundableModel
    #: What unset attend-and-segment options default to, and where that came from (for the help and logs).
    settings: AttendConfig
    settings_source: str
    #: What was loaded (model kind, folders, dtype...), recorded beside predictions.
    source: dict[str, Any]
    #: A trained run's config (its data root, grounding set), None for released weights.
    run_config: Any = None


def add_model_arguments(
    parser: argparse.ArgumentParser, released: bool = True, required: bool = True
) -> None:
    group = parser.add_argument_group("model")
    which = group.add_mutually_exclusive_group(required=required)
    which.add_argument("--run", type=Path, help="run directory (runs/<name>) of an LMM trained here")
    if released:
        from grounding.hf.registry import MODELS

        which.add_argument(
            "--model",
            choices=sorted(PROJECT_RELEASES) + sorted(MODELS),
            help="released weights: "
            + "; ".join(f"{k}: {v}" for k, v in PROJECT_RELEASES.items())
            + "; hf-*: a transformers model folder with its processor (grounding.hf.registry)",
        )
        group.add_argument("--weights", type=Path, help="--model's weight folder")
        group.add_argument(
            "--model-option",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="an hf-* model's own option, e.g. blocks=base (LLaVA-NeXT's base grid), blocks=thumbnail "
            "(InternVL), max_pixels=1003520 (Qwen); see grounding.hf.registry",
        )
        group.add_argument("--base", type=Path, default=None, help="difflmm: the base vicuna-7b-v1.5 folder")
        group.add_argument("--sd", type=Path, default=None, help="difflmm: the stable-diffusion-v1-5 folder")
        group.add_argument(
            "--clip",
            type=Path,
            default=None,
            help="llava-1.5 / difflmm: the clip-vit-large-patch14-336 folder",
        )
        group.add_argument(
            "--template",
            choices=("vicuna_v1", "chat"),
            default=None,
            help="hf models' prompt: vicuna_v1 (LLaVA's conv_llava_v1) or chat (the processor's chat template); "
            "default: vicuna_v1 for hf-llava, chat for the others",
        )
        group.add_argument(
            "--diffusion-noise",
            choices=("stochastic", "fixed"),
            default="stochastic",
            help="difflmm's features",
        )
        group.add_argument(
            "--dtype", choices=DTYPES, default="auto", help="auto: float16 on CUDA, else float32"
        )
        group.add_argument("--attn", default="sdpa", help="attention implementation of the language model")
    group.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def resolve_device(args: argparse.Namespace) -> None:
    """Fill in ``--device`` (and ``--dtype auto``) now, so what is recorded is what runs."""
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if getattr(args, "dtype", None) == "auto":
        args.dtype = "float16" if str(args.device).startswith("cuda") else "float32"


def load_model(args: argparse.Namespace, paper_settings: AttendConfig | None = None) -> LoadedModel:
    """The model ``args`` names (``--run`` or ``--model``), on ``args.device``."""
    resolve_device(args)
    if args.run is not None:
        return _load_run(args)
    if args.weights is None:
        raise ModelLoadError(f"--model {args.model} needs --weights")
    return _load_released(args, paper_settings or AttendConfig())


def model_source(args: argparse.Namespace) -> dict[str, Any]:
    """What ``args`` asks to load, with absolute paths: recorded beside predictions before anything loads."""
    if args.run is not None:
        return {"run": _absolute(args.run)}
    source = {
        "model": args.model,
        "weights": _absolute(args.weights),
        "base": _absolute(args.base),
        "sd": _absolute(args.sd),
        "clip": _absolute(args.clip),
        "dtype": args.dtype,
    }
    if args.model == "difflmm":
        source["diffusion_noise"] = args.diffusion_noise
    if args.model.startswith("hf-"):
        source["template"] = _template(args)
        source["model_options"] = _model_options(args)
    return source


def _template(args: argparse.Namespace) -> str:
    return args.template or DEFAULT_TEMPLATES.get(args.model, "chat")


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--model-option KEY=VALUE`` pairs, numbers read as numbers."""
    options: dict[str, Any] = {}
    for item in args.model_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ModelLoadError(f"--model-option {item!r} is not of the form KEY=VALUE")
        options[key] = int(value) if value.lstrip("-").isdigit() else value
    return options


def _load_run(args: argparse.Namespace) -> LoadedModel:
    from lmm.groundable import LMMGrounding
    from lmm.run_dir import RunDir, load_run

    run = Path(args.run)
    if not RunDir(run).config_file.is_file():
        raise ModelLoadError(f"--run {run} is not a run directory (no config.yaml)")
    model, config = load_run(run, map_location=args.device)
    last = config.stages[config.run_stages[-1]]
    return LoadedModel(
        model=LMMGrounding(model, template=last.template, aspect=last.aspect),
        settings=config.grounding.attend_settings(),
        settings_source=f"the run's grounding settings ({run / 'config.yaml'})",
        source=model_source(args),
        run_config=config,
    )


def load_with_settings(args: argparse.Namespace) -> tuple[LoadedModel, AttendConfig]:
    """The model ``args`` names and the attend-and-segment settings to run it with (its defaults, changed by
    the options given), printed so the user sees what ran; a bad option or model stops with one line."""
    try:
        loaded = load_model(args)
    except ModelLoadError as err:
        raise SystemExit(f"error: {err}") from None
    settings = attend_settings(args, loaded.settings)
    print(f"settings ({loaded.settings_source} unless given): {describe(settings)}")
    return loaded, settings


def _load_released(args: argparse.Namespace, settings: AttendConfig) -> LoadedModel:
    import torch

    dtype = getattr(torch, args.dtype)
    common = dict(dtype=dtype, device=args.device, attn_implementation=args.attn)
    if args.model != "difflmm" and (args.base is not None or args.sd is not None):
        raise ModelLoadError("--base and --sd are DiffLMM's (base Vicuna and SD-1.5 folders)")
    if args.model.startswith("hf-") and args.clip is not None:
        raise ModelLoadError(
            f"--clip is for llava-1.5 and difflmm; {args.model} folders hold their own tower"
        )
    source = model_source(args)
    if args.model.startswith("hf-"):
        from grounding.hf import registry
        from grounding.hf.llava import vicuna_v1_prompt

        prompt_format = vicuna_v1_prompt if source["template"] == "vicuna_v1" else None
        try:
            model: GroundableModel = registry.load(
                args.model, args.weights, prompt_format=prompt_format, **common, **source["model_options"]
            )
        except (FileNotFoundError, ValueError, TypeError) as err:
            raise ModelLoadError(str(err).splitlines()[0]) from None
    else:
        from lmm.groundable import LlavaGrounding
        from lmm.released.difflmm import load_difflmm
        from lmm.released.llava15 import load_llava15
        from lmm.released.weight_files import CheckpointError

        try:
            if args.model == "llava-1.5":
                lmm = load_llava15(args.weights, clip=args.clip, **common)
            else:
                lmm = load_difflmm(
                    args.weights,
                    base=args.base,
                    sd=args.sd,
                    clip=args.clip,
                    noise=args.diffusion_noise,
                    **common,
                )
        except (CheckpointError, FileNotFoundError) as err:
            raise ModelLoadError(str(err).splitlines()[0]) from None
        model = LlavaGrounding(lmm)
    return LoadedModel(model, settings, "the paper's settings", source)


def _absolute(path: Path | None) -> str | None:
    return None if path is None else str(Path(path).resolve())
