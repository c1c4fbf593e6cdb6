"""Attend-and-segment: batched grounded generation from images and prompts to captions, phrases and masks.

For a batch of images the model generates greedily while ``AttentionCapture`` records, for every generated
token, the attention to the image tokens averaged over all layers and heads. Which image tokens, and which
grid they form on which part of the image, is each sample's ``grounding.layout.ImageLayout`` (images of
different sizes in one batch each have their own). Per image: the response is trimmed at EOS, its maps are
normalised (the response's mean map subtracted), grouped by noun phrase (max over the tokens of each chunk's
root word), put on the image by the layout's inverse geometry (bicubic, then the pad-aware crop or a plain
resize), and each phrase's peak becomes the point prompt of a refiner (SAM, or a threshold of the map
itself) that returns its mask. Results can be written in GLaMM's GCG prediction format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from grounding.capture import AttentionCapture
from grounding.coco_io import GCGPrediction, mask_to_rle, write_gcg_prediction
from grounding.config import AttendConfig
from grounding.layout import GridView
from grounding.phrases import default_spacy_model, group_phrases, response_token_offsets
from grounding.protocol import GroundableModel
from grounding.segment import (
    Refiner,
    argmax_point,
    build_refiner,
    normalize_response_maps,
    rows_including_stop,
)


@dataclasses.dataclass
class GroundedResponse:
    """One image's result: caption, phrases, and per phrase its point (x, y), mask (H, W) and grid map."""

    caption: str
    phrases: list[str]
    points: list[tuple[int, int]]
    masks: list[np.ndarray]
    maps: list[torch.Tensor]  # (h, w) normalised phrase maps on the token grid, for overlays
    token_maps: torch.Tensor  # (n_tokens, h, w) raw maps of the response tokens
    view: GridView | None = None  # the grid read and where it lies on the image (view.render(map) -> (H, W))

    def to_gcg(self, image_id: str) -> GCGPrediction:
        return GCGPrediction(
            image_id=image_id,
            caption=self.caption,
            phrases=list(self.phrases),
            pred_masks=[mask_to_rle(m) for m in self.masks],
        )


class AttendAndSegment:
    """images + prompts -> ``GroundedResponse`` per image, ``config.batch_size`` images per generate call.

    Every setting comes from ``config`` (``grounding.config.AttendConfig``). ``refiner``: an already built
    refiner to share across pipelines (a sweep, the training callback); default: built from ``config``.
    """

    def __init__(
        self,
        model: GroundableModel,
        config: AttendConfig,
        refiner: Refiner | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = model
        self.config = config
        self.refiner = refiner if refiner is not None else build_refiner(config, device)
        self.spacy_model = config.spacy_model or default_spacy_model()

    def __call__(
        self, images: Sequence[Image.Image], prompts: str | Sequence[str] | None = None
    ) -> list[GroundedResponse]:
        """Ground ``images``, each asked ``prompts`` (one for all, one per image; default: the config's)."""
        images = [image.convert("RGB") for image in images]
        if prompts is None:
            prompts = self.config.prompt
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        results = []
        for start in range(0, len(images), self.config.batch_size):
            chunk = slice(start, start + self.config.batch_size)
            results.extend(self._batch(images[chunk], prompts[chunk]))
        return results

    @torch.no_grad()
    def _batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[GroundedResponse]:
        batch = self.model.prepare(images, prompts)
        views = [layout.view() for layout in batch.layouts]
        for image, view in zip(images, views, strict=True):
            if view.image_size != (image.height, image.width):
                raise ValueError(
                    f"the model's layout is for a {view.image_size} image, not {(image.height, image.width)}"
                )
        positions = [view.positions for view in views]
        with AttentionCapture(self.model.language_model, positions, layers=self.config.layers) as capture:
            new_tokens = self.model.generate(batch, self.config.max_new_tokens)
        maps = capture.maps()
        return [
            self._ground(image, ids, m, view)
            for image, ids, m, view in zip(images, new_tokens.tolist(), maps, views, strict=True)
        ]

    def _ground(
        self, image: Image.Image, ids: list[int], maps: torch.Tensor, view: GridView
    ) -> GroundedResponse:
        tokenizer = self.model.tokenizer
        # The step that produced the stop token has a row in the mean map (the reference's), never in a phrase.
        n_tokens, n_rows = rows_including_stop(ids, self.model.stop_token_ids)
        ids = ids[:n_tokens]
        token_maps = view.to_grid(maps[: len(ids)])
        text, offsets = response_token_offsets(tokenizer, ids)
        stripped = len(text) - len(text.lstrip())  # decoders may keep the space that led the first token
        text = text.strip()
        offsets = [(max(s - stripped, 0), max(e - stripped, 0)) for s, e in offsets]
        if not ids or not text:
            return GroundedResponse(text, [], [], [], [], token_maps, view)
        normalised = normalize_response_maps(view.to_grid(maps[:n_rows]), n_tokens)
        phrases = group_phrases(
            text, offsets, normalised, self.config.combine, self.spacy_model, self.config.phrase_tokens
        )
        upsampled = [view.render(p.map) for p in phrases]
        points = [argmax_point(u) for u in upsampled]
        masks = self.refiner(np.asarray(image), points, upsampled) if phrases else []
        return GroundedResponse(
            caption=text,
            phrases=[p.text for p in phrases],
            points=points,
            masks=[np.asarray(m, dtype=bool) for m in masks],
            maps=[p.map for p in phrases],
            token_maps=token_maps,
            view=view,
        )


def write_predictions(results: Sequence[GroundedResponse], image_ids: Sequence[str], out_dir: Path) -> None:
    """One GLaMM-format JSON per image: ``out_dir/<image_id>.json``."""
    from grounding.coco_io import gcg_prediction_path

    out_dir.mkdir(parents=True, exist_ok=True)
    for result, image_id in zip(results, image_ids, strict=True):
        write_gcg_prediction(gcg_prediction_path(out_dir, image_id), result.to_gcg(image_id))
