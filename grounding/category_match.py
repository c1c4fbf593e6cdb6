"""Phrase -> COCO category for instance segmentation with attend-and-segment (the reference's first release).

Shengcao-Cao/groundLMM ``aas/instance_seg.py``: for each noun phrase of the description, the root word is
compared with the names of the categories present in the image's ground truth, both embedded by spaCy's
``doc.vector`` after ``get_spacy_embedding``'s clean-up (lower case, a leading "the ", "an " or "a "
removed); the most similar category (cosine, first on ties) is the phrase's, kept when the similarity is at
least ``category_thresh`` (0.5 in the reference's command). Only spaCy pipelines with static word vectors
(``en_core_web_md`` / ``_lg``; the reference uses ``_lg``) give meaningful ``doc.vector``s; the small model's
come from its context tensors, so :class:`SpacyVectorSimilarity` refuses a pipeline without vectors. The
other matcher is any phrase-similarity function, e.g. :class:`grounding.text_similarity.PhraseSimilarity`
(mean-pooled text-model states).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from grounding.text_similarity import SimilarityFn, cosine_matrix

__all__ = ["CategoryMatch", "SpacyVectorSimilarity", "clean_word", "match_category"]


def clean_word(text: str) -> str:
    """The reference's clean-up before embedding: lower case, one leading article removed."""
    text = text.lower()
    for article in ("the ", "an ", "a "):
        if text.startswith(article):
            return text[len(article) :]
    return text


class SpacyVectorSimilarity:
    """Cosine similarity of spaCy ``doc.vector``s (a :class:`SimilarityFn`; zero vectors, i.e. unknown words,
    give 0, as ``torch.cosine_similarity`` does).

    Args:
        nlp: a loaded spaCy ``Language`` or the name of an installed pipeline (``en_core_web_lg``).
    """

    def __init__(self, nlp: Any = "en_core_web_lg") -> None:
        if isinstance(nlp, str):
            from grounding.phrases import load_spacy

            name = nlp
            try:
                import spacy

                nlp = spacy.load(name)
            except OSError:
                nlp = load_spacy(name)  # raises the project's one-line install hint
        else:
            name = nlp.meta.get("name", "pipeline")
        if nlp.vocab.vectors.shape[0] == 0:
            raise ValueError(
                f"spaCy pipeline {name!r} has no word vectors (only en_core_web_md/lg do); its doc.vector would "
                "come from context tensors: use en_core_web_lg or the text-model matcher"
            )
        self.nlp = nlp

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([np.asarray(self.nlp(t).vector, dtype=np.float64) for t in texts])

    def __call__(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        if not a or not b:
            return np.zeros((len(a), len(b)))
        return cosine_matrix(self.embed(a), self.embed(b))


@dataclass(frozen=True)
class CategoryMatch:
    category_id: int
    name: str
    score: float


def match_category(
    word: str,
    categories: Sequence[tuple[int, str]],
    similarity: SimilarityFn,
    threshold: float = 0.5,
) -> CategoryMatch | None:
    """The category among ``categories`` (``(id, name)``, those present in the image, sorted by id as the
    reference sorts them) most similar to ``word``; None when there is none or its similarity < ``threshold``.

    Both sides pass through :func:`clean_word` first, as the reference's ``get_spacy_embedding`` does.
    """
    if not categories:
        return None
    names = [name for _, name in categories]
    scores = np.asarray(similarity([clean_word(word)], [clean_word(n) for n in names]), dtype=np.float64)
    scores = scores.reshape(-1)
    if scores.shape[0] != len(categories):
        raise ValueError(f"similarity returned {scores.shape[0]} scores for {len(categories)} categories")
    best = int(np.argmax(scores))
    if scores[best] < threshold:
        return None
    return CategoryMatch(category_id=int(categories[best][0]), name=names[best], score=float(scores[best]))
