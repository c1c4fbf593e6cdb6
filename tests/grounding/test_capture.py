"""Tests for grounding.capture.AttentionCapture: its maps must equal the layer- and head-mean of eager
``output_attentions=True`` rows (an independent reference computed on an eager copy of the same weights), for
tiny random Llama and LLaVA models, batch 1 and left-padded batches, inputs_embeds and input_ids, generation
and teacher forcing; and the model must keep running SDPA and be restored exactly on exit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from grounding.capture import AttentionCapture

HIDDEN = 64
IMAGE_TOKEN = 127
N_NEW = 6


def _llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=128,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: two query heads per KV head
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.fixture(scope="module")
def llama_pair():
    torch.manual_seed(1)
    model = LlamaForCausalLM(_llama_config(attn_implementation="sdpa")).eval()
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return model, ref


@pytest.fixture(scope="module")
def llava_pair():
    torch.manual_seed(2)
    text = _llama_config(num_hidden_layers=2)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, attn_implementation="sdpa"
    )
    model = LlavaForConditionalGeneration(config).eval()
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return model, ref


def _generate_kwargs() -> dict:
    return dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)


def _reference_generate_maps(attentions, spans, layers=None) -> list[torch.Tensor]:
    """Mean over layers (all, or the listed ones) and heads of the last query row of every step, sliced to each
    sample's image keys."""
    maps = []
    for b, (start, end) in enumerate(spans):
        rows = [
            torch.stack(
                [layer[b, :, -1, start:end] for i, layer in enumerate(step) if layers is None or i in layers]
            ).mean(dim=(0, 1))
            for step in attentions
        ]
        maps.append(torch.stack(rows).float())
    return maps


def _assert_rel_close(actual: list[torch.Tensor], expected: list[torch.Tensor], tol: float = 1e-5) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == torch.float32 and a.device.type == "cpu"
        assert a.shape == e.shape
        err = (a - e).abs().max() / e.abs().max()
        assert err < tol, f"relative error {err:.3g}"


def _state(model) -> tuple:
    # to_dict() leaves the attention implementation out, so compare it separately.
    configs = [
        (m.config.to_dict(), m.config._attn_implementation) for m in model.modules() if hasattr(m, "config")
    ]
    return (
        configs,
        sorted(AttentionInterface._global_mapping),
        sorted(AttentionMaskInterface._global_mapping),
    )


def _left_padded_embeds(batch: int, length: int, pads: list[int]):
    embeds = torch.randn(batch, length, HIDDEN)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    return embeds, mask


@pytest.mark.parametrize("pads", [[0], [0, 3, 5]], ids=["batch1", "leftpad3"])
def test_generate_inputs_embeds_matches_eager(llama_pair, pads):
    model, ref = llama_pair
    embeds, mask = _left_padded_embeds(len(pads), 20, pads)
    spans = [(p + 2, p + 10) for p in pads]
    before = _state(model)
    assert model.config._attn_implementation == "sdpa"
    with AttentionCapture(model, spans) as cap:
        assert model.config._attn_implementation != "eager"
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, **_generate_kwargs())
    assert model.config._attn_implementation == "sdpa"
    assert _state(model) == before

    expected = ref.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        output_attentions=True,
        return_dict_in_generate=True,
        **_generate_kwargs(),
    )
    assert torch.equal(out, expected.sequences)
    maps = cap.maps()
    assert [m.shape for m in maps] == [(N_NEW, 8)] * len(pads)
    _assert_rel_close(maps, _reference_generate_maps(expected.attentions, spans))


@pytest.mark.parametrize("pads", [[0], [0, 4, 2]], ids=["batch1", "leftpad3"])
def test_generate_input_ids_matches_eager(llama_pair, pads):
    model, ref = llama_pair
    length = 16
    ids = torch.randint(3, 120, (len(pads), length))
    mask = torch.ones_like(ids)
    for b, p in enumerate(pads):
        ids[b, :p] = 0
        mask[b, :p] = 0
    spans = [(p + 1, p + 7) for p in pads]
    with AttentionCapture(model, spans) as cap:
        out = model.generate(input_ids=ids, attention_mask=mask, **_generate_kwargs())
    expected = ref.generate(
        input_ids=ids,
        attention_mask=mask,
        output_attentions=True,
        return_dict_in_generate=True,
        **_generate_kwargs(),
    )
    assert torch.equal(out, expected.sequences)
    _assert_rel_close(cap.maps(), _reference_generate_maps(expected.attentions, spans))


@pytest.mark.parametrize("layers", [[0], [-1, 0]], ids=["first", "last+first"])
def test_selected_layers_match_eager_over_those_layers(llama_pair, layers):
    model, ref = llama_pair
    n_layers = model.config.num_hidden_layers
    embeds, mask = _left_padded_embeds(2, 18, [0, 3])
    spans = [(2, 10), (5, 13)]
    with AttentionCapture(model, spans, layers=layers) as cap:
        model.generate(inputs_embeds=embeds, attention_mask=mask, **_generate_kwargs())
    expected = ref.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        output_attentions=True,
        return_dict_in_generate=True,
        **_generate_kwargs(),
    )
    chosen = {i % n_layers for i in layers}
    _assert_rel_close(cap.maps(), _reference_generate_maps(expected.attentions, spans, chosen))
    every = _reference_generate_maps(expected.attentions, spans)
    assert not torch.allclose(cap.maps()[0], every[0]), "a layer subset must differ from the all-layer mean"


def test_layer_selection_errors_name_the_problem(llama_pair):
    model, _ = llama_pair
    n_layers = model.config.num_hidden_layers
    with pytest.raises(ValueError, match=f"layer {n_layers} is out of range .* {n_layers} layers"):
        AttentionCapture(model, [(0, 4)], layers=[n_layers])
    with pytest.raises(ValueError, match="layers is empty"):
        AttentionCapture(model, [(0, 4)], layers=[])


def test_sdpa_kernel_still_does_the_work(llama_pair, monkeypatch):
    """The capture must delegate to SDPA, once per layer per step, not replace it with eager."""
    model, _ = llama_pair
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    embeds, mask = _left_padded_embeds(2, 12, [0, 2])
    with AttentionCapture(model, [(1, 5), (3, 7)]):
        model.generate(inputs_embeds=embeds, attention_mask=mask, **_generate_kwargs())
    assert len(calls) == model.config.num_hidden_layers * N_NEW


def test_eager_model_is_supported_and_stays_eager(llama_pair):
    _, ref = llama_pair
    embeds, mask = _left_padded_embeds(2, 12, [0, 2])
    spans = [(1, 5), (3, 7)]
    with AttentionCapture(ref, spans) as cap:
        ref.generate(inputs_embeds=embeds, attention_mask=mask, **_generate_kwargs())
    assert ref.config._attn_implementation == "eager"
    expected = ref.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        output_attentions=True,
        return_dict_in_generate=True,
        **_generate_kwargs(),
    )
    _assert_rel_close(cap.maps(), _reference_generate_maps(expected.attentions, spans))


def test_restores_state_when_generation_raises(llama_pair):
    model, _ = llama_pair
    before = _state(model)
    with pytest.raises(ValueError, match="image spans"):
        with AttentionCapture(model, [(0, 4)]):  # one span for a batch of two
            model.generate(inputs_embeds=torch.randn(2, 8, HIDDEN), **_generate_kwargs())
    assert _state(model) == before


def test_steps_after_eos_are_kept(llama_pair):
    """A sample that stops early keeps producing padding; every step is returned for every sample."""
    model, _ = llama_pair
    embeds, mask = _left_padded_embeds(2, 10, [0, 1])
    spans = [(1, 4), (2, 5)]
    free = model.generate(inputs_embeds=embeds, attention_mask=mask, **_generate_kwargs())
    eos = int(free[0, 1])  # sample 0 now stops after its second token
    assert eos not in free[1].tolist(), "choose another seed: sample 1 would stop too"
    with AttentionCapture(model, spans) as cap:
        out = model.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False, eos_token_id=eos
        )
    assert out[0, 2:].eq(model.config.pad_token_id).all()
    assert [m.shape[0] for m in cap.maps()] == [out.shape[1]] * 2


def test_teacher_forced_matches_eager_forward(llama_pair):
    model, ref = llama_pair
    pads, length, start = [0, 3, 1], 18, 12
    ids = torch.randint(3, 120, (3, length))
    mask = torch.ones_like(ids)
    for b, p in enumerate(pads):
        ids[b, :p] = 0
        mask[b, :p] = 0
    spans = [(p + 1, p + 6) for p in pads]
    with AttentionCapture(model, spans, response_start=start) as cap:
        model(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        attn = ref(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    expected = [
        torch.stack([a[b, :, start - 1 : length - 1, s:e] for a in attn]).mean(dim=(0, 1))
        for b, (s, e) in enumerate(spans)
    ]
    _assert_rel_close(cap.maps(), expected)

    # Per-sample response starts: each sample's rows begin at its own start.
    starts = [12, 14, 13]
    with AttentionCapture(model, spans, response_start=starts) as cap:
        model(input_ids=ids, attention_mask=mask)
    per_sample = [e[r - start :] for e, r in zip(expected, starts, strict=True)]
    _assert_rel_close(cap.maps(), per_sample)

    # Teacher forcing a generated response reproduces the generation maps.
    embeds, emask = _left_padded_embeds(1, 12, [0])
    with AttentionCapture(model, [(2, 8)]) as gen_cap:
        new = model.generate(inputs_embeds=embeds, attention_mask=emask, **_generate_kwargs())
    full = torch.cat([embeds, model.get_input_embeddings()(new)], dim=1)
    with AttentionCapture(model, [(2, 8)], response_start=12) as tf_cap:
        model(inputs_embeds=full)
    _assert_rel_close(tf_cap.maps(), gen_cap.maps())


def _llava_inputs(pads: list[int], n_text: int = 4):
    n_image = 16  # (32 / 8)^2 patches, CLS dropped by the "default" feature strategy
    rows, spans = [], []
    length = max(pads) + 2 + n_image + n_text
    for p in pads:
        body = [1, 5] + [IMAGE_TOKEN] * n_image + torch.randint(3, 120, (n_text + max(pads) - p,)).tolist()
        rows.append([0] * p + body)
        spans.append((p + 2, p + 2 + n_image))
    ids = torch.tensor(rows)
    assert ids.shape[1] == length
    mask = (torch.arange(length)[None, :] >= torch.tensor(pads)[:, None]).long()
    for b, (s, e) in enumerate(spans):  # the spans are read off input_ids, as a caller would
        positions = (ids[b] == IMAGE_TOKEN).nonzero().flatten()
        assert (int(positions[0]), int(positions[-1]) + 1) == (s, e)
    return ids, mask, torch.randn(len(pads), 3, 32, 32), spans


@pytest.mark.parametrize("pads", [[0], [0, 2, 3]], ids=["batch1", "leftpad3"])
def test_llava_generate_matches_eager(llava_pair, pads):
    model, ref = llava_pair
    ids, mask, pixels, spans = _llava_inputs(pads)
    before = _state(model)
    with AttentionCapture(model, spans) as cap:
        # Only the language model is switched; the vision tower keeps SDPA.
        assert model.config.vision_config._attn_implementation == "sdpa"
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **_generate_kwargs())
    assert _state(model) == before
    expected = ref.generate(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pixels,
        output_attentions=True,
        return_dict_in_generate=True,
        **_generate_kwargs(),
    )
    assert torch.equal(out, expected.sequences)
    _assert_rel_close(cap.maps(), _reference_generate_maps(expected.attentions, spans))


def test_wrapper_module_is_searched():
    """Our LMM is a plain nn.Module holding the causal LM (and perhaps an HF vision model)."""
    lm = LlamaForCausalLM(_llama_config(attn_implementation="sdpa")).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.llm = lm

    wrapper = Wrapper()
    with AttentionCapture(wrapper, [(0, 3)]) as cap:
        wrapper.llm.generate(inputs_embeds=torch.randn(1, 6, HIDDEN), **_generate_kwargs())
    assert cap.maps()[0].shape == (N_NEW, 3)
    with pytest.raises(ValueError, match="can generate"):
        AttentionCapture(torch.nn.Linear(2, 2), [(0, 1)])
