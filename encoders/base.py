"""The visual-encoder interface every encoder implements, the image transforms, and the encoder registry.

An encoder is a LightningModule that turns a batch of preprocessed images into a sequence of visual
tokens laid out on a (h, w) grid: ``forward(images) -> (B, h * w, embed_dim)``. It owns the image
transform it needs (size, normalisation and aspect handling), so the datamodule can apply it in its
workers and attend-and-segment can invert it exactly. Encoders keep their pretrained parts frozen and in
eval mode whatever Lightning does with ``train()``; parameters an encoder leaves trainable (DiffLMM's
implicit captioner, the fused block) are trained with the projector. Configs pick an encoder by its
registry name (``encoder.name: clip``); each encoder class declares a ``Config`` dataclass that is the
schema of its config section.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

#: Aspect modes. ``crop``: resize the short side, centre-crop (LLaVA pretraining). ``pad``: pad to a square
#: with the mean colour, then resize (LLaVA-1.5 instruction tuning). ``resize``: squash to a square.
ASPECT_MODES = ("crop", "pad", "resize")

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
        scale = torch.tensor(self.std, device=device).mul_(255.0).view(1, 3, 1, 1)
        shift = torch.tensor(self.mean, device=device).mul_(255.0).view(1, 3, 1, 1)
        return out.float().sub_(shift).div_(scale)

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


class VisualEncoder(L.LightningModule, ABC):
    """Base class: images -> (B, h*w, embed_dim) visual tokens on a fixed grid.

    Subclasses set ``Config`` (a dataclass), build their modules in ``__init__(config)``, list the frozen
    submodules in ``frozen_modules()`` and implement the abstract properties and ``forward``.
    """

    Config: ClassVar[type]

    @property
    @abstractmethod
    def embed_dim(self) -> int:
        """Width of each output token."""

    @property
    @abstractmethod
    def grid(self) -> tuple[int, int]:
        """(h, w) of the token grid; tokens are flattened row-major."""

    @property
    @abstractmethod
    def image_size(self) -> int:
        """Side of the square input image in pixels."""

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return CLIP_MEAN

    @property
    def image_std(self) -> tuple[float, float, float]:
        return CLIP_STD

    def image_transform(self, aspect: str = "pad") -> Callable[[Image.Image], Tensor]:
        return ImageTransform(self.image_size, self.image_mean, self.image_std, aspect)

    @abstractmethod
    def forward(self, images: Tensor) -> Tensor:
        """images: (B, 3, S, S) as produced by ``image_transform`` -> (B, h*w, embed_dim)."""

    def frozen_modules(self) -> Iterator[nn.Module]:
        """Submodules holding pretrained weights that never train (kept in eval mode, not checkpointed)."""
        return iter(())

    def freeze_pretrained(self) -> None:
        for module in self.frozen_modules():
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True) -> VisualEncoder:
        # Lightning calls model.train() at the start of every fit loop; frozen towers must keep their
        # eval behaviour (dropout off, norm statistics fixed) or features differ between train and eval.
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self


ENCODERS: dict[str, type[VisualEncoder]] = {}


def register_encoder(name: str) -> Callable[[type[VisualEncoder]], type[VisualEncoder]]:
    """Class decorator adding an encoder to the registry under ``name``."""

    def add(cls: type[VisualEncoder]) -> type[VisualEncoder]:
        if name in ENCODERS and ENCODERS[name] is not cls:
            raise ValueError(f"encoder name {name!r} is already registered by {ENCODERS[name].__name__}")
        ENCODERS[name] = cls
        return cls

    return add


def encoder_class(name: str) -> type[VisualEncoder]:
    """Look an encoder class up by registry name, with a one-line error listing the known names."""
    import encoders  # noqa: F401  (importing the package registers the built-in encoders)

    try:
        return ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; expected one of {sorted(ENCODERS)}") from None


def build_encoder(config: Any) -> VisualEncoder:
    """Build the encoder named by ``config.name`` from its config section (a dataclass or mapping)."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"encoder config must be a dataclass instance, got {type(config).__name__}")
    return encoder_class(config.name)(config)


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Build random-initialised modules reproducibly, without touching the caller's RNG stream.

    Frozen weights never go into checkpoints, so a randomly initialised frozen tower (the tiny default
    models) must come out identical every time the run is rebuilt from its config.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
