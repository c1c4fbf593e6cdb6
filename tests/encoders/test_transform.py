"""ImageTransform against the slow paths: PIL's bicubic with LLaVA's pad-then-resize geometry, torchvision's
per-image tensor path, and batching (mixed sizes, grouped resampling) against one image at a time."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as TF2

from encoders.transform import CLIP_MEAN, CLIP_STD, ImageTransform, pad_to_square, to_uint8_image


def _pil_reference(image, size, aspect):
    if aspect == "pad":
        image = pad_to_square(image, tuple(int(255 * m) for m in CLIP_MEAN)).resize(
            (size, size), Image.BICUBIC
        )
    elif aspect == "crop":
        image = TF.center_crop(
            TF.resize(image, size, interpolation=TF.InterpolationMode.BICUBIC), [size, size]
        )
    else:
        image = image.resize((size, size), Image.BICUBIC)
    return TF.normalize(TF.to_tensor(image), CLIP_MEAN, CLIP_STD)


def _photo(width, height):
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((width, height), Image.BILINEAR)


@pytest.mark.parametrize("aspect", ["pad", "crop", "resize"])
@pytest.mark.parametrize("wh", [(160, 96), (96, 160), (128, 128)])
def test_transform_matches_pil_geometry_and_values(aspect, wh):
    image = Image.new("RGB", wh, (10, 20, 30))
    image.paste((250, 240, 10), (20, 30, 60, 70))  # a box: its position must survive the transform
    out = ImageTransform(64, CLIP_MEAN, CLIP_STD, aspect)(image)
    ref = _pil_reference(image, 64, aspect)
    assert out.shape == ref.shape == (3, 64, 64) and out.dtype == torch.float32
    box_out, box_ref = out[0] > 1.0, ref[0] > 1.0  # red is high only inside the yellow box
    assert (box_out == box_ref).float().mean() > 0.99
    # On a photo, torchvision's antialiased uint8 bicubic (CPU) stays within a few grey levels of PIL's in a
    # few pixels (CUDA resamples in float: also within 3 levels).
    photo = _photo(*wh)
    diff = (ImageTransform(64, CLIP_MEAN, CLIP_STD, aspect)(photo) - _pil_reference(photo, 64, aspect)).abs()
    grey_level = 1 / 255 / min(CLIP_STD)
    assert diff.mean() < 0.25 * grey_level and diff.max() < 3.01 * grey_level


def test_batch_of_mixed_sizes_equals_one_image_at_a_time():
    transform = ImageTransform(48, CLIP_MEAN, CLIP_STD, "pad")
    images = [_photo(80, 50), _photo(50, 80), _photo(80, 50).rotate(90, expand=False), _photo(48, 48)]
    batch = transform.batch([to_uint8_image(im) for im in images])
    single = torch.stack([transform(im) for im in images])
    assert batch.shape == (4, 3, 48, 48)
    torch.testing.assert_close(batch, single, atol=0, rtol=0)
    # The per-image path is torchvision's own: paste the uint8 tensor on a mean-colour square, resize it.
    pixels = to_uint8_image(images[0]).permute(2, 0, 1)
    canvas = (
        torch.tensor([int(255 * m) for m in CLIP_MEAN], dtype=torch.uint8).view(3, 1, 1).repeat(1, 80, 80)
    )
    canvas[:, 15:65] = pixels
    resized = TF2.resize(canvas, [48, 48], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    torch.testing.assert_close(batch[0], TF.normalize(resized.float() / 255, CLIP_MEAN, CLIP_STD))


def test_pad_colour_is_the_mean_colour():
    out = ImageTransform(32, CLIP_MEAN, CLIP_STD, "pad")(Image.new("RGB", (64, 16), (255, 255, 255)))
    # Padding rows hold int(255 * mean) (LLaVA's expand2square), which normalises to about 0.
    assert out[:, 0].abs().max() < 0.02 and out[:, 16].min() > 1.0
    assert np.isfinite(out.numpy()).all()


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="aspect"):
        ImageTransform(32, CLIP_MEAN, CLIP_STD, "stretch")
    transform = ImageTransform(32, CLIP_MEAN, CLIP_STD, "pad")
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        transform.batch([torch.zeros(3, 8, 8, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="at least one"):
        transform.batch([])
    grey = to_uint8_image(Image.new("L", (5, 4), 7))
    assert grey.shape == (4, 5, 3) and grey.dtype == torch.uint8 and int(grey.max()) == 7
