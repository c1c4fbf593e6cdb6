"""Question-answering accuracy of a trained LMM on held-out image questions (exact match, per kind).

The shapes world writes ``val_qa.json``: questions about held-out images with short canonical answers and
a kind (colour, shape, count, ...). The instructed model answers them greedily in batches; an answer is
right when it equals the reference after lower-casing and dropping punctuation. The result is compared
with the chance level of each kind, which the world also records.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from datamodules.templates import get_template
from lmm.config import TrainConfig
from lmm.model import LMM
from lmm.run_dir import RunDir

log = logging.getLogger(__name__)


def normalise_answer(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def load_questions(path: Path) -> tuple[list[dict], dict[str, float]]:
    """Returns (questions, chance accuracy per kind). Accepts a list or {"questions": [...], "chance": {...}}."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"question file {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"question file {path} is not valid JSON ({err})") from None
    questions = data.get("questions", []) if isinstance(data, dict) else data
    chance = data.get("chance", {}) if isinstance(data, dict) else {}
    for q in questions:
        missing = {"image", "question", "answer"} - q.keys()
        if missing:
            raise ValueError(f"question file {path}: an entry lacks {sorted(missing)}")
    return questions, chance


def evaluate_qa(
    model: LMM,
    questions: Sequence[dict],
    image_root: Path,
    template: str = "vicuna_v1",
    aspect: str = "pad",
    batch_size: int = 32,
    max_new_tokens: int = 12,
    progress: bool = True,
) -> dict[str, Any]:
    """Answer every question; returns accuracy overall and per kind plus every (question, answer, reference)."""
    chat = get_template(template)
    transform = model.encoder.image_transform(aspect)
    results = []
    for start in tqdm(range(0, len(questions), batch_size), desc="qa eval", disable=not progress):
        chunk = questions[start : start + batch_size]
        images = [transform(Image.open(Path(image_root) / q["image"]).convert("RGB")) for q in chunk]
        prompts = [chat.prompt(q["question"], has_image=True) for q in chunk]
        answers = model.generate(prompts, images, max_new_tokens=max_new_tokens)
        for q, answer in zip(chunk, answers, strict=True):
            right = normalise_answer(answer) == normalise_answer(q["answer"])
            results.append({**q, "prediction": answer, "correct": right})
    per_kind: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        per_kind[r.get("kind", "all")].append(r["correct"])
    return {
        "accuracy": sum(r["correct"] for r in results) / max(len(results), 1),
        "per_kind": {k: sum(v) / len(v) for k, v in sorted(per_kind.items())},
        "n": len(results),
        "results": results,
    }


def run_qa_eval(config: TrainConfig, model: LMM) -> dict | None:
    """``qa_eval:`` of a run config after training: accuracy per kind, written to ``qa_eval.json`` and logged."""
    qa = config.qa_eval
    if qa.questions is None:
        return None
    path = Path(qa.questions) if Path(qa.questions).is_absolute() else Path(config.data.root) / qa.questions
    questions, chance = load_questions(path)
    if qa.limit:
        questions = questions[: qa.limit]
    result = evaluate_qa(
        model,
        questions,
        path.parent,
        qa.template,
        qa.aspect,
        qa.batch_size,
        qa.max_new_tokens,
        progress=config.trainer.progress_bar,
    )
    result["chance"] = chance
    RunDir(config.run_dir).qa_file.write_text(json.dumps(result, indent=1))
    lines = [f"QA accuracy on {result['n']} held-out questions: {result['accuracy']:.3f}"]
    for kind, acc in result["per_kind"].items():
        ref = chance.get(kind)
        lines.append(f"  {kind:<10} {acc:.3f}" + (f"   (chance {ref:.3f})" if ref is not None else ""))
    lines.append("examples:")
    for r in result["results"][: qa.show]:
        lines.append(f"  Q: {r['question']}  A: {r['prediction']!r}  (ref {r['answer']!r})")
    log.info("\n".join(lines))
    return result
