"""The read-positions training pass (``lmm.loss_positions``): which positions a loss reads, the hooks that run a
token-wise module on those alone, and the loss against transformers' own on batches without a shared prefix."""

from __future__ import annotations

import torch
from test_shared_prefix import assert_passes_agree, instruct_batch, instruct_model
from torch import nn

from lmm.batch import IGNORE_INDEX
from lmm.loss_positions import last_layer_mlp, read_positions, rows_only, supports_read_positions_loss

X = IGNORE_INDEX


def test_a_position_is_read_when_the_next_label_is_supervised() -> None:
    labels = torch.tensor([[X, X, 5, 6, X, 7], [X, 4, X, X, X, X]])
    expected = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(read_positions(labels), expected)


def test_rows_only_runs_the_module_on_the_rows_alone_and_zeros_the_rest() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    x = torch.randn(2, 5, 4, requires_grad=True)
    rows = torch.tensor([[1, 0, 0, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.bool)
    seen: list[tuple[int, ...]] = []
    with rows_only(linear, rows):
        # registered after rows_only's own hook, so it sees what the module computes
        linear.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
        out = linear(x)
    assert seen == [(1, 4, 4)]  # one sequence of the 4 rows, not 10 positions
    reference = linear(x)  # the hooks are gone after the block
    assert seen[-1] == (2, 5, 4)
    torch.testing.assert_close(out[rows], reference[rows])
    assert torch.equal(out[~rows], torch.zeros(6, 3))
    (grad,) = torch.autograd.grad(out.sum(), x)
    (expected,) = torch.autograd.grad((reference * rows.unsqueeze(-1)).sum(), x)
    torch.testing.assert_close(grad, expected)


def test_the_read_positions_pass_matches_transformers_loss_on_a_pretraining_batch(
    tiny_world, tiny_args
) -> None:
    """A pretraining batch (image first, no shared prefix: only the captions are read), and a one-row
    instruct batch (no other row to share with)."""
    model = instruct_model(tiny_args())
    model.configure_stage("pretrain", model.run_config.stages["pretrain"], quiet=True)
    batch = instruct_batch(model, tiny_world)
    assert batch.images is not None and read_positions(batch.labels).float().mean() < 0.5
    assert_passes_agree(model, tiny_world, batch)
    model.configure_stage("instruct", model.run_config.stages["instruct"], quiet=True)
    assert_passes_agree(model, tiny_world, instruct_batch(model, tiny_world, n=1))


def test_the_last_layer_mlp_sees_only_the_read_positions(tiny_world, tiny_args) -> None:
    model = instruct_model(tiny_args())
    batch = instruct_batch(model, tiny_world)
    decoder = model.llm.model.get_decoder()
    shapes: list[tuple[int, ...]] = []
    for layer in decoder.layers:  # inside the MLP: what its own weights compute
        layer.mlp.gate_proj.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    images = model.encoder_pixels(batch.images)
    model.share_prefix = False
    model.training_loss(batch.input_ids, batch.attention_mask, images, batch.labels)
    rows, length = batch.labels.shape
    *earlier, last = shapes
    assert all(s[:2] == (rows, length) for s in earlier)
    assert last[:2] == (1, int(read_positions(batch.labels).sum()))
    assert last[1] < rows * length / 2


def test_checkpointed_layers_and_capped_logits_keep_the_full_pass(tiny_args) -> None:
    model = instruct_model(tiny_args())
    causal_lm = model.llm.model
    decoder = causal_lm.get_decoder()
    assert last_layer_mlp(decoder) is decoder.layers[-1].mlp
    causal_lm.gradient_checkpointing_enable()
    assert last_layer_mlp(decoder) is None  # recomputed in the backward pass, where the hooks are gone
    assert supports_read_positions_loss(causal_lm)
    causal_lm.config.final_logit_softcapping = 30.0  # Gemma 2: the logits are more than the head's output
    assert not supports_read_positions_loss(causal_lm)
