"""Image transforms: decoded pixels as uint8, and the resize / pad / crop + normalisation every encoder uses.

Training runs ``ImageTransform`` in two halves: dataloader workers only decode to uint8 (``to_uint8_image``),
and ``ImageTransform.batch`` resizes, pads or crops and normalises on the accelerator after the batch is
transferred. Inference calls the same code on one image, so both paths see identical pixels, and
attend-and-segment inverts exactly the geometry recorded in the transform's fields.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from encoders.config import ASPECT_MODES

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_uint8_image(image: Image.Image | Tensor) -> Tensor:
    """A PIL image (any mode) or an ``(H, W, 3)`` uint8 tensor -> ``(H, W, 3)`` uint8 RGB tensor.

    The result may be a read-only view of the PIL image's pixels (copy it before writing in place).
    Channels-last is the layout decoders produce; keeping it until the accelerator saves a strided copy of
    every image in the dataloader workers (the permute to ``(3, H, W)`` is free on the device).
    """
    if isinstance(image, Tensor):
        _check_uint8_image(image)
        return image
    if image.mode != "RGB":
        image = image.convert("RGB")
    pixels = np.asarray(image)
    with warnings.catch_warnings():
        # Pillow exports its pixels read-only; copying them writable would cost as much as a third of
        # the JPEG decode. Everything downstream (collate, ``batch``) copies before it writes.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(pixels)


def _check_uint8_image(image: Tensor) -> None:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image tensor must be (H, W, 3) uint8, got {tuple(image.shape)} {image.dtype}")


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """Images -> normalised ``(3, size, size)`` float tensors; picklable, device-agnostic.

    Training runs it in two halves: dataloader workers only decode to uint8 (``to_uint8_image``), and
    ``batch`` resizes, pads or crops and normalises on the accelerator after the batch is transferred,
    which keeps the workers at the speed of JPEG decoding. Inference calls the same code on one image
    (``__call__``), so both paths see identical pixels. The geometry is LLaVA's; resampling is torchvision's
    antialiased bicubic rounded to uint8, which stays within 3 grey levels of PIL's bicubic (LLaVA's
    CLIPImageProcessor) and on CPU matches it in all but a fraction of a percent of pixels when shrinking.
    The fields are everything attend-and-segment needs to map a token grid back onto the original image.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    aspect: str = "pad"

    def __post_init__(self) -> None:
        if self.aspect not in ASPECT_MODES:
            raise ValueError(f"image aspect {self.aspect!r} is not one of {ASPECT_MODES}")

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        return self.batch([to_uint8_image(image)])[0]

    def batch(self, images: Sequence[Tensor]) -> Tensor:
        """``(H, W, 3)`` uint8 images of any sizes, all on one device -> ``(N, 3, size, size)`` float32 there."""
        return self.normalize(self.squares(images))

    def squares(self, images: Sequence[Tensor]) -> Tensor:
        """The geometric half of ``batch``: ``(H, W, 3)`` uint8 images -> ``(N, 3, size, size)`` uint8 squares."""
        if not images:
            raise ValueError("ImageTransform.batch needs at least one image")
        device = images[0].device
        out = torch.empty(len(images), 3, self.size, self.size, dtype=torch.uint8, device=device)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            _check_uint8_image(image)
            by_size.setdefault((image.shape[0], image.shape[1]), []).append(i)
        for (height, width), rows in by_size.items():
            # Same-size images (every image of a rendered data set) are resampled in one call.
            stack = torch.stack([images[i] for i in rows]).permute(0, 3, 1, 2)
            out[rows] = self._square(stack, height, width)
        return out

    def normalize(self, squares: Tensor) -> Tensor:
        """The normalising half of ``batch``: ``(N, 3, size, size)`` uint8 -> float32 with ``mean`` / ``std``."""
        scale = torch.tensor(self.std, device=squares.device).mul_(255.0).view(1, 3, 1, 1)
        shift = torch.tensor(self.mean, device=squares.device).mul_(255.0).view(1, 3, 1, 1)
        return squares.float().sub_(shift).div_(scale)

    def _square(self, images: Tensor, height: int, width: int) -> Tensor:
        bicubic = TF.InterpolationMode.BICUBIC
        if self.aspect == "pad":
            # LLaVA's expand2square (the mean colour truncated to uint8, as LLaVA does) and then the resize.
            side = max(height, width)
            fill = torch.tensor([int(255 * m) for m in self.mean], dtype=torch.uint8, device=images.device)
            if height != width:
                canvas = fill.view(1, 3, 1, 1).expand(images.shape[0], 3, side, side).clone()
                top, left = (side - height) // 2, (side - width) // 2
                canvas[:, :, top : top + height, left : left + width] = images
                images = canvas
            return TF.resize(images, [self.size, self.size], interpolation=bicubic, antialias=True)
        if self.aspect == "crop":
            # Short side to ``size`` (long side int(size * long / short)), then the centre crop with
            # CLIPImageProcessor's floor offsets (torchvision's center_crop rounds them).
            resized = TF.resize(images, [self.size], interpolation=bicubic, antialias=True)
            top, left = (resized.shape[-2] - self.size) // 2, (resized.shape[-1] - self.size) // 2
            return resized[:, :, top : top + self.size, left : left + self.size]
        return TF.resize(images, [self.size, self.size], interpolation=bicubic, antialias=True)


def pad_to_square(image: Image.Image, fill: Sequence[int], side: int | None = None) -> Image.Image:
    """Pad a PIL image to a centred square (side max(W, H) by default) filled with ``fill`` (LLaVA's
    ``expand2square``)."""
    width, height = image.size
    side = side or max(width, height)
    if width == height == side:
        return image
    canvas = Image.new(image.mode, (side, side), tuple(fill))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas
