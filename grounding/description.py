"""Description accuracy: does a detailed description name every ground-truth object correctly, and nothing else?

Per image, each phrase is reduced to a key: with a vocabulary (``words``, e.g. the shapes world's colours and
kinds), the sorted vocabulary words it contains, so "a large red circle" and "the red circle" both become
``("circle", "red")`` and phrases naming no vocabulary word are not object mentions; without one, its
lower-cased words minus articles. The description is correct when the multiset of its phrase keys equals
that of the ground-truth phrases (GCG ``labels``): every object named with the right attributes, none missed,
none invented. Accuracy is the fraction of correct images, so chance is near zero.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

import torch
from torchmetrics import Metric

ARTICLES = frozenset({"a", "an", "the"})


def phrase_key(phrase: str, words: Collection[str] | None = None) -> tuple[str, ...]:
    """The attributes of ``phrase`` that decide whether it names an object correctly (see the module doc)."""
    tokens = re.findall(r"[a-z]+", phrase.lower())
    if words is None:
        return tuple(t for t in tokens if t not in ARTICLES)
    return tuple(sorted(t for t in tokens if t in words))


def description_correct(
    gt_phrases: Sequence[str], pred_phrases: Sequence[str], words: Collection[str] | None = None
) -> bool:
    """Whether the predicted phrases name exactly the ground-truth objects (multisets of ``phrase_key``)."""
    gt = Counter(phrase_key(p, words) for p in gt_phrases)
    pred = Counter(phrase_key(p, words) for p in pred_phrases)
    if words is not None:
        gt.pop((), None)
        pred.pop((), None)
    return gt == pred


class DescriptionAccuracy(Metric):
    """Fraction of images whose description names every ground-truth object correctly (``description_correct``).

    ``words``: the attribute vocabulary (None: whole phrases). States: ``correct`` and ``total`` (sum).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, words: Collection[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.words = None if words is None else frozenset(w.lower() for w in words)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, gt_phrases: Sequence[str], pred_phrases: Sequence[str]) -> None:
        """Add one image."""
        self.correct += int(description_correct(gt_phrases, pred_phrases, self.words))
        self.total += 1

    def compute(self) -> torch.Tensor:
        return self.correct.to(torch.float64) / self.total.clamp(min=1).to(torch.float64)
