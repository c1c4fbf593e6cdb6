"""A run's own copy of its tokenizer: the vocabulary its embeddings were trained over stays with the run.

A LLM built from scratch (``llm.path`` null: the embedded default's tiny Llama) reads its vocabulary from
``llm.tokenizer``, a folder that belongs to the data (the shapes world writes ``data/shapes/tokenizer``).
When the world is regenerated with other words, that folder changes under every run trained on it, and an
old run's checkpoint (embeddings of the old size) no longer loads into a model built over the new one. So
``train.py`` copies the folder into ``runs/<run_name>/tokenizer/`` when the run starts and refuses to continue
training a run whose tokenizer folder no longer matches the copy (its data would be encoded with other ids);
``load_run`` builds a trained run over its copy (``lmm.run_dir.with_run_tokenizer``). A released LLM
(``llm.path`` set) ships its own tokenizer beside its weights and is left alone.
"""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

from lmm.config import TrainConfig
from lmm.run_dir import RunDir, owns_tokenizer


class TokenizerMismatch(Exception):
    """The config's tokenizer folder differs from the copy a run trained with (one line)."""


def differing_files(source: Path, copy: Path) -> list[str]:
    """Names of the files that are in one folder and not the other, or differ in content."""
    names = sorted(
        {p.name for p in source.iterdir() if p.is_file()} | {p.name for p in copy.iterdir() if p.is_file()}
    )
    _, mismatch, missing = filecmp.cmpfiles(source, copy, names, shallow=False)
    return sorted(mismatch + missing)


def check_run_tokenizer(config: TrainConfig) -> None:
    """Raise ``TokenizerMismatch`` when the run already holds a tokenizer copy and ``llm.tokenizer`` exists
    but differs from it. Reads only; a folder not generated yet is not checked."""
    run = RunDir(config.run_dir)
    if not owns_tokenizer(config) or not run.tokenizer_dir.is_dir():
        return
    source = Path(str(config.llm.tokenizer))
    if not source.is_dir():
        return
    differing = differing_files(source, run.tokenizer_dir)
    if differing:
        raise TokenizerMismatch(
            f"llm.tokenizer {source} differs from the tokenizer {run.path} trained with ({run.tokenizer_dir}; "
            f"files {', '.join(differing)}): its data was regenerated with other words; continue the run on "
            "the data it started with, or use another run_name"
        )


def snapshot_tokenizer(config: TrainConfig) -> None:
    """Copy ``llm.tokenizer`` into the run directory (once, atomically; one process of a job). An existing copy
    is kept: ``check_run_tokenizer`` says whether the folder still matches it."""
    if not owns_tokenizer(config):
        return
    run = RunDir(config.run_dir)
    if run.tokenizer_dir.is_dir():
        return
    tmp = run.tokenizer_dir.with_name(f".tokenizer.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(Path(str(config.llm.tokenizer)), tmp)
        os.replace(tmp, run.tokenizer_dir)  # a reader finds the whole folder or none
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
