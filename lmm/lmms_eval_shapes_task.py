"""The shapes world's held-out questions as a local lmms-eval task (``shapes_qa``), scored as ``lmm.qa_eval`` does.

``python -m lmm.lmms_eval_shapes_task --world data/shapes --out eval_tasks/`` writes ``shapes_qa.yaml`` and
``shapes_qa.jsonl`` (one document per question of ``val_qa.json``, its image as an absolute path); then

    lmms-eval --model emergent_grounding --model_args run=runs/shapes-default \\
        --tasks shapes_qa --include_path eval_tasks/ --output_path eval_out/

answers them through the plugin. The task asks exactly what the project's QA evaluation asks (the bare
question, the model's chat template added by the plugin, at most ``max_new_tokens`` greedy tokens, the reply
ending at the end-of-turn token) and scores with the same exact match after ``normalise_answer``, so its
``exact_match`` equals ``qa_eval.json``'s accuracy on the same questions. The functions below are what the
YAML's ``!function`` entries name; lmms-eval imports them from this module.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

TASK_NAME = "shapes_qa"

TASK_YAML = """\
# Written by lmm.lmms_eval_shapes_task: the shapes world's held-out questions ({n} of {source}).
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {task}.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function lmm.lmms_eval_shapes_task.doc_to_visual
doc_to_text: !function lmm.lmms_eval_shapes_task.doc_to_text
doc_to_target: answer
# As lmm.qa_eval: greedy, at most max_new_tokens, the reply ends at the end-of-turn token ("</s>" is never
# part of the decoded text, so no other stop string cuts it).
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  until: ["</s>"]
  do_sample: false
process_results: !function lmm.lmms_eval_shapes_task.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc: dict, results: Sequence[str]) -> dict[str, float]:
    from lmm.qa_eval import normalise_answer

    return {"exact_match": float(normalise_answer(results[0]) == normalise_answer(doc["answer"]))}


def write_shapes_task(
    questions: str | Path,
    out: str | Path,
    *,
    limit: int | None = None,
    max_new_tokens: int = 12,
    task: str = TASK_NAME,
) -> Path:
    """Write ``<out>/<task>.yaml`` and ``<out>/<task>.jsonl`` from a shapes-world question file; returns the YAML."""
    from lmm.qa_eval import load_questions

    questions = Path(questions)
    entries, _ = load_questions(questions)
    if limit is not None:
        entries = entries[:limit]
    if not entries:
        raise ValueError(f"{questions} holds no questions")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for entry in entries:
        image = (questions.parent / entry["image"]).resolve()
        if not image.is_file():
            raise FileNotFoundError(f"{questions}: image {entry['image']} does not exist ({image})")
        rows.append(
            {
                "image": str(image),
                "question": entry["question"],
                "answer": entry["answer"],
                "kind": entry.get("kind", "all"),
            }
        )
    (out / f"{task}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    yaml_path = out / f"{task}.yaml"
    yaml_path.write_text(
        TASK_YAML.format(task=task, n=len(rows), source=questions.name, max_new_tokens=max_new_tokens),
        encoding="utf-8",
    )
    return yaml_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmm.lmms_eval_shapes_task", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--world", type=Path, default=Path("data/shapes"), help="the shapes world folder")
    parser.add_argument("--questions", default="val_qa.json", help="question file, relative to --world")
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for the task (pass it as --include_path)"
    )
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=12, help="as qa_eval.max_new_tokens")
    args = parser.parse_args(argv)
    path = write_shapes_task(
        args.world / args.questions, args.out, limit=args.limit, max_new_tokens=args.max_new_tokens
    )
    print(f"wrote {path}; run lmms-eval with --tasks {TASK_NAME} --include_path {args.out}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
