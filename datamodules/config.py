"""The schema of the ``data:`` config section and of the synthetic shapes world; standard library only.

The shapes world's palette and shape kinds live here because its config validates against them.
"""

from __future__ import annotations

import dataclasses
import json
import types
from dataclasses import dataclass
from typing import Any

# Every palette colour has a channel <= 60 while backgrounds stay >= 170 and distractors are pure grey,
# so an exact-RGB match identifies shape pixels unambiguously.
COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (220, 38, 38)),
    ("green", (34, 160, 60)),
    ("blue", (37, 84, 220)),
    ("yellow", (235, 200, 20)),
    ("purple", (135, 55, 180)),
    ("orange", (245, 125, 20)),
)
COLOUR_RGB = types.MappingProxyType(dict(COLOURS))
KINDS = ("circle", "square", "triangle", "diamond", "star")
DEFAULT_KINDS = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
QA_KINDS = ("colour", "shape", "count", "exist", "position", "size")
ANSWER_STYLES = ("short", "sentence", "described")
DESCRIPTION_ORDERS = ("reading", "random")


@dataclass(frozen=True)
class ShapesWorldConfig:
    """Everything that determines a shapes world; equal configs give byte-identical worlds.

    Sizes are fractions of the image's short side; `image_sizes` are (width, height) pairs.
    """

    seed: int = 0
    n_pretrain: int = 6000
    #: 2000 instruct steps of 16 see each conversation once. 8000, each seen four times, grounded a little
    #: worse (five seed and tower pairs: pointing -0.024, mask recall -0.018; README, "32000 instruct ...").
    n_instruct: int = 32000
    n_val: int = 100
    n_val_qa: int = 300
    #: Single-object scenes captioned with their one phrase: the pairs in-world CLIP pretraining learns from,
    #: where telling two captions apart needs the shape's kind as well as its colour and size.
    n_objects: int = 4800
    samples_per_shard: int = 1000
    image_sizes: tuple[tuple[int, int], ...] = ((96, 96), (128, 96), (96, 128))
    colours: tuple[str, ...] = tuple(name for name, _ in COLOURS)
    kinds: tuple[str, ...] = DEFAULT_KINDS
    min_shapes: int = 1
    max_shapes: int = 3
    small_side: tuple[float, float] = (0.18, 0.24)
    large_side: tuple[float, float] = (0.34, 0.42)
    cell_margin: float = 0.12  # fraction of a cell kept free at its borders, so positions are unambiguous
    min_visible: float = 0.8  # every shape keeps at least this fraction of its pixels under occlusion
    texture_prob: float = 0.3
    lines_prob: float = 0.25
    specks_prob: float = 0.25
    text_only_fraction: float = 0.1
    max_rounds: int = 3
    describe_weight: float = 2.5  # relative to 1.0 for each QA kind, so detailed descriptions are common
    #: How often an instruct round asks each QA kind, relative to one another and to `describe_weight`; a kind
    #: not named weighs 1.0, and 0 never asks it. The held-out questions (val_qa) stay one kind in six.
    question_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    #: Put an instruct conversation's detailed description after its questions, so that no question can be
    #: answered by reading the description's text instead of the image (the held-out questions come alone).
    describe_last: bool = False
    #: How an instruct or held-out question is answered: ``sentence`` (the answer after the object restated:
    #: "The red circle is top right.") or ``short`` (the answer alone: "Top right."). A sentence's tokens just
    #: before the answer name the object, as a detailed description's do before its position, and the answer
    #: is read as the description reads it (three seeds: position 0.45 -> 0.59, QA 0.722 -> 0.741; README,
    #: "Answers that restate the object"). ``described``: as ``sentence``, but a colour or position answer names
    #: the object as the description does, size first ("The large blue circle is central.", "The large triangle
    #: is yellow."); tried, not adopted (README, "Batches grouped by length, 2300 instruct steps").
    answer_style: str = "sentence"
    #: The order of the shapes in an instruct conversation's detailed description: ``reading`` (row-major cells,
    #: as the GCG caption) or ``random`` (drawn per conversation), so that the position a description gives can
    #: not be read off a scan of the cells and must come from the shape just named, as a "where" answer's does.
    #: Tried, not adopted (README, "Where the answer looks"). The GCG captions and the
    #: held-out data keep reading order.
    description_order: str = "reading"

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError("seed must be >= 0")
        if not 1 <= self.min_shapes <= self.max_shapes <= 9:
            raise ValueError("need 1 <= min_shapes <= max_shapes <= 9 (one shape per 3x3 cell)")
        if self.max_shapes > len(self.colours) * len(self.kinds):
            raise ValueError("not enough distinct (colour, kind) pairs for max_shapes")
        unknown = set(self.colours) - set(COLOUR_RGB) | set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown colours/kinds: {sorted(unknown)}")
        if len(self.colours) < 2 or len(self.kinds) < 2:
            raise ValueError("need at least two colours and two kinds")
        if (
            self.samples_per_shard < 1
            or min(self.n_pretrain, self.n_instruct, self.n_val, self.n_val_qa, self.n_objects) < 0
        ):
            raise ValueError("counts must be >= 0 and samples_per_shard >= 1")
        if self.max_rounds < 1:
            raise ValueError("max_rounds must be >= 1")
        unknown_kinds = sorted(set(self.question_weights) - set(QA_KINDS))
        if unknown_kinds:
            raise ValueError(
                f"question_weights: unknown QA kinds {unknown_kinds}; expected some of {list(QA_KINDS)}"
            )
        negative = {k: w for k, w in self.question_weights.items() if not w >= 0}
        if negative:
            raise ValueError(f"question_weights must be >= 0, got {negative}")
        if self.describe_weight < 0:
            raise ValueError(f"describe_weight must be >= 0, got {self.describe_weight}")
        if self.answer_style not in ANSWER_STYLES:
            raise ValueError(f"answer_style must be one of {list(ANSWER_STYLES)}, got {self.answer_style!r}")
        if self.description_order not in DESCRIPTION_ORDERS:
            raise ValueError(
                f"description_order must be one of {list(DESCRIPTION_ORDERS)}, got {self.description_order!r}"
            )

    @property
    def n_object_captions(self) -> int:
        """How many different captions the ``objects`` split can have: one per colour, kind and size."""
        return len(self.colours) * len(self.kinds) * len(SIZES)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists), the form stored in world.json."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShapesWorldConfig:
        """Inverse of `to_dict`; unknown keys are an error so stale files are noticed."""
        fields = {f.name for f in dataclasses.fields(cls)}
        extra = set(data) - fields
        if extra:
            raise ValueError(f"unknown config keys: {sorted(extra)}")

        def _tuples(value: Any) -> Any:
            return tuple(_tuples(v) for v in value) if isinstance(value, list) else value

        return cls(**{k: _tuples(v) for k, v in data.items()})


@dataclasses.dataclass
class DataConfig:
    """Schema of ``data:``."""

    root: str = "data/shapes"
    #: Generate the synthetic shapes world into ``root`` when it is missing (None: real data, never generate).
    shapes: ShapesWorldConfig | None = None
    num_workers: int = 1
    #: Samples are shuffled in blocks of this many within each rank/worker slice of an epoch.
    shuffle_buffer: int = 1000
    #: Append the sample keys of every consumed batch to runs/<run>/samples/<stage>/rank<r>.jsonl.
    record_samples: bool = False
    #: Decode JPEGs whose shorter side is at least twice this at 1/2, 1/4 or 1/8 scale (shorter side kept
    #: >= this): several times faster for large photos (SAM, ShareGPT4V). None: full size, which gives
    #: exactly LLaVA's pixels. Twice the encoder's input size keeps the final resize's quality.
    decode_min_side: int | None = None

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.decode_min_side is not None and self.decode_min_side < 1:
            raise ValueError(
                f"decode_min_side must be a positive pixel count or null, got {self.decode_min_side}"
            )
