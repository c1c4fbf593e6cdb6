"""Fidelity fix: the diffusion encoder's ``pixel_norm``. ``clip`` must give exactly what the released DiffLMM was
trained on: its SD tower built ``CLIPImageProcessor(size, crop_size, mean=[.5]*3, std=[.5]*3)``, which ignores
those keywords, so images were padded with CLIP's mean colour and normalised with CLIP's mean/std; the VAE
encoded that tensor as it was. The reference here is transformers' own CLIP image processor."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from encoders.registry import build_encoder, encoder_class
from encoders.transform import CLIP_MEAN, CLIP_STD, pad_to_square

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "encoder"


def _config(stem: str, **changes):
    section = OmegaConf.load(CONFIGS / f"{stem}.yaml").encoder
    schema = OmegaConf.structured(encoder_class(section.name).Config)
    return dataclasses.replace(OmegaConf.to_object(OmegaConf.merge(schema, section)), **changes)


@pytest.fixture(scope="module")
def clip_encoder():
    return build_encoder(_config("diffusion_tiny", pixel_norm="clip")).eval()


def _photo(width: int, height: int) -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((width, height), Image.BILINEAR)


def test_the_release_processor_ignores_its_mean_and_std_keywords():
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size=64, crop_size=64, mean=[0.5] * 3, std=[0.5] * 3)
    assert tuple(processor.image_mean) == CLIP_MEAN and tuple(processor.image_std) == CLIP_STD


def test_clip_transform_equals_clip_image_processor_with_mean_colour_padding(clip_encoder):
    from transformers import CLIPImageProcessorPil

    assert clip_encoder.image_mean == CLIP_MEAN and clip_encoder.image_std == CLIP_STD
    processor = CLIPImageProcessorPil(size=64, crop_size=64)  # CLIP's own mean/std, as the release got them
    photo = _photo(96, 60)
    # LLaVA's process_images with pad: expand2square with int(255 * image_mean) = (122, 116, 104), then the processor.
    fill = tuple(int(255 * m) for m in processor.image_mean)
    assert fill == (122, 116, 104)
    expected = processor(images=pad_to_square(photo, fill), return_tensors="pt")["pixel_values"][0]
    ours = clip_encoder.image_transform("pad")(photo)
    grey_level = 1 / 255 / min(CLIP_STD)
    diff = (ours - expected).abs()
    # torchvision's antialiased bicubic vs PIL's: within 3 grey levels (tests/encoders/test_transform.py).
    assert diff.max() < 3.01 * grey_level and diff.mean() < 0.25 * grey_level
    # Rows 0..9 of the 64 px square are padding only (the photo starts at row 18 of the 96 px square): exact.
    pad_value = (torch.tensor(fill) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(ours[:, :10], pad_value.view(3, 1, 1).expand(3, 10, 64))
    torch.testing.assert_close(expected[:, :10], pad_value.view(3, 1, 1).expand(3, 10, 64))


def test_sd_is_the_default_and_fused_inherits_the_field():
    sd = build_encoder(_config("diffusion_tiny"))
    assert sd.config.pixel_norm == "sd" and sd.image_mean == (0.5, 0.5, 0.5) == sd.image_std
    out = sd.image_transform("pad")(Image.new("RGB", (64, 16), (255, 255, 255)))
    assert torch.allclose(out[:, 0, 0], torch.full((3,), 127 / 255 * 2 - 1))  # SD's padding colour 127
    fused = build_encoder(_config("fused_tiny", pixel_norm="clip"))
    assert fused.image_mean == CLIP_MEAN and fused.image_std == CLIP_STD


def test_unknown_pixel_norm_is_refused_when_the_config_loads():
    from lmm.config_loading import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"encoder.pixel_norm = 'openai' is not one of: sd, clip"):
        load_config(None, ["encoder=diffusion_tiny", "encoder.pixel_norm=openai"])


def test_vae_encodes_the_clip_normalised_pixels_as_they_are(clip_encoder):
    """The release fed the processor's output straight to ``vae.encode`` and to ``sd_to_clip_img``."""
    pixels = clip_encoder.image_transform("pad")(_photo(80, 64))[None]
    seen = {}
    hook = clip_encoder.vae.encoder.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    clip_seen = {}
    clip_hook = clip_encoder.clip.register_forward_pre_hook(lambda m, args: clip_seen.update(x=args[0]))
    with torch.no_grad():
        clip_encoder(pixels)
    hook.remove()
    clip_hook.remove()
    torch.testing.assert_close(seen["x"], pixels, atol=0, rtol=0)
    # sd_to_clip_img: x * 0.5 + 0.5, then CLIP's mean/std (the sizes agree here, so no resize).
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(clip_seen["x"], (pixels * 0.5 + 0.5 - mean) / std)
