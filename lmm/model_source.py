"""One loaded model named by where it comes from: a run directory of this project or a released checkpoint.

The evaluation plugin and the exporter both take a model from the command line as either ``run=runs/NAME``
(a trained run: its config rebuilds the model, its stage checkpoints the weights) or a released checkpoint
that the project loads (LLaVA-1.5: weights folder + CLIP tower folder; DiffLMM: LoRA run folder + base
Vicuna + SD-1.5 + CLIP folders). ``LoadedModel`` carries the model with the chat template and image aspect
it was instruction-tuned with, and whether inputs must be prepared as LLaVA's reference code does (released
checkpoints are, so their benchmark numbers are comparable with the published ones).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lmm.model import LMM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class LoadedModel:
    model: LMM
    template: str
    aspect: str
    reference: bool  # prepare inputs as LLaVA's reference code does (released checkpoints)
    description: str


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """``auto``/None: float16 on CUDA (the precision LLaVA evaluates in), float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {['auto', *DTYPES]}")
    return DTYPES[dtype]


def load_model_source(
    *,
    run: str | Path | None = None,
    llava15: str | Path | None = None,
    difflmm: str | Path | None = None,
    clip: str | Path | None = None,
    base: str | Path | None = None,
    sd: str | Path | None = None,
    noise: str = "stochastic",
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = "auto",
) -> LoadedModel:
    """Load exactly one of ``run``, ``llava15`` (with ``clip``) or ``difflmm`` (with ``base``, ``sd``, ``clip``)."""
    named = {k: v for k, v in {"run": run, "llava15": llava15, "difflmm": difflmm}.items() if v is not None}
    if len(named) != 1:
        raise ValueError(
            f"name exactly one model: run=DIR, llava15=WEIGHTS (with clip=) or difflmm=WEIGHTS (with base=, sd=, "
            f"clip=); got {sorted(named) or 'none'}"
        )
    if run is not None and any(x is not None for x in (clip, base, sd)):
        raise ValueError("clip/base/sd name a released checkpoint's towers; a run's config already has them")
    if llava15 is not None and any(x is not None for x in (base, sd)):
        raise ValueError("base/sd belong to difflmm=; llava15= takes weights and clip only")
    for name, path in {**named, "clip": clip, "base": base, "sd": sd}.items():
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{name}={path} does not exist")
    torch_dtype = resolve_dtype(dtype, device)
    if run is not None:
        from lmm.run_dir import load_run

        model, config = load_run(run, map_location=device)
        last = config.stages[config.run_stages[-1]]
        return LoadedModel(
            model.to(dtype=torch_dtype).eval(), last.template, last.aspect, False, f"run {Path(run)}"
        )
    from lmm.released.difflmm import load_difflmm
    from lmm.released.llava15 import load_llava15

    if llava15 is not None:
        model = load_llava15(llava15, clip, dtype=torch_dtype, device=device)
        description = f"LLaVA-1.5 {Path(llava15)}"
    else:
        model = load_difflmm(difflmm, base, sd, clip, dtype=torch_dtype, device=device, noise=noise)
        description = f"DiffLMM {Path(difflmm)}"
    return LoadedModel(model, model.stage.template, model.stage.aspect, True, description)
