"""ImageTransform against torchvision's slow path: LLaVA's pad-then-resize geometry, crop, normalisation."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from encoders.base import CLIP_MEAN, CLIP_STD, ImageTransform, pad_to_square


def _reference(image, size, aspect):
    if aspect == "pad":
        image = pad_to_square(image, tuple(round(255 * m) for m in CLIP_MEAN)).resize(
            (size, size), Image.BICUBIC
        )
    elif aspect == "crop":
        image = TF.center_crop(
            TF.resize(image, size, interpolation=TF.InterpolationMode.BICUBIC), [size, size]
        )
    else:
        image = image.resize((size, size), Image.BICUBIC)
    return TF.normalize(TF.to_tensor(image), CLIP_MEAN, CLIP_STD)


@pytest.mark.parametrize("aspect", ["pad", "crop", "resize"])
@pytest.mark.parametrize("wh", [(160, 96), (96, 160), (128, 128)])
def test_transform_matches_the_reference_geometry(aspect, wh):
    image = Image.new("RGB", wh, (10, 20, 30))
    image.paste((250, 240, 10), (20, 30, 60, 70))  # a box: its position must survive the transform
    out = ImageTransform(64, CLIP_MEAN, CLIP_STD, aspect)(image)
    ref = _reference(image, 64, aspect)
    assert out.shape == ref.shape == (3, 64, 64) and out.dtype == torch.float32
    box_out, box_ref = out[0] > 1.0, ref[0] > 1.0  # red is high only inside the yellow box
    assert (box_out == box_ref).float().mean() > 0.99
    if aspect != "pad":
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)  # identical resampling, faster conversion
    else:
        assert (out - ref).abs().mean() < 0.02  # resize-then-pad differs only at the box and pad borders


def test_pad_colour_is_the_mean_colour():
    out = ImageTransform(32, CLIP_MEAN, CLIP_STD, "pad")(Image.new("RGB", (64, 16), (255, 255, 255)))
    # Padding rows hold round(255 * mean), which normalises to about 0.
    assert out[:, 0].abs().max() < 0.02 and out[:, 16].min() > 1.0
    with pytest.raises(ValueError, match="aspect"):
        ImageTransform(32, CLIP_MEAN, CLIP_STD, "stretch")
    assert np.isfinite(out.numpy()).all()
