"""The reference's other map-to-mask knobs: corner removal, SAM prompted with the map itself, all three SAM masks.

From Shengcao-Cao/groundLMM ``aas/instance_seg.py`` and ``aas/gcg.py`` (with ``aas/utils.py``):
- ``--remove-corner``: before upsampling, the four corner cells of every phrase map are set to the minimum of
  the image's stacked phrase maps (one minimum over all phrases of the image, as the reference computes it),
  because attention sinks often sit in the grid's corners.
- ``--sam-mode mask``: no point; SAM gets the upsampled map divided by ``attn_temp`` (0.0002) as its low-res
  mask logits (clipped to [1e-3, 1 - 1e-3] and passed through the inverse sigmoid, resized bicubically so
  the longer side is 256 and zero-padded right/bottom to 256 x 256: SAM's low-res grid) and the box around
  the pixels where ``map / attn_temp > box_thresh`` (0.75), ``[x0, y0, x1 + 1, y1 + 1]``, all zeros if none.
- ``--more-masks``: keep all three multimask outputs, each scored by SAM's predicted IoU, instead of the last.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from grounding.segment import argmax_point

__all__ = ["SAM_MODES", "PromptedSam", "ScoredMask", "remove_corner", "sam_boxes", "sam_mask_logits"]

SAM_MODES = ("point", "mask")
SamMode = Literal["point", "mask"]


def remove_corner(maps: torch.Tensor) -> torch.Tensor:
    """``(N, h, w)`` phrase maps of one image with their four corner cells set to the stack's minimum (a copy)."""
    if maps.ndim != 3:
        raise ValueError(f"expected (n_phrases, h, w) maps, got shape {tuple(maps.shape)}")
    out = maps.clone()
    if out.numel() == 0:
        return out
    low = out.min()
    for row, col in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        out[:, row, col] = low
    return out


def sam_mask_logits(
    upsampled: torch.Tensor, attn_temp: float = 0.0002, eps: float = 1e-3, edge: int = 256
) -> torch.Tensor:
    """``(N, H, W)`` upsampled maps -> ``(N, edge, edge)`` SAM mask-input logits (the reference's
    ``convert_mask_SAM(maps / attn_temp)``)."""
    if upsampled.ndim != 3:
        raise ValueError(f"expected (n, H, W) maps, got shape {tuple(upsampled.shape)}")
    probs = (upsampled.float() / attn_temp).clamp(eps, 1 - eps)
    logits = torch.log(probs / (1 - probs))[None]
    _, height, width = upsampled.shape
    if height == width:
        return F.interpolate(logits, (edge, edge), mode="bicubic", align_corners=False)[0]
    if height > width:
        w = int(width / height * edge)  # truncation, as the reference (not SAM's own rounding)
        resized = F.interpolate(logits, (edge, w), mode="bicubic", align_corners=False)
        return F.pad(resized, (0, edge - w, 0, 0), value=0.0)[0]
    h = int(height / width * edge)
    resized = F.interpolate(logits, (h, edge), mode="bicubic", align_corners=False)
    return F.pad(resized, (0, 0, 0, edge - h), value=0.0)[0]


def sam_boxes(upsampled: torch.Tensor, attn_temp: float = 0.0002, threshold: float = 0.75) -> np.ndarray:
    """``(N, 4)`` boxes ``[x0, y0, x1 + 1, y1 + 1]`` around ``map / attn_temp > threshold`` (zeros where empty)."""
    if upsampled.ndim != 3:
        raise ValueError(f"expected (n, H, W) maps, got shape {tuple(upsampled.shape)}")
    boxes = []
    for above in (upsampled.float() / attn_temp > threshold).cpu().numpy():
        ys, xs = np.nonzero(above)
        boxes.append([0, 0, 0, 0] if ys.size == 0 else [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return np.asarray(boxes, dtype=np.int64).reshape(-1, 4)


@dataclass(frozen=True)
class ScoredMask:
    """A SAM mask and SAM's predicted IoU for it (the score COCO's AP ranks by with ``more_masks``)."""

    mask: np.ndarray
    score: float


class PromptedSam:
    """SAM prompted per phrase by its peak point (``point``) or by its map (``mask``); see the module docstring.

    Built on a segment-anything ``SamPredictor`` (``from_checkpoint`` loads one safely, as ``SamRefiner``
    does). :meth:`predict` gives, per phrase, the kept masks with their scores: the last multimask output
    (SAM's whole-object hypothesis, the default), or all three with ``more_masks``. Calling the object is the
    ``Refiner`` protocol of :mod:`grounding.segment` (the last mask per phrase), so it can stand in for
    ``SamRefiner`` in ``AttendAndSegment``.
    """

    def __init__(
        self,
        predictor: Any,
        mode: SamMode = "point",
        more_masks: bool = False,
        attn_temp: float = 0.0002,
        box_thresh: float = 0.75,
    ) -> None:
        if mode not in SAM_MODES:
            raise ValueError(f"sam mode must be one of {SAM_MODES}, got {mode!r}")
        if attn_temp <= 0:
            raise ValueError(f"attn_temp must be positive, got {attn_temp}")
        self.predictor = predictor
        self.mode = mode
        self.more_masks = more_masks
        self.attn_temp = attn_temp
        self.box_thresh = box_thresh

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        model_type: str | Callable[[], torch.nn.Module] = "vit_h",
        device: str | torch.device = "cpu",
        **options: Any,
    ) -> PromptedSam:
        from grounding.segment import SamRefiner

        return cls(SamRefiner(checkpoint, model_type, device).predictor, **options)

    @torch.no_grad()
    def predict(
        self,
        image: np.ndarray,
        maps: Sequence[torch.Tensor | np.ndarray],
        points: Sequence[tuple[int, int]] | None = None,
    ) -> list[list[ScoredMask]]:
        """Per phrase, its kept masks (1, or 3 with ``more_masks``) on ``image`` (``(H, W, 3)`` uint8 RGB).

        ``maps`` are the phrases' ``(H, W)`` upsampled maps; ``points`` default to their argmax (point mode).
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        if not maps:
            return []
        stacked = torch.stack([torch.as_tensor(m, dtype=torch.float32) for m in maps])
        if stacked.shape[1:] != image.shape[:2]:
            raise ValueError(f"map shape {tuple(stacked.shape[1:])} does not match image {image.shape[:2]}")
        predictor = self.predictor
        predictor.set_image(image, image_format="RGB")
        device = predictor.device
        size = predictor.original_size
        if self.mode == "point":
            if points is None:
                points = [argmax_point(m) for m in stacked]
            if len(points) != len(maps):
                raise ValueError(f"{len(points)} points but {len(maps)} maps")
            coords = predictor.transform.apply_coords(np.asarray(points, dtype=np.float64), size)
            masks, scores, _ = predictor.predict_torch(
                point_coords=torch.as_tensor(coords, dtype=torch.float32, device=device)[:, None],
                point_labels=torch.ones(len(points), 1, dtype=torch.int64, device=device),
                multimask_output=True,
            )
        else:
            # SAM's low-res mask grid: 256 x 256 for the released models (4x their image-embedding grid).
            edge = int(predictor.model.prompt_encoder.mask_input_size[0])
            logits = sam_mask_logits(stacked, self.attn_temp, edge=edge)[:, None].to(device)
            boxes = predictor.transform.apply_boxes(sam_boxes(stacked, self.attn_temp, self.box_thresh), size)
            masks, scores, _ = predictor.predict_torch(
                point_coords=None,
                point_labels=None,
                boxes=torch.as_tensor(boxes, dtype=torch.float32, device=device),
                mask_input=logits,
                multimask_output=True,
            )
        masks, scores = masks.cpu().numpy().astype(bool), scores.float().cpu().numpy()
        keep = range(masks.shape[1]) if self.more_masks else [masks.shape[1] - 1]
        return [[ScoredMask(masks[i, k], float(scores[i, k])) for k in keep] for i in range(masks.shape[0])]

    def __call__(
        self,
        image: np.ndarray,
        points: Sequence[tuple[int, int]],
        maps: Sequence[torch.Tensor | np.ndarray],
    ) -> list[np.ndarray]:
        return [kept[-1].mask for kept in self.predict(image, maps, points if self.mode == "point" else None)]
