"""The training step's device-side image preparation: packed uint8 images from the datamodule become exactly
what the per-image inference transform gives, with the current stage's aspect, in float32 under autocast."""

import numpy as np
import pytest
import torch
from PIL import Image

from lmm.checkpoint import build_model
from lmm.config import load_config
from lmm.preprocess import collate

SHRINK = ["llm.hidden_size=32", "llm.num_layers=1", "llm.num_heads=2", "llm.intermediate_size=64"]


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
    keys = set(batch)
    prepared = model.prepare_batch(batch)
    transform = model.encoder.image_transform(stage.aspect)
    expected = torch.stack([transform(photo) for photo in photos])
    assert prepared["images"].dtype == torch.float32
    torch.testing.assert_close(prepared["images"], expected, atol=0, rtol=0)
    assert set(batch) == keys and batch["images"].dtype == torch.uint8, "the collated batch is left as it was"
    assert set(prepared) == keys - {"image_sizes"}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model.prepare_batch(batch)["images"], expected, atol=0, rtol=0)
    # The prepared batch trains: the loss is finite and the visual tokens fill the image slots.
    assert torch.isfinite(
        model(prepared["input_ids"], prepared["attention_mask"], prepared["images"]).logits
    ).all()


def test_prepare_batch_needs_a_stage(tiny_world):
    fresh = build_model(load_config(None, [f"llm.tokenizer={tiny_world}/tokenizer", *SHRINK]))
    stage = load_config(None, [f"llm.tokenizer={tiny_world}/tokenizer", *SHRINK]).stages["instruct"]
    _, batch = _batch(fresh, stage)
    with pytest.raises(RuntimeError, match="configure_stage"):
        fresh.prepare_batch(batch)
    text_only = {k: v for k, v in batch.items() if k not in ("images", "image_sizes")}
    assert fresh.prepare_batch(text_only) is text_only


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-true", torch.bfloat16), ("32-true", torch.float32)])
def test_images_get_the_cast_the_precision_plugin_gives_a_batch(model, tiny_world, precision, dtype):
    import lightning as L

    stage = load_config(None, [f"llm.tokenizer={tiny_world}/tokenizer", *SHRINK]).stages["instruct"]
    model.configure_stage("instruct", stage)
    _, batch = _batch(model, stage)
    model.trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False)
    try:
        assert model.prepare_batch(batch)["images"].dtype == dtype
    finally:
        model.trainer = None
