"""benchmarks/answer_attention.py: where a peak lies, the caption parser, and a whole pass over a tiny run."""

import json
from pathlib import Path

import numpy as np
import torch
from conftest import load_benchmark

from lmm.run_dir import RunDir


def _module():
    return load_benchmark("answer_attention")


def test_a_peak_is_on_the_named_shape_on_another_or_on_none():
    place_of_peak = _module().place_of_peak
    named, other = np.zeros((6, 8), bool), np.zeros((6, 8), bool)
    named[1:3, 1:3], other[3:5, 5:8] = True, True
    field = torch.zeros(6, 8)
    field[2, 2] = 1.0
    assert place_of_peak(field, None, [named, other], 0) == "named"
    assert place_of_peak(field, None, [named, other], 1) == "other"
    field[4, 6] = 2.0
    assert place_of_peak(field, None, [named, other], 1) == "named"
    assert place_of_peak(field, (slice(0, 3), slice(0, 4)), [named, other], 1) == "other", "searched within"
    field[0, 7] = 3.0
    assert place_of_peak(field, None, [named, other], 0) == "none"


def test_sentence_parts_split_phrase_name_and_position():
    parts = _module().sentence_parts("A small red circle is top right. A large purple circle is low.")
    assert parts == [
        ("A small red circle", "red circle", "top right"),
        ("A large purple circle", "purple circle", "low"),
    ]


def test_a_pass_over_a_run_reads_every_shape_once_per_query_and_layer(tiny_run, capsys):
    module = _module()
    assert module.main([str(tiny_run), "--limit", "3", "--threads", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    data_root = Path(RunDir(tiny_run).read_config().data.root)
    captions = json.loads((data_root / "val" / "gcg_captions.json").read_text())["annotations"][:3]
    shapes = sum(len(module.sentence_parts(a["caption"])) for a in captions)
    table = [line for line in out if line.startswith("| where:") or line.startswith("| description:")]
    assert len(table) == 4
    for line in table:
        for cell in line.strip("|").split("|")[1:]:
            named, other = (float(v.strip(" ()")) for v in cell.split())
            assert 0.0 <= named + other <= 1.0
            assert abs(named - round(named * shapes) / shapes) <= 5e-4, "a share of the shapes (3 decimals)"
    answered = [
        line
        for line in out
        if line.startswith("| the asked") or "another shape |" in line or "no shape |" in line
    ]
    assert sum(int(line.split("|")[2]) for line in answered) == shapes


def test_query_rows_are_the_colour_word_and_is_of_each_sentence(tiny_run):
    from lmm.run_dir import load_run

    model, _ = load_run(tiny_run)
    tokenizer = model.llm.tokenizer
    response = "A small red circle is top right. A large blue square is low."
    rows = _module().query_rows(
        tokenizer,
        response,
        ["A small red circle is", "A small red circle is top right. A large blue square is"],
    )
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(response, add_special_tokens=False)["input_ids"])
    assert [(tokens[a].lstrip("▁"), tokens[b].lstrip("▁")) for a, b in rows] == [
        ("red", "is"),
        ("blue", "is"),
    ]
    assert rows[1][1] == tokens.index("▁is", rows[0][1] + 1)
