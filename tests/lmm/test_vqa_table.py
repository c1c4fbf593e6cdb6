"""The measured-vs-published VQA table read from lmms-eval result files (layout as lmms-eval writes them)."""

import json
import os

import pytest

from lmm.vqa_table import BENCHMARKS, main, read_results, task_list


def write_results(path, results, mtime):
    """An lmms-eval ``<date>_results.json``: per task ``"metric,filter"`` keys, stderr entries and an alias."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        task: {
            "alias": task,
            **{f"{k},none": v for k, v in metrics.items()},
            **{f"{k}_stderr,none": 0.01 for k in metrics},
        }
        for task, metrics in results.items()
    }
    path.write_text(json.dumps({"results": body, "config": {"model": "emergent_grounding"}}))
    os.utime(path, (mtime, mtime))


def row(table, name):
    line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.split("|")[1:-1]]


def test_table_scales_averages_and_prefers_the_newest_file(tmp_path, capsys):
    old = tmp_path / "out" / "emergent_grounding" / "2026-01-01_results.json"
    new = tmp_path / "out" / "emergent_grounding" / "2026-01-02_results.json"
    write_results(old, {"gqa": {"exact_match": 0.1}, "mme": {"mme_perception_score": 1200.0}}, 1_000)
    write_results(
        new,
        {
            "gqa": {"exact_match": 0.6126},
            "pope_random": {"pope_f1_score": 0.80},
            "pope_pop": {"pope_f1_score": 0.90},
            "pope_adv": {"pope_f1_score": 0.85},
            "shapes_qa": {"exact_match": 0.5},
            "vqav2_val": {"exact_match": 0.7},
        },
        2_000,
    )
    assert main(["table", "--results", str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    assert row(table, "GQA")[:4] == ["GQA", "61.3", "62.0", "63.0"]  # 0.6126 x 100, newest file
    assert row(table, "POPE")[1] == "85.0"  # mean of the three splits' F1
    assert row(table, "MME")[1:3] == ["1200.0", "1510.7"]  # only the older file measured MME
    assert row(table, "Shapes QA")[1:4] == ["50.0", "-", "-"]
    assert row(table, "MM-Vet")[1] == "-"
    assert "MODEL_ZOO.md" in table


def test_a_benchmark_needs_all_its_tasks(tmp_path):
    write_results(tmp_path / "r" / "x_results.json", {"pope_random": {"pope_f1_score": 0.8}}, 1_000)
    measured = read_results(tmp_path / "r")
    assert measured == {"pope_random": {"pope_f1_score": 0.8}}
    from lmm.vqa_table import measured_value

    pope = next(b for b in BENCHMARKS if b.name == "POPE")
    assert measured_value(pope, measured) is None


def test_task_list_and_errors(tmp_path, capsys):
    assert main(["tasks"]) == 0
    tasks = capsys.readouterr().out.strip().split(",")
    assert tasks == task_list() and "gqa" in tasks and "pope_adv" in tasks and "shapes_qa" not in tasks
    assert "shapes_qa" in task_list(include_shapes=True)
    with pytest.raises(FileNotFoundError, match="no lmms-eval"):
        read_results(tmp_path)
    (tmp_path / "a_results.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="not an lmms-eval results file"):
        read_results(tmp_path)
