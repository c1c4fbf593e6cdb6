"""The shared-prefix training pass (and the read-positions pass, ``lmm.loss_positions``) against the plain one:
the same loss and gradients, on real batches."""

from __future__ import annotations

import pytest
import torch
from conftest import load_benchmark

from lmm.batch import IGNORE_INDEX, collate
from lmm.build import build_model
from lmm.config import LoraConfig
from lmm.config_loading import load_config
from lmm.shared_prefix import MIN_SHARED_PREFIX, shared_prefix_length, strategy_allows_sharing

IMAGE = 99


def rows(prefix: int, tails: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded rows opening with the same ``prefix`` tokens, labels on every tail token."""
    length = prefix + max(len(t) for t in tails)
    ids = torch.zeros(len(tails), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, tail in enumerate(tails):
        ids[i, :prefix] = torch.arange(1, prefix + 1)
        ids[i, prefix : prefix + len(tail)] = torch.tensor(tail)
        mask[i, : prefix + len(tail)] = 1
        labels[i, prefix : prefix + len(tail)] = torch.tensor(tail)
    return ids, mask, labels


def test_prefix_length_stops_before_the_first_label_and_at_the_first_difference() -> None:
    ids, mask, labels = rows(12, [[50, 51, 52], [60, 61]])
    # Position 11's logits predict the first label (position 12): 11 positions are free of any loss.
    assert shared_prefix_length(ids, mask, labels, IMAGE) == 11
    unlabelled = labels.clone()
    unlabelled[:, 12] = IGNORE_INDEX  # the first tail token unsupervised: the tails still differ there
    assert shared_prefix_length(ids, mask, unlabelled, IMAGE) == 12
    ids[1, 10] = 7  # the rows now differ at position 10
    assert shared_prefix_length(ids, mask, unlabelled, IMAGE) == 10


def test_no_prefix_for_image_slots_padding_short_prefixes_or_one_row() -> None:
    ids, mask, labels = rows(12, [[50, 51, 52], [60, 61]])
    with_image = ids.clone()
    with_image[:, 3] = IMAGE  # visual tokens differ per sample even where the slots line up
    assert shared_prefix_length(with_image, mask, labels, IMAGE) == 0  # 3 < MIN_SHARED_PREFIX
    padded = mask.clone()
    padded[1, 9:] = 0
    assert shared_prefix_length(ids, padded, labels, IMAGE) == 9
    short = rows(MIN_SHARED_PREFIX - 1, [[50], [60]])
    assert shared_prefix_length(*short, IMAGE) == 0
    assert shared_prefix_length(ids[:1], mask[:1], labels[:1], IMAGE) == 0


def instruct_batch(model, world, n: int = 6):
    import webdataset as wds

    from datamodules.shards import ShardIndex, decode_sample

    stage = model.stage
    encode = model.sample_encoder(stage)
    index = ShardIndex.load(world / stage.data)
    samples = []
    for raw in wds.tariterators.tarfile_samples([{"url": url} for url in index.urls]):
        sample = encode(*decode_sample(raw))
        if "image" in sample or all("image" in s for s in samples):
            samples.append(sample)  # mostly image samples, one text-only row: both kinds of row
        if len(samples) == n:
            break
    return collate(samples, model.llm.tokenizer.pad_token_id)


def instruct_model(overrides: list[str], lora: bool = False):
    """The tiny default built for the instruct stage (LoRA on the LLM with ``lora``), in training mode."""
    config = load_config(None, overrides)
    stage = config.stages["instruct"]
    if lora:
        stage.llm, stage.lora = "lora", LoraConfig(r=4, alpha=8, dropout=0.0)
    model = build_model(config)
    model.configure_stage("instruct", stage)
    model.train()
    return model


#: The training passes ``LMM.training_loss`` can take, as (share_prefix, read_positions_only); the first is
#: the plain pass, transformers' own forward and loss, which the others must agree with.
PASSES = ((False, False), (True, False), (False, True), (True, True))


def training_pass(model, batch, images, share: bool, read_only: bool) -> tuple[torch.Tensor, tuple]:  # noqa: ANN001
    """The loss and the trainable parameters' gradients of one way of computing a batch's training loss."""
    model.share_prefix, model.read_positions_only = share, read_only
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model.training_loss(batch.input_ids, batch.attention_mask, images, batch.labels)
    return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)


def assert_passes_agree(model, world, batch=None) -> None:  # noqa: ANN001
    """On a real instruct batch with the system line shared (or ``batch``), every pass's loss and gradients
    are the plain pass's."""
    if batch is None:
        batch = instruct_batch(model, world)
        prefix = shared_prefix_length(
            batch.input_ids, batch.attention_mask, batch.labels, model.llm.image_token_id
        )
        assert prefix >= 25  # the Vicuna system line
    images = None if batch.images is None else model.encoder_pixels(batch.images)
    plain_loss, plain_grads = training_pass(model, batch, images, *PASSES[0])
    assert sum(g is not None for g in plain_grads) > 0
    for way in PASSES[1:]:
        loss, grads = training_pass(model, batch, images, *way)
        torch.testing.assert_close(
            loss, plain_loss, rtol=1e-5, atol=1e-6, msg=lambda m, way=way: f"{way}: {m}"
        )
        for plain, other in zip(plain_grads, grads, strict=True):
            assert (plain is None) == (other is None)
            if plain is not None:
                torch.testing.assert_close(other, plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("llm_mode", ["full", "lora"])
def test_shared_prefix_pass_matches_the_plain_pass(tiny_world, tiny_args, llm_mode: str) -> None:
    model = instruct_model(tiny_args(), lora=llm_mode == "lora")
    if llm_mode == "lora":  # adapters start at zero (B = 0): move them so their gradients mean something
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02)
    assert_passes_agree(model, tiny_world)


def test_benchmark_runs_every_way_on_the_same_batches(tiny_args, capsys, monkeypatch) -> None:
    bench = load_benchmark("shared_prefix")
    monkeypatch.setattr("sys.argv", ["shared_prefix.py", "--batches", "3", "--rounds", "1", *tiny_args()])
    bench.main()
    out = capsys.readouterr().out
    names = [name for name, *_ in bench.WAYS]
    rows = [
        line.split("|")[1:-1]
        for line in out.splitlines()
        if line.split("|")[1:2] in ([f" {n} "] for n in names)
    ]
    assert [r[0].strip() for r in rows] == names
    # tokens computed a batch and the last MLP's positions (timings are not asserted)
    (plain, plain_mlp), (shared, shared_mlp), (read, read_mlp) = ((float(r[1]), float(r[2])) for r in rows)
    assert shared < plain - 25 and read == shared
    assert plain_mlp == plain and shared_mlp == shared and read_mlp < shared / 2
    assert all(float(r[6]) < 1e-4 for r in rows)


def test_a_model_with_dropout_trains_the_plain_way(tiny_world, tiny_args) -> None:
    model = instruct_model([*tiny_args(), "llm.attention_dropout=0.3"])
    batch = instruct_batch(model, tiny_world)
    images = model.encoder_pixels(batch.images)
    losses = []
    for share in (False, True):
        model.share_prefix = share
        torch.manual_seed(3)  # the same dropout draws, if the same pass runs
        losses.append(model.training_loss(batch.input_ids, batch.attention_mask, images, batch.labels))
    assert torch.equal(losses[0], losses[1])
    torch.manual_seed(4)
    model.share_prefix = False
    assert not torch.equal(
        losses[0], model.training_loss(batch.input_ids, batch.attention_mask, images, batch.labels)
    )


def test_shared_prefix_pass_matches_the_plain_pass_on_qwen2(tiny_world, tiny_args, tmp_path) -> None:
    """Another decoder family loaded from a local folder (``llm.path``): grouped-query attention, q/k/v biases."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    vocab = len(AutoTokenizer.from_pretrained(tiny_world / "tokenizer")) + 1  # + the <image> placeholder
    qwen = Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    Qwen2ForCausalLM(qwen).save_pretrained(tmp_path / "qwen2")
    model = instruct_model([*tiny_args(), f"llm.path={tmp_path / 'qwen2'}"])
    assert type(model.llm.model).__name__ == "Qwen2ForCausalLM"
    assert_passes_agree(model, tiny_world)


def test_sharded_strategies_train_the_plain_way() -> None:
    assert strategy_allows_sharing("auto") and strategy_allows_sharing("ddp")
    assert strategy_allows_sharing("ddp_find_unused_parameters_true")
    for sharded in ("fsdp", "fsdp_cpu_offload", "deepspeed_stage_2", "deepspeed_stage_3_offload"):
        assert not strategy_allows_sharing(sharded)
