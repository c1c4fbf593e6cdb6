"""Every device at once: ``reproduce gcg`` in two CPU processes (``--processes 2``, spawned workers each grounding
a shard) writes the same merged predictions as one process, and ``--ids`` limits the run to a subset."""

from __future__ import annotations

import json

from test_reproduce import _args, setup, text_model  # noqa: F401  (the GranD-f-format set and the tiny model)

from grounding.commands import reproduce


def _predictions(folder):
    return {p.name: json.loads(p.read_text()) for p in sorted((folder / "predictions").glob("*.json"))}


def test_two_processes_give_the_same_predictions_as_one(setup, text_model, tmp_path, capsys):  # noqa: F811
    one, two = tmp_path / "one", tmp_path / "two"
    assert reproduce.main(_args(setup, text_model, one, "--processes", "1")) == 0
    assert reproduce.main(_args(setup, text_model, two, "--processes", "2")) == 0
    printed = capsys.readouterr().out
    assert "2 process(es)" in printed
    first, second = _predictions(one), _predictions(two)
    assert len(first) == 4 and first == second
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (one, two)]
    assert all(metrics[0][k] == metrics[1][k] for k in ("ap50", "miou", "recall"))
    assert metrics[1]["timing"]["processes"] == 2


def test_ids_limit_the_run_to_a_subset(setup, text_model, tmp_path, capsys):  # noqa: F811
    from grounding import granddf

    ids = sorted(granddf.locate_granddf(setup / "data", "val").images)
    out = tmp_path / "subset"
    assert reproduce.main(_args(setup, text_model, out, "--ids", ids[1], ids[3])) == 0
    assert sorted(_predictions(out)) == sorted(f"{i}.json" for i in (ids[1], ids[3]))
    assert json.loads((out / "metrics.json").read_text())["n_images"] == 2
    capsys.readouterr()
    assert reproduce.main(_args(setup, text_model, out, "--ids", "no-such-image")) == 2
    err = capsys.readouterr().err
    assert "--ids" in err and "no-such-image" in err and err.count("\n") == 1
