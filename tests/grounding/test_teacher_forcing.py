"""Teacher-forced PNG maps (``grounding.teacher_forcing``) against eager ``output_attentions=True``.

For tiny random models of real transformers classes (LLaVA; Qwen2.5-VL for M-RoPE, whose positions come from
the attention mask) and the project's own LMM, a caption of a different length per image is appended to each
left-padded prompt and right-padded; the captured row of caption token ``i`` must equal the layer- and
head-mean of the eager attention of the query at that token's *own* position, computed on each sample alone
(batch 1, no padding: the reference's setting), over the read grid's image keys.
"""

from __future__ import annotations

import copy

import hf_tiny
import pytest
import torch

from grounding.capture import AttentionCapture
from grounding.hf import registry
from grounding.teacher_forcing import append_responses, teacher_forced_rows

CAPTIONS = ["a large red square", "a small blue circle in the middle"]


def _eager_own_rows(model, ids, mask, extra, start, n, positions) -> torch.Tensor:
    """Layer- and head-mean eager attention of queries ``start .. start + n - 1`` to ``positions``."""
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True, **extra)
    per_layer = [a[0, :, start : start + n][..., positions].float().mean(dim=0) for a in out.attentions]
    return torch.stack(per_layer).mean(dim=0)


@pytest.fixture(scope="module", params=["hf-llava", "hf-qwen2.5-vl"])
def adapter(request, tmp_path_factory):
    import functools

    writers = {
        "hf-llava": hf_tiny.write_llava,
        "hf-qwen2.5-vl": functools.partial(hf_tiny.write_qwen_vl, version="2.5"),
    }
    folder = writers[request.param](tmp_path_factory.mktemp(request.param.replace(".", "_")))
    return registry.load(request.param, folder)


def test_teacher_forced_rows_equal_eager_rows_at_the_tokens_own_positions(adapter):
    images = hf_tiny.images()
    responses = [adapter.tokenizer.encode(c, add_special_tokens=False) for c in CAPTIONS]
    assert len(responses[0]) != len(responses[1])
    batch = adapter.prepare(images, hf_tiny.QUESTIONS)
    assert (batch.inputs["attention_mask"][:, 0] == 0).any(), "the prompts must be left-padded"
    got = teacher_forced_rows(adapter, batch, responses)

    eager = copy.deepcopy(adapter.model)
    eager.set_attn_implementation("eager")
    for b, (image, question, response) in enumerate(zip(images, hf_tiny.QUESTIONS, responses, strict=True)):
        alone = adapter.prepare([image], [question])  # batch 1: no padding at all
        view = alone.layouts[0].view()
        ids = torch.cat([alone.inputs["input_ids"], torch.tensor([response])], dim=1)
        mask = torch.ones_like(ids)
        start = alone.inputs["input_ids"].shape[1]
        extra = {k: v for k, v in alone.inputs.items() if k not in ("input_ids", "attention_mask")}
        if "mm_token_type_ids" in extra:  # Qwen's per-token modality: the caption is text (0)
            extra["mm_token_type_ids"] = torch.cat(
                [extra["mm_token_type_ids"], torch.zeros(1, len(response), dtype=torch.long)], dim=1
            )
        with torch.no_grad():
            want = _eager_own_rows(eager, ids, mask, extra, start, len(response), view.positions)
        rows, got_view = got[b]
        assert rows.shape == want.shape == (len(response), len(view.positions))
        assert got_view.grid == view.grid
        err = float((rows - want).abs().max() / want.abs().max())
        print(f"{adapter.settings['model']} sample {b}: max relative error {err:.2e}")
        assert err < 1e-5


def test_own_positions_are_the_producing_rows_shifted_by_one(adapter):
    batch = adapter.prepare(hf_tiny.images(), hf_tiny.QUESTIONS)
    responses = [adapter.tokenizer.encode(c, add_special_tokens=False) for c in CAPTIONS]
    full, start = append_responses(batch, responses, adapter.tokenizer.pad_token_id)
    assert start == batch.inputs["input_ids"].shape[1]
    assert full.inputs["input_ids"][1, start : start + len(responses[1])].tolist() == responses[1]
    assert full.inputs["attention_mask"][0, start + len(responses[0]) :].sum() == 0  # right padding
    positions = batch.image_positions
    with AttentionCapture(adapter.language_model, positions, response_start=start) as producing:
        adapter.forward(full)
    own = teacher_forced_rows(adapter, batch, responses)
    for (rows, _), prod, response in zip(own, producing.maps(), responses, strict=True):
        # Producing-mode row i + 1 is the query at token i's own position.
        assert torch.allclose(rows[:-1], prod[1 : len(response)], rtol=1e-5, atol=1e-7)
        assert not torch.allclose(rows[0], prod[0])  # the own row is not the row that produced the token
    with pytest.raises(ValueError, match="at least one token"):
        append_responses(batch, [responses[0], []], 0)
    with pytest.raises(ValueError, match="own_positions is a teacher-forced option"):
        AttentionCapture(adapter.language_model, positions, own_positions=True)


def test_the_project_lmm_teacher_forces_alike(tmp_path):
    """The project's LMM (``LlavaGrounding``: PromptBatch inputs, embeddings scattered into the image slots)."""
    from lmm.groundable import LlavaGrounding
    from lmm.released.llava15 import load_llava15
    from lmm.released.random_release import write_random_llava15

    lmm = load_llava15(*write_random_llava15(tmp_path, "tiny", dtype=torch.float32))
    grounding = LlavaGrounding(lmm)
    images = hf_tiny.images()
    tok = grounding.tokenizer
    responses = [tok.encode(c, add_special_tokens=False) for c in CAPTIONS]
    got = teacher_forced_rows(grounding, grounding.prepare(images, hf_tiny.QUESTIONS), responses)
    causal = copy.deepcopy(grounding.language_model)
    causal.set_attn_implementation("eager")
    for b, (image, question, response) in enumerate(zip(images, hf_tiny.QUESTIONS, responses, strict=True)):
        alone = grounding.prepare([image], [question]).inputs
        ids = torch.cat([alone.input_ids, torch.tensor([response])], dim=1)
        embeds = lmm.embed_inputs(ids, alone.images)
        start = alone.input_ids.shape[1]
        positions = torch.arange(*alone.image_spans[0])
        with torch.no_grad():
            out = causal(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), output_attentions=True)
        want = torch.stack(
            [a[0, :, start : start + len(response)][..., positions].float().mean(0) for a in out.attentions]
        ).mean(0)
        rows, _ = got[b]
        err = float((rows - want).abs().max() / want.abs().max())
        print(f"LlavaGrounding sample {b}: max relative error {err:.2e}")
        assert err < 1e-5
