"""benchmarks/describe_vs_ask.py: the description parser, and a whole pass over a tiny run's validation set."""

import json
from pathlib import Path

from conftest import load_benchmark

from lmm.run_dir import RunDir


def _module():
    return load_benchmark("describe_vs_ask")


def test_sentences_give_each_named_shape_its_cell():
    cells = _module().cells
    text = "A small red circle is top right. A large purple circle is bottom left. An orange star is low."
    assert cells(text) == {
        ("red", "circle"): "top right",
        ("purple", "circle"): "bottom left",
        ("orange", "star"): "low",
    }
    assert cells("There are three shapes.") == {}


def test_a_pass_over_a_run_asks_about_every_ground_truth_shape(tiny_run, capsys):
    module = _module()
    assert module.main([str(tiny_run), "--threads", "1", "--batch-size", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()[2:]
    rows = {
        cells[1].strip(): (int(cells[2]), float(cells[3])) for cells in (line.split("|") for line in lines)
    }
    data_root = Path(RunDir(tiny_run).read_config().data.root)
    captions = json.loads((data_root / "val" / "gcg_captions.json").read_text())
    shapes = sum(len(module.cells(a["caption"])) for a in captions["annotations"])
    named, asked, placed = (rows[k] for k in rows)
    assert asked[0] == shapes > 0
    assert named[0] <= shapes and placed[0] <= named[0]
    assert all(0.0 <= share <= 1.0 for _, share in rows.values())
