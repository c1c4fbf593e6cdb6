"""AttentionCapture with image positions given per sample (any count, any order, not contiguous), and with
models whose attention needs mirroring: a sliding window whose dynamic cache drops old keys (Gemma 3's text
model), attention sinks (refused). The reference is eager ``output_attentions=True`` on a copy of the same
weights, each layer's row placed at the sequence positions its keys hold.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from grounding.capture import AttentionCapture, image_position_index

HIDDEN = 64
N_NEW = 6


def _pair(model):
    model = model.eval()
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return model, ref


@pytest.fixture(scope="module")
def llama_pair():
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
        attn_implementation="sdpa",
    )
    return _pair(LlamaForCausalLM(config))


@pytest.fixture(scope="module")
def gemma_pair():
    """Gemma 3's text model: layers 0 and 2 see only the last 4 keys (sliding window), layer 1 all of them."""
    torch.manual_seed(4)
    config = Gemma3TextConfig(
        vocab_size=128,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
        attn_implementation="sdpa",
    )
    return _pair(Gemma3ForCausalLM(config))


def _reference(attentions, positions, prompt_len: int, layers=None) -> list[torch.Tensor]:
    """Per sample, the mean over layers and heads of each step's last query row at ``positions[b]``; a layer
    whose row is shorter than the sequence (sliding window) holds the last keys, so it is right-aligned."""
    maps = []
    for b, pos in enumerate(positions):
        rows = []
        for step, per_layer in enumerate(attentions):
            seq_len = prompt_len + step
            chosen = []
            for i, attention in enumerate(per_layer):
                if layers is not None and i not in layers:
                    continue
                row = attention[b, :, -1, :].float()
                full = torch.zeros(row.shape[0], seq_len)
                full[:, seq_len - row.shape[-1] :] = row
                chosen.append(full[:, torch.as_tensor(pos)].mean(dim=0))
            rows.append(torch.stack(chosen).mean(dim=0))
        maps.append(torch.stack(rows))
    return maps


def _assert_close(actual, expected, tol=1e-5):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == torch.float32 and a.shape == e.shape
        assert float((a - e).abs().max() / e.abs().max()) < tol


def _left_padded_ids(pads: list[int], length: int):
    ids = torch.randint(3, 120, (len(pads), length))
    mask = torch.ones_like(ids)
    for b, p in enumerate(pads):
        ids[b, :p] = 0
        mask[b, :p] = 0
    return ids, mask


def _generate(model, ids, mask, **kwargs):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=N_NEW,
        min_new_tokens=N_NEW,
        do_sample=False,
        **kwargs,
    )


def test_per_sample_positions_of_any_count_and_order(llama_pair):
    model, ref = llama_pair
    pads = [0, 3, 1]
    ids, mask = _left_padded_ids(pads, 16)
    # Different counts, gaps, one unordered (columns follow the given order), one as a tensor, one a range.
    positions = [[2, 5, 6, 9], torch.arange(4, 14, 2), range(7, 2, -2)]
    with AttentionCapture(model, positions) as cap:
        out = _generate(model, ids, mask)
    expected = _generate(ref, ids, mask, output_attentions=True, return_dict_in_generate=True)
    assert torch.equal(out, expected.sequences)
    maps = cap.maps()
    assert [m.shape for m in maps] == [(N_NEW, 4), (N_NEW, 5), (N_NEW, 3)]
    _assert_close(maps, _reference(expected.attentions, [list(p) for p in positions], 16))


def test_positions_and_span_forms_agree(llama_pair):
    model, _ = llama_pair
    ids, mask = _left_padded_ids([0, 2], 12)
    with AttentionCapture(model, [(3, 8), (5, 10)]) as spans:
        _generate(model, ids, mask)
    with AttentionCapture(model, [torch.arange(3, 8), [5, 6, 7, 8, 9]]) as listed:
        _generate(model, ids, mask)
    for a, b in zip(spans.maps(), listed.maps(), strict=True):
        assert torch.equal(a, b)


def test_teacher_forced_with_positions(llama_pair):
    model, ref = llama_pair
    ids, mask = _left_padded_ids([0, 2], 18)
    positions = [[1, 4, 8], [3, 5, 6, 7, 10]]
    starts = [12, 14]
    with AttentionCapture(model, positions, response_start=starts) as cap:
        model(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        attn = ref(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    expected = [
        torch.stack([a[b, :, start - 1 : 17, pos] for a in attn]).mean(dim=(0, 1))
        for b, (pos, start) in enumerate(zip(positions, starts, strict=True))
    ]
    _assert_close(cap.maps(), expected)


def test_sliding_window_keys_that_left_the_window_count_as_zero(gemma_pair):
    model, ref = gemma_pair
    pads = [0, 2]
    ids, mask = _left_padded_ids(pads, 12)
    positions = [[2, 3, 4, 10], [5, 6, 11]]  # early positions leave the 4-key window during generation
    with AttentionCapture(model, positions) as cap:
        out = _generate(model, ids, mask)
    expected = _generate(ref, ids, mask, output_attentions=True, return_dict_in_generate=True)
    assert torch.equal(out, expected.sequences)
    # The eager rows of the sliding layers really are shorter than the sequence: keys were dropped.
    assert expected.attentions[-1][0].shape[-1] < expected.attentions[-1][1].shape[-1]
    _assert_close(cap.maps(), _reference(expected.attentions, positions, 12))

    # Layer 0 alone (sliding, 4 keys): the query of step s sits at 11 + s and sees 8 + s .. 11 + s, so
    # position 2 is never seen and position 10 only at steps 0..2.
    with AttentionCapture(model, positions, layers=[0]) as sliding:
        _generate(model, ids, mask)
    maps = sliding.maps()
    assert maps[0][:, 0].eq(0).all()
    assert maps[0][:3, 3].gt(0).all() and maps[0][3:, 3].eq(0).all()
    _assert_close(maps, _reference(expected.attentions, positions, 12, layers={0}))


def test_position_errors_name_the_problem(llama_pair):
    model, _ = llama_pair
    with pytest.raises(ValueError, match="image_positions is empty"):
        image_position_index([])
    with pytest.raises(ValueError, match="sample 1 must be a non-empty 1-D integer"):
        image_position_index([[1, 2], []])
    with pytest.raises(ValueError, match="sample 0 must be a non-empty 1-D integer"):
        image_position_index([torch.tensor([1.0, 2.0])])
    with pytest.raises(ValueError, match="negative position"):
        image_position_index([[3, -1]])
    with pytest.raises(ValueError, match=r"image span \(5, 5\) of sample 0 is empty"):
        image_position_index([(5, 5)])
    ids, mask = _left_padded_ids([0], 8)
    with pytest.raises(ValueError, match="image position 8 is beyond the 8 positions"):
        with AttentionCapture(model, [[2, 8]]):
            _generate(model, ids, mask)


def test_attention_sinks_are_refused():
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_local_experts=2,
        num_experts_per_tok=1,
        layer_types=["full_attention"],
        attn_implementation="eager",
    )
    model = GptOssForCausalLM(config).eval()
    with pytest.raises(NotImplementedError, match="passes s_aux to its attention"):
        with AttentionCapture(model, [[0, 1]]):
            model(input_ids=torch.tensor([[1, 2, 3]]))
