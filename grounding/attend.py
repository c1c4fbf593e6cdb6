"""Attend-and-segment: batched grounded generation from images and prompts to captions, phrases and masks.

For a batch of images the model generates greedily while ``AttentionCapture`` records, for every generated
token, the attention to the image tokens averaged over all layers and heads. Which image tokens, and which
grid they form on which part of the image, is each sample's ``grounding.layout.ImageLayout`` (images of
different sizes in one batch each have their own). Per image: the response is trimmed at EOS, its maps are
normalised (the response's mean map subtracted), grouped by noun phrase (max over the tokens of each chunk's
root word), put on the image by the layout's inverse geometry (bicubic, then the pad-aware crop or a plain
resize), and each phrase's peak (anywhere, or with ``peak: centres`` between the outermost cell centres)
becomes the point prompt of a refiner (SAM, or a threshold of the map
itself) that returns its mask. With ``grid_shifts > 1`` the maps put on the image are averages over copies of the
image shifted by fractions of a cell, each read by forcing the generated response again
(``grounding.shifted_maps``). Results can be written in GLaMM's GCG prediction format.
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
from grounding.layout import GridView, ImageLayout, read_views
from grounding.phrases import (
    Phrase,
    default_spacy_model,
    group_phrases,
    regroup_maps,
    response_token_offsets,
)
from grounding.protocol import GroundableModel
from grounding.sam_prompts import PromptedSam, ScoredMask, refiner_from_config, remove_corner
from grounding.segment import (
    Refiner,
    argmax_point,
    normalize_response_maps,
    rows_including_stop,
)
from grounding.shifted_maps import ShiftedMaps, average_on_image, shift_image, shift_offsets
from grounding.teacher_forcing import teacher_forced_rows


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
    #: Per phrase, the masks the refiner kept with their scores: SAM's predicted IoU (all three masks with
    #: ``more_masks``, else the last, which is ``masks[i]``); 1.0 for a refiner without scores.
    scored_masks: list[list[ScoredMask]] = dataclasses.field(default_factory=list)
    #: With ``grid_shifts > 1``: the same phrases' grid maps on each shifted copy of the image (the image itself
    #: excluded); :meth:`image_maps` averages them with ``maps``. Empty with the single map.
    shifted: list[ShiftedMaps] = dataclasses.field(default_factory=list)

    def image_maps(self, remove_corners: bool = False) -> list[torch.Tensor]:
        """Per phrase, the ``(H, W)`` map on the image that its point and mask came from (``remove_corners``:
        as ``AttendConfig.remove_corner``, which the pipeline applied before upsampling)."""
        if self.view is None:
            raise ValueError("this response has no grid view to put its maps on the image")
        return average_on_image(self.maps, self.view, self.shifted, _renderer(remove_corners))

    def to_gcg(self, image_id: str) -> GCGPrediction:
        return GCGPrediction(
            image_id=image_id,
            caption=self.caption,
            phrases=list(self.phrases),
            pred_masks=[mask_to_rle(m) for m in self.masks],
        )


@dataclasses.dataclass
class ResponseMaps:
    """One sample of grounded generation before phrases: the generated ids (the stop token and the padding a
    batch adds after it included), one raw attention row per step ``(n_steps, n_cells)`` in the order of
    ``view.positions``, and the grid read."""

    ids: list[int]
    rows: torch.Tensor
    view: GridView


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
        self.refiner = refiner if refiner is not None else refiner_from_config(config, device)
        self.spacy_model = config.spacy_model or default_spacy_model()

    def __call__(
        self, images: Sequence[Image.Image], prompts: str | Sequence[str] | None = None
    ) -> list[GroundedResponse]:
        """Ground ``images``, each asked ``prompts`` (one for all, one per image; default: the config's)."""
        images, prompts = self._inputs(images, prompts)
        results = []
        for start in range(0, len(images), self.config.batch_size):
            chunk = slice(start, start + self.config.batch_size)
            results.extend(self._batch(images[chunk], prompts[chunk]))
        return results

    def generate_maps(
        self, images: Sequence[Image.Image], prompts: str | Sequence[str] | None = None
    ) -> list[ResponseMaps]:
        """Greedy generation with the attention capture, ``config.batch_size`` images per call: per image its
        generated ids and one raw attention row per generation step on the read grid (no phrases, no masks:
        for evaluations that read the rows themselves, such as referring segmentation)."""
        images, prompts = self._inputs(images, prompts)
        out: list[ResponseMaps] = []
        for start in range(0, len(images), self.config.batch_size):
            chunk = slice(start, start + self.config.batch_size)
            out.extend(self._generate(images[chunk], prompts[chunk]))
        return out

    def views(self, layouts: Sequence[ImageLayout], images: Sequence[Image.Image]) -> list[GridView]:
        """The grid read of each layout (register tokens skipped as configured), checked against its image."""
        views = read_views(layouts, self.config.register_tokens, self.config.attribute_mixing)
        for image, view in zip(images, views, strict=True):
            if view.image_size != (image.height, image.width):
                raise ValueError(
                    f"the model's layout is for a {view.image_size} image, not {(image.height, image.width)}"
                )
        return views

    def _inputs(
        self, images: Sequence[Image.Image], prompts: str | Sequence[str] | None
    ) -> tuple[list[Image.Image], list[str]]:
        images = [image.convert("RGB") for image in images]
        if prompts is None:
            prompts = self.config.prompt
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return images, list(prompts)

    @torch.no_grad()
    def _generate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[ResponseMaps]:
        batch = self.model.prepare(images, prompts)
        views = self.views(batch.layouts, images)
        positions = [view.positions for view in views]
        with AttentionCapture(self.model.language_model, positions, layers=self.config.layers) as capture:
            new_tokens = self.model.generate(batch, self.config.max_new_tokens)
        return [
            ResponseMaps(ids, rows, view)
            for ids, rows, view in zip(new_tokens.tolist(), capture.maps(), views, strict=True)
        ]

    def _batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[GroundedResponse]:
        generated = self._generate(images, prompts)
        copies = self._shifted_rows(images, prompts, generated)
        return [
            self._ground(image, r.ids, r.rows, r.view, [copy[b] for copy in copies])
            for b, (image, r) in enumerate(zip(images, generated, strict=True))
        ]

    @torch.no_grad()
    def _shifted_rows(
        self, images: Sequence[Image.Image], prompts: Sequence[str], generated: Sequence[ResponseMaps]
    ) -> list[list[tuple[tuple[int, int], torch.Tensor, GridView]]]:
        """Per shifted copy (``config.grid_shifts``, ``grounding.shifted_maps``), per image: its offset and the
        rows of the generated response forced on the moved image, as generation captured them. Empty for 1."""
        if self.config.grid_shifts == 1:
            return []
        # Images of other sizes in one batch have cells of other pixel sizes: copy k is each one's own k-th offset.
        per_image = [shift_offsets(r.view, self.config.grid_shifts)[1:] for r in generated]
        stop = self.model.stop_token_ids
        # The rows of every step, the one that produced the stop token included (the mean map needs it).
        responses = [r.ids[: rows_including_stop(r.ids, stop)[1]] for r in generated]
        copies = []
        for k in range(self.config.grid_shifts**2 - 1):
            offsets = [offsets[k] for offsets in per_image]
            moved = [shift_image(image, dx, dy) for image, (dx, dy) in zip(images, offsets, strict=True)]
            batch = self.model.prepare(moved, prompts)
            forced = teacher_forced_rows(
                self.model,
                batch,
                responses,
                layers=self.config.layers,
                register_tokens=self.config.register_tokens,
                attribute_mixing=self.config.attribute_mixing,
                own_positions=False,
            )
            for r, (_, view) in zip(generated, forced, strict=True):
                if view.grid != r.view.grid or view.box != r.view.box:
                    raise ValueError(
                        f"grid_shifts: the shifted image was read on a {view.grid} grid over {view.box}, the image "
                        f"itself on {r.view.grid} over {r.view.box}; shifting needs the same layout"
                    )
            copies.append(
                [(offset, rows, view) for offset, (rows, view) in zip(offsets, forced, strict=True)]
            )
        return copies

    def phrases(
        self, ids: list[int], maps: torch.Tensor, view: GridView
    ) -> tuple[str, list[Phrase], torch.Tensor]:
        """One response's caption, its noun phrases (normalised maps on the grid) and its tokens' raw maps.

        ``ids`` are the generated ids (stop token and padding included) and ``maps`` one raw row per step.
        """
        tokens = ids[: rows_including_stop(ids, self.model.stop_token_ids)[0]]
        token_maps = view.to_grid(maps[: len(tokens)])
        text, offsets = response_token_offsets(self.model.tokenizer, tokens)
        stripped = len(text) - len(text.lstrip())  # decoders may keep the space that led the first token
        text = text.strip()
        offsets = [(max(s - stripped, 0), max(e - stripped, 0)) for s, e in offsets]
        if not tokens or not text:
            return text, [], token_maps
        normalised = self._normalised(ids, maps, view)
        phrases = group_phrases(
            text, offsets, normalised, self.config.combine, self.spacy_model, self.config.phrase_tokens
        )
        return text, phrases, token_maps

    def _normalised(self, ids: list[int], rows: torch.Tensor, view: GridView) -> torch.Tensor:
        """``(n_tokens, h, w)``: the response tokens' maps on ``view``'s grid minus the mean of every step's map,
        the stop step's included (the reference's normalisation); ``ids`` as generated, ``rows`` one per step."""
        # The step that produced the stop token has a row in the mean map (the reference's), never in a phrase.
        n_tokens, n_rows = rows_including_stop(ids, self.model.stop_token_ids)
        return normalize_response_maps(view.to_grid(rows[:n_rows]), n_tokens)

    def segment(
        self,
        image: Image.Image,
        grid_maps: Sequence[torch.Tensor],
        view: GridView,
        shifted: Sequence[ShiftedMaps] = (),
    ) -> tuple[list[tuple[int, int]], list[torch.Tensor], list[list[ScoredMask]]]:
        """Phrase maps on the grid -> per phrase its point, its map on the image and the refiner's scored masks
        (``remove_corner`` applied first when configured, over all of the image's phrase maps). ``shifted``: the
        same phrases' maps on shifted copies of the image, averaged in on the image (``grid_shifts``)."""
        if not grid_maps:
            return [], [], []
        upsampled = average_on_image(grid_maps, view, shifted, _renderer(self.config.remove_corner))
        within = view.peak_region(self.config.peak)
        points = [argmax_point(u, within) for u in upsampled]
        pixels = np.asarray(image.convert("RGB"))
        if isinstance(self.refiner, PromptedSam):  # SAM's scores, and all three masks with more_masks
            prompts = points if self.refiner.mode == "point" else None
            scored = self.refiner.predict(pixels, upsampled, prompts)
        else:
            masks = self.refiner(pixels, points, upsampled)
            scored = [[ScoredMask(np.asarray(m, dtype=bool), 1.0)] for m in masks]
        return points, upsampled, scored

    def _ground(
        self,
        image: Image.Image,
        ids: list[int],
        maps: torch.Tensor,
        view: GridView,
        copies: Sequence[tuple[tuple[int, int], torch.Tensor, GridView]] = (),
    ) -> GroundedResponse:
        text, phrases, token_maps = self.phrases(ids, maps, view)
        shifted = []
        if phrases:
            for offset, rows, copy_view in copies:
                normalised = self._normalised(ids, rows, copy_view)
                shifted.append(
                    ShiftedMaps(offset, regroup_maps(phrases, normalised, self.config.combine), copy_view)
                )
        points, _, scored = self.segment(image, [p.map for p in phrases], view, shifted)
        return GroundedResponse(
            caption=text,
            phrases=[p.text for p in phrases],
            points=points,
            masks=[np.asarray(kept[-1].mask, dtype=bool) for kept in scored],
            maps=[p.map for p in phrases],
            token_maps=token_maps,
            view=view,
            scored_masks=scored,
            shifted=shifted,
        )


def _renderer(remove_corners: bool):  # noqa: ANN202
    """``(grid maps, view) -> maps on the view's image``: bicubic through the view, after ``remove_corner``
    over the image's phrase maps when asked."""

    def render(grid_maps: Sequence[torch.Tensor], view: GridView) -> list[torch.Tensor]:
        stacked = torch.stack(list(grid_maps))
        if remove_corners:
            stacked = remove_corner(stacked)
        return [view.render(m) for m in stacked]

    return render


def write_predictions(results: Sequence[GroundedResponse], image_ids: Sequence[str], out_dir: Path) -> None:
    """One GLaMM-format JSON per image: ``out_dir/<image_id>.json``."""
    from grounding.coco_io import gcg_prediction_path

    out_dir.mkdir(parents=True, exist_ok=True)
    for result, image_id in zip(results, image_ids, strict=True):
        write_gcg_prediction(gcg_prediction_path(out_dir, image_id), result.to_gcg(image_id))
