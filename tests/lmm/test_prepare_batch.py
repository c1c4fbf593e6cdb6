"""The training step's device-side image preparation: packed uint8 images from the datamodule become exactly
what the per-image inference transform gives, with the current stage's aspect, in float32 under autocast."""

import numpy as np
import pytest
import torch
from PIL import Image

from lmm.batch import collate
from lmm.build import build_model
from lmm.config_loading import load_config

SHRINK = [
    "encoder.pretrain=null",  # a random tower: no tower stage to run first
    "llm.hidden_size=32",
    "llm.num_layers=1",
    "llm.num_heads=2",
    "llm.intermediate_size=64",
]


@pytest.fixture(scope="module")
def model(tiny_world):
    return build_model(load_config(None, [f"llm.tokenizer={tiny_world}/tokenizer", *SHRINK]))


def _batch(model, stage):
    rng = np.random.default_rng(0)
    photos = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 90), (70, 30)]
    ]
    encode = model.sample_encoder(stage)
    record = {
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "Red."},
        ]
    }
    text_only = {
        "conversations": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "Red."}]
    }
    samples = [encode(record, photos[0]), encode(record, photos[1])]
    if stage.template != "plain":  # captions always have an image; chats mix in text-only samples
        samples.insert(1, encode(text_only, None))
    return photos, collate(samples, pad_token_id=model.llm.tokenizer.pad_token_id)


@pytest.mark.parametrize("stage_name", ["pretrain", "instruct"])
def test_packed_images_become_the_inference_transform_of_each_image(model, tiny_world, stage_name):
    config = load_config(None, [f"llm.tokenizer={tiny_world}/tokenizer", *SHRINK])
    stage = config.stages[stage_name]
    model.configure_stage(stage_name, stage)
    photos, batch = _batch(model, stage)
    packed = batch.images.data.clone()
    pixels = model.encoder_pixels(batch.images)
    transform = model.encoder.image_transform(stage.aspect)
    expected = torch.stack([transform(photo) for photo in photos])
    assert pixels.dtype == torch.float32
    torch.testing.assert_close(pixels, expected, atol=0, rtol=0)
    assert torch.equal(batch.images.data, packed), "the collated batch is left as it was"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model.encoder_pixels(batch.images), expected, atol=0, rtol=0)
    # The batch trains: the loss is finite and the visual tokens fill the image slots.
    out = model(batch.input_ids, batch.attention_mask, pixels, batch.labels)
    assert torch.isfinite(out.loss)


def test_encoder_pixels_needs_a_stage(tiny_world):
    fresh = build_model(load_config(None, [f"llm.tokenizer={tiny_world}/tokenizer", *SHRINK]))
    stage = load_config(None, [f"llm.tokenizer={tiny_world}/tokenizer", *SHRINK]).stages["instruct"]
    _, batch = _batch(fresh, stage)
    with pytest.raises(RuntimeError, match="configure_stage"):
        fresh.encoder_pixels(batch.images)


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-true", torch.bfloat16), ("32-true", torch.float32)])
def test_images_get_the_cast_the_precision_plugin_gives_a_batch(model, tiny_world, precision, dtype):
    import lightning as L

    stage = load_config(None, [f"llm.tokenizer={tiny_world}/tokenizer", *SHRINK]).stages["instruct"]
    model.configure_stage("instruct", stage)
    _, batch = _batch(model, stage)
    model.trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False)
    try:
        assert model.encoder_pixels(batch.images).dtype == dtype
    finally:
        model.trainer = None
