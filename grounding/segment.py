"""From attention maps to masks for attend-and-segment (DESIGN.md section 5, steps 3, 5 and 6): normalise a
response's token maps by subtracting their mean, upsample a phrase's token-grid map bicubically onto the
original image (inverting the pad-to-square or resize transform the encoder saw), take the argmax pixel as a
point prompt, and refine it into a binary mask with a registered refiner: ``sam`` (segment-anything's
``SamPredictor`` from a local checkpoint), ``threshold`` (no SAM: the thresholded map around the peak) or
``guided`` (no SAM, but the image's edges as SAM uses them: the map filtered by a joint bilateral filter that the
image guides, then thresholded).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from grounding.config import AttendConfig

__all__ = [
    "REFINERS",
    "Refiner",
    "GuidedRefiner",
    "SamRefiner",
    "ThresholdRefiner",
    "argmax_point",
    "build_refiner",
    "component_at",
    "joint_bilateral",
    "normalize_maps",
    "normalize_response_maps",
    "rows_including_stop",
    "upsample_map",
]

Aspect = Literal["pad", "crop", "resize"]


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Subtract the mean map over all tokens of one response: ``maps`` is ``(n_tokens, ...)``.

    Attention to image tokens has a large token-independent component (a few "sink" patches every token
    looks at); removing the response's mean leaves what is specific to each token. Pass all generated
    tokens of the response (trimmed of padding after EOS), not only the phrase tokens.
    """
    if maps.ndim < 2 or maps.shape[0] == 0:
        raise ValueError(f"expected (n_tokens, ...) maps with n_tokens >= 1, got shape {tuple(maps.shape)}")
    maps = maps.float()
    return maps - maps.mean(dim=0, keepdim=True)


def rows_including_stop(token_ids: Sequence[int], stop_token_ids: Sequence[int]) -> tuple[int, int]:
    """``(n_tokens, n_rows)`` of one generated response: its tokens before the first stop token, and the
    generation steps whose attention rows count in the mean map, the step that produced the stop included.

    The reference saves one attention row for every generation step, including the one that generated the
    end-of-sequence token, and subtracts the mean over all of them (DESIGN.md section 5, step 3); the stop
    token itself is never part of a phrase. Without a stop token (the length limit) both counts are the
    number of generated tokens.
    """
    stops = set(stop_token_ids)
    for i, token in enumerate(token_ids):
        if token in stops:
            return i, i + 1
    return len(token_ids), len(token_ids)


def normalize_response_maps(rows: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Normalise a response's maps as the reference does: subtract the mean of ``rows``, keep ``n_tokens``.

    ``rows`` is ``(n_rows, ...)``: one map per generation step up to and including the step that produced the
    stop token (see :func:`rows_including_stop`); the result is the first ``n_tokens`` normalised maps, those
    of the response's text tokens.
    """
    if not 0 <= n_tokens <= rows.shape[0]:
        raise ValueError(f"n_tokens {n_tokens} must be between 0 and the number of rows {rows.shape[0]}")
    return normalize_maps(rows)[:n_tokens]


def upsample_map(attn: torch.Tensor, image_size: tuple[int, int], aspect: Aspect = "pad") -> torch.Tensor:
    """Upsample an ``(h, w)`` token-grid map bicubically to an image of ``image_size = (H, W)``.

    ``"pad"`` inverts LLaVA's pad-to-square-with-mean-colour transform: the encoder saw the image pasted in
    the centre of a ``max(H, W)`` square (offset ``(S - H) // 2`` rows, ``(S - W) // 2`` columns, as
    ``expand2square`` does), so the map is upsampled to that square and the image's region is cropped out.
    ``"crop"`` and ``"resize"`` map the grid straight onto ``H x W`` (DESIGN.md section 5, step 5).
    Returns a float32 ``(H, W)`` tensor.
    """
    if attn.ndim != 2:
        raise ValueError(f"expected an (h, w) map, got shape {tuple(attn.shape)}")
    height, width = image_size
    grid = attn.float()[None, None]
    if aspect == "pad":
        side = max(height, width)
        square = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)[0, 0]
        top, left = (side - height) // 2, (side - width) // 2
        return square[top : top + height, left : left + width]
    if aspect in ("crop", "resize"):
        return F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)[0, 0]
    raise ValueError(f"aspect must be 'pad', 'crop' or 'resize', got {aspect!r}")


def argmax_point(upsampled: torch.Tensor, within: tuple[slice, slice] | None = None) -> tuple[int, int]:
    """The ``(x, y)`` pixel of the maximum of an ``(H, W)`` map (first one in row-major order on ties).

    ``within``: ``(rows, cols)`` slices to search instead of the whole map (``GridView.peak_region``).
    """
    rows, cols = within if within is not None else (slice(None), slice(None))
    region = upsampled[rows, cols]
    if region.numel() == 0:
        raise ValueError(f"within {within} selects no pixel of a {tuple(upsampled.shape)} map")
    flat = int(torch.argmax(region))
    width = region.shape[1]
    top, left = rows.indices(upsampled.shape[0])[0], cols.indices(upsampled.shape[1])[0]
    return left + flat % width, top + flat // width


class Refiner(Protocol):
    """Turns point prompts on one image into masks: one boolean ``(H, W)`` mask per point.

    ``image`` is ``(H, W, 3)`` uint8 RGB; ``points[i]`` is ``(x, y)`` in pixels and ``maps[i]`` the
    ``(H, W)`` upsampled map it came from (a refiner may ignore either).
    """

    def __call__(
        self,
        image: np.ndarray,
        points: Sequence[tuple[int, int]],
        maps: Sequence[torch.Tensor | np.ndarray],
    ) -> list[np.ndarray]: ...


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")


class SamRefiner:
    """Segment-anything refiner: one positive point per phrase, ``multimask_output=True``, keep the last mask.

    SAM's last multimask output is the largest (whole-object) hypothesis, which is what the reference keeps.
    ``SamPredictor.predict`` already binarises the masks at ``model.mask_threshold`` (0.0), i.e. logit > 0.
    The image is embedded once (``set_image``) for all of its phrases.

    Args:
        checkpoint: a local SAM state dict (``.pth``), e.g. ``sam_vit_h_4b8939.pth``.
        model_type: ``"vit_h"``, ``"vit_l"`` or ``"vit_b"`` (segment-anything's registry), or a callable
            returning an un-initialised ``Sam`` of the checkpoint's shape (for custom or tiny models).
        device: where SAM runs.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        model_type: str | Callable[[], torch.nn.Module] = "vit_h",
        device: str | torch.device = "cpu",
    ) -> None:
        from segment_anything import SamPredictor, sam_model_registry

        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"SAM checkpoint not found: {path}")
        if isinstance(model_type, str):
            if model_type not in sam_model_registry:
                raise ValueError(
                    f"unknown SAM model type {model_type!r}; choose from {sorted(sam_model_registry)}"
                )
            sam = sam_model_registry[model_type](checkpoint=None)
        else:
            sam = model_type()
        sam.load_state_dict(_load_sam_state(path, sam, model_type))
        self.predictor = SamPredictor(sam.to(device).eval())

    def __call__(
        self,
        image: np.ndarray,
        points: Sequence[tuple[int, int]],
        maps: Sequence[torch.Tensor | np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        _check_image(image)
        if not points:
            return []
        self.predictor.set_image(image, image_format="RGB")
        masks = []
        for x, y in points:
            multi, _, _ = self.predictor.predict(
                point_coords=np.array([[x, y]], dtype=np.float32),
                point_labels=np.array([1]),
                multimask_output=True,
            )
            masks.append(np.asarray(multi[-1], dtype=bool))
        return masks


def _load_sam_state(path: Path, sam: torch.nn.Module, model_type: object) -> dict[str, torch.Tensor]:
    """Read a SAM state dict safely and check it against ``sam``, with a one-line error naming the file."""
    # build_sam's own loader calls torch.load without weights_only; read tensors only, never arbitrary pickles.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unpickling error has a multi-paragraph message; say it in one line
        raise ValueError(f"SAM checkpoint {path} is not a loadable state dict: {type(err).__name__}") from err
    if not isinstance(state, dict):
        raise ValueError(f"SAM checkpoint {path} holds a {type(state).__name__}, not a state dict")
    expected = sam.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (first: {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        if reshaped:
            k = reshaped[0]
            problems.append(
                f"{len(reshaped)} shape mismatches (first: {k} {tuple(state[k].shape)} in the file, "
                f"{tuple(expected[k].shape)} in the model)"
            )
        name = model_type if isinstance(model_type, str) else getattr(model_type, "__name__", "custom")
        raise ValueError(f"SAM checkpoint {path} does not match model type {name!r}: {'; '.join(problems)}")
    return state


class ThresholdRefiner:
    """SAM-free refiner: the map's own region around the peak.

    Rule: with ``lo`` the map's minimum and ``peak`` its value at the point, keep pixels with
    ``value >= lo + fraction * (peak - lo)``, then only the 8-connected component that contains the point.
    With ``fraction = 0.5`` a Gaussian blob on a flat background gives the disc where the blob is at least
    half its height (radius ``sigma * sqrt(2 ln 2)``).

    The threshold is applied at full resolution; which pixels are connected to the point is decided by
    ``scipy.ndimage.label`` on the thresholded region reduced (any pixel of a cell counts) to at most
    ``max_side`` pixels on its longer side, and the component is then taken back to full resolution. Up
    to ``max_side`` the result is exactly the rule above; beyond it, two parts of the region closer than one
    cell (``ceil(longer side / max_side)`` pixels) count as connected. The maps are bicubic upsamplings of a
    token grid (24 x 24 for LLaVA), so their regions are smooth at that scale, and an 8000 x 8000 photo takes
    seconds instead of the minutes a full-resolution search took.
    """

    def __init__(self, fraction: float = 0.5, max_side: int = 1024) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        if max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {max_side}")
        self.fraction = fraction
        self.max_side = max_side

    def __call__(
        self,
        image: np.ndarray,
        points: Sequence[tuple[int, int]],
        maps: Sequence[torch.Tensor | np.ndarray],
    ) -> list[np.ndarray]:
        _check_image(image)
        if len(points) != len(maps):
            raise ValueError(f"{len(points)} points but {len(maps)} maps")
        tensors = [torch.as_tensor(m, dtype=torch.float32) for m in maps]
        for values in tensors:
            if values.shape != image.shape[:2]:
                raise ValueError(f"map shape {tuple(values.shape)} does not match image {image.shape[:2]}")
        masks = []
        for (x, y), values in zip(points, self.prepare(image, tensors), strict=True):
            low, peak = values.min(), values[y, x]
            region = values >= low + self.fraction * (peak - low)
            masks.append(component_at(region, x, y, self.max_side))
        return masks

    def prepare(self, image: np.ndarray, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """The maps the rule thresholds (here the upsampled maps themselves)."""
        return maps


class GuidedRefiner(ThresholdRefiner):
    """SAM-free refiner that, like SAM, lets the image decide where a mask ends: ``ThresholdRefiner``'s rule on the
    map after ``joint_bilateral`` filtering guided by the image (Kopf et al., "Joint bilateral upsampling", 2007).

    A bicubic upsampling of a coarse token grid has smooth edges at the scale of a cell (8 px of a 64-px image in
    the shapes world, 14 of 336 for LLaVA-1.5), so its thresholded region spills over an object's outline on one
    side and stops short on another; filtered with weights that fall with colour difference, the map's values
    average within a uniformly coloured region and not across its edge, and the threshold follows the edge.
    The filter runs at most ``work_side`` pixels on the longer side (the image and maps are resized to it), with a
    window of ``radius`` times that side; ``sigma_colour`` is in RGB units of [0, 1]. Maps filtered at a reduced
    size are resized back and get ``edge_passes`` more passes at full resolution (at most ``max_side`` pixels on
    the longer side) with a 2-px radius, which put their edges back on the image's pixels. The cost grows with
    the fourth power of ``work_side`` (window and image both grow): 64 px filters a shapes image's two maps in
    about 20 ms on one core, 128 px in 1 s.
    Measured on the shapes world (README, "Masks that follow the image"): the mean IoU of a mask whose point is on
    its object 0.55 -> 0.93 on one seed, 0.44 -> 0.89 on another.
    """

    def __init__(
        self,
        fraction: float = 0.5,
        radius: float = 0.1,
        sigma_colour: float = 0.1,
        iterations: int = 4,
        work_side: int = 64,
        edge_passes: int = 2,
        max_side: int = 1024,
    ) -> None:
        super().__init__(fraction, max_side)
        if not 0.0 < radius <= 0.5:
            raise ValueError(f"radius must be in (0, 0.5] of the image's longer side, got {radius}")
        if sigma_colour <= 0 or iterations < 1 or work_side < 8 or edge_passes < 0:
            raise ValueError(
                f"need sigma_colour > 0, iterations >= 1, work_side >= 8, edge_passes >= 0; got {sigma_colour}, "
                f"{iterations}, {work_side}, {edge_passes}"
            )
        self.radius, self.sigma_colour = radius, sigma_colour
        self.iterations, self.work_side, self.edge_passes = iterations, work_side, edge_passes

    def prepare(self, image: np.ndarray, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        if not maps:
            return maps
        height, width = image.shape[:2]
        size = _bounded_size(height, width, self.work_side)
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255.0)[None]
        guide, stacked = _resize(pixels, size, "area"), _resize(torch.stack(maps)[:, None], size, "bilinear")
        radius = max(1, round(self.radius * max(size)))
        filtered = joint_bilateral(stacked[:, 0], guide[0], radius, self.sigma_colour, self.iterations)
        if size == (height, width):
            return list(filtered)
        # The edge passes run at full resolution up to ``max_side`` (as the component labelling does), so a huge
        # photo costs memory in proportion to max_side^2, not to its own pixels.
        edge_size = _bounded_size(height, width, self.max_side)
        filtered = _resize(filtered[:, None], edge_size, "bilinear")[:, 0]
        if self.edge_passes:
            full = _resize(pixels, edge_size, "area")[0]
            filtered = joint_bilateral(filtered, full, 2, self.sigma_colour, self.edge_passes)
        return list(_resize(filtered[:, None], (height, width), "bilinear")[:, 0])


def _bounded_size(height: int, width: int, side: int) -> tuple[int, int]:
    """``(height, width)`` scaled down, if need be, to at most ``side`` pixels on the longer side."""
    scale = min(1.0, side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """``(N, C, H, W)`` resized to ``size`` (itself when it already has that size)."""
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def joint_bilateral(
    maps: torch.Tensor, guide: torch.Tensor, radius: int, sigma_colour: float, iterations: int = 1
) -> torch.Tensor:
    """``maps`` ``(N, H, W)`` filtered ``iterations`` times by the joint bilateral filter of ``guide`` ``(C, H, W)``:
    each pixel becomes the mean of the pixels within ``radius`` (a square window, borders replicated), weighted
    ``exp(-d^2 / 2 radius^2) * exp(-|g_p - g_q|^2 / 2 sigma_colour^2)`` by their distance ``d`` and the
    difference of their guide values."""
    if maps.ndim != 3 or guide.ndim != 3 or maps.shape[1:] != guide.shape[1:]:
        raise ValueError(
            f"maps (N, H, W) and guide (C, H, W) must share H, W; got {tuple(maps.shape)}, "
            f"{tuple(guide.shape)}"
        )
    n, height, width = maps.shape
    size = 2 * radius + 1
    pad = (radius, radius, radius, radius)

    def windows(x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, size * size, H * W)
        cols = F.unfold(F.pad(x, pad, mode="replicate"), size)
        return cols.view(x.shape[0], x.shape[1], size * size, height * width)

    centre = guide.reshape(guide.shape[0], 1, height * width)
    colour = ((windows(guide[None].float())[0] - centre) ** 2).sum(0)  # (K, H * W)
    offsets = torch.arange(size, dtype=torch.float32) - radius
    distance = (offsets[:, None] ** 2 + offsets[None, :] ** 2).reshape(-1, 1)
    weights = torch.exp(-colour / (2 * sigma_colour**2) - distance / (2 * radius**2))
    weights = weights / weights.sum(0)  # the centre's own weight is 1, so the sum is never 0
    out = maps.float()
    for _ in range(iterations):
        out = (windows(out[:, None])[:, 0] * weights).sum(1).view(n, height, width)
    return out


def component_at(region: torch.Tensor, x: int, y: int, max_side: int = 1024) -> np.ndarray:
    """The 8-connected component of boolean ``(H, W)`` ``region`` that contains pixel ``(x, y)``, as a bool
    array; connectivity is decided on ``region`` reduced to at most ``max_side`` pixels on its longer side
    (see ``ThresholdRefiner``), exactly when it is not larger than that."""
    from scipy import ndimage  # imported here: only this refiner needs it

    height, width = region.shape
    cell = -(-max(height, width) // max_side)  # ceil: pixels per side of a cell
    full = region.numpy()
    coarse = full
    if cell > 1:  # a cell belongs to the region when any of its pixels does
        padded = np.zeros((-(-height // cell) * cell, -(-width // cell) * cell), dtype=bool)
        padded[:height, :width] = full
        coarse = padded.reshape(padded.shape[0] // cell, cell, padded.shape[1] // cell, cell).any(axis=(1, 3))
    labels, _ = ndimage.label(coarse, structure=np.ones((3, 3), dtype=bool))
    label = labels[y // cell, x // cell]
    if label == 0:  # the point itself is outside the region (a peak below a degenerate threshold)
        return np.zeros((height, width), dtype=bool)
    component = labels == label
    if cell == 1:
        return component
    rows, cols = np.arange(height) // cell, np.arange(width) // cell
    return component[rows[:, None], cols[None, :]] & full


REFINERS: Mapping[str, Callable[..., Refiner]] = MappingProxyType(
    {"sam": SamRefiner, "threshold": ThresholdRefiner, "guided": GuidedRefiner}
)


def build_refiner(config: AttendConfig, device: str | torch.device = "cpu") -> Refiner:
    """The refiner ``config`` names (``refiner``, with ``sam_checkpoint`` and ``sam_type`` for SAM)."""
    if config.refiner == "sam":
        if not config.sam_checkpoint:
            raise ValueError("refiner 'sam' needs a SAM checkpoint (sam_checkpoint / --sam)")
        if config.sam_mode != "point" or config.more_masks:  # SamRefiner prompts points and keeps one mask
            raise ValueError("sam_mode/more_masks need grounding.sam_prompts.refiner_from_config")
        return SamRefiner(checkpoint=config.sam_checkpoint, model_type=config.sam_type, device=device)
    if config.refiner == "threshold":
        return ThresholdRefiner(fraction=config.threshold_fraction)
    if config.refiner == "guided":
        return GuidedRefiner(fraction=config.threshold_fraction)
    raise ValueError(f"unknown refiner {config.refiner!r}; choose from {sorted(REFINERS)}")
