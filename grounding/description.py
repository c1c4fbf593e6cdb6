"""Description accuracy: does a detailed description name every ground-truth object correctly, and nothing else?

Per image, each phrase is reduced to a key: with a vocabulary (``words``, e.g. the shapes world's colours and
kinds), the sorted vocabulary words it contains, so "a large red circle" and "the red circle" both become
``("circle", "red")`` and phrases naming no vocabulary word are not object mentions; without one, its
lower-cased words minus articles. The description is correct when the multiset of its phrase keys equals
that of the ground-truth phrases (GCG ``labels``): every object named with the right attributes, none missed,
none invented. Accuracy is the fraction of correct images, so chance is near zero. ``description_error``
says why a description is wrong: it names fewer objects than the image holds (``missed``), more
(``invented``), or as many with wrong attributes (``attributes``).
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


#: Why a description is wrong, in the order ``DescriptionAccuracy.breakdown`` reports them after ``right``.
ERRORS = ("missed", "invented", "attributes")


def _object_keys(phrases: Sequence[str], words: Collection[str] | None) -> Counter[tuple[str, ...]]:
    keys = Counter(phrase_key(p, words) for p in phrases)
    if words is not None:
        keys.pop((), None)
    return keys


def description_error(
    gt_phrases: Sequence[str], pred_phrases: Sequence[str], words: Collection[str] | None = None
) -> str | None:
    """None for a correct description, else why it is wrong (one of ``ERRORS``): the count of object
    mentions decides between ``missed`` and ``invented``; an equal count means wrong ``attributes``."""
    gt, pred = _object_keys(gt_phrases, words), _object_keys(pred_phrases, words)
    if gt == pred:
        return None
    n_gt, n_pred = sum(gt.values()), sum(pred.values())
    if n_pred < n_gt:
        return "missed"
    return "invented" if n_pred > n_gt else "attributes"


def description_correct(
    gt_phrases: Sequence[str], pred_phrases: Sequence[str], words: Collection[str] | None = None
) -> bool:
    """Whether the predicted phrases name exactly the ground-truth objects (multisets of ``phrase_key``)."""
    return _object_keys(gt_phrases, words) == _object_keys(pred_phrases, words)


class DescriptionAccuracy(Metric):
    """Fraction of images whose description names every ground-truth object correctly (``description_correct``).

    ``words``: the attribute vocabulary (None: whole phrases). States: ``correct``, ``total`` and one count per
    kind of error (``ERRORS``), all summed.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, words: Collection[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.words = None if words is None else frozenset(w.lower() for w in words)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        for error in ERRORS:
            self.add_state(error, default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, gt_phrases: Sequence[str], pred_phrases: Sequence[str]) -> None:
        """Add one image."""
        error = description_error(gt_phrases, pred_phrases, self.words)
        if error is None:
            self.correct += 1
        else:
            setattr(self, error, getattr(self, error) + 1)
        self.total += 1

    def compute(self) -> torch.Tensor:
        return self.correct.to(torch.float64) / self.total.clamp(min=1).to(torch.float64)

    def breakdown(self) -> dict[str, float]:
        """Fractions of the images: ``right`` (= :meth:`compute`) and each of ``ERRORS``; they sum to 1 (all
        0.0 with no images)."""
        total = int(self.total)
        counts = {"right": int(self.correct), **{e: int(getattr(self, e)) for e in ERRORS}}
        return {k: (v / total if total else 0.0) for k, v in counts.items()}
