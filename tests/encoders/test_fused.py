"""Tests of DiffLMM's fused encoder on the tiny config (configs/encoder/fused_tiny.yaml).

Checks the output layout (CLIP channels then the reduced diffusion channels, on the shared 8x8 grid)
against a separately built CLIP encoder and the diffusion features, that CLIP runs once per forward, and
which parameters train.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from encoders.clip import ClipEncoder
from encoders.fused import FusedEncoder
from encoders.registry import build_encoder, encoder_class
from encoders.transform import CLIP_MEAN, CLIP_STD

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "encoder"


@pytest.fixture(scope="module")
def raw_config():
    return OmegaConf.load(CONFIGS / "fused_tiny.yaml")


@pytest.fixture(scope="module")
def encoder(raw_config) -> FusedEncoder:
    schema = OmegaConf.structured(encoder_class(raw_config.encoder.name).Config)
    return build_encoder(OmegaConf.to_object(OmegaConf.merge(schema, raw_config.encoder))).eval()


def images(batch: int) -> torch.Tensor:
    return torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch)) * 2 - 1


def test_config_sets_positional_projector(raw_config):
    assert raw_config.projector.name == "mlp2x_gelu"
    assert raw_config.projector.positional_embedding is True
    real = OmegaConf.load(CONFIGS / "fused.yaml")
    assert real.projector.positional_embedding is True and real.encoder.dm_dim == 1024


def test_output_layout(encoder):
    assert isinstance(encoder, FusedEncoder)
    assert encoder.embed_dim == 128 + 32 and encoder.grid == (8, 8) and encoder.num_tokens == 64
    x = images(3)
    with torch.no_grad():
        out = encoder(x)
        assert out.shape == (3, 64, 160)
        # CLIP channels come first and are exactly an independently built CLIP's output.
        clip = ClipEncoder(encoder.config.clip).eval()
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        assert torch.equal(out[..., :128], clip(((x + 1) / 2 - mean) / std))
        dm = encoder.diffusion(x)
        expected = F.gelu(
            F.layer_norm(dm, (64,), encoder.norm.weight, encoder.norm.bias)
            @ encoder.reduce.weight[:, :, 0, 0].T
            + encoder.reduce.bias
        )
        assert torch.allclose(out[..., 128:], expected, atol=1e-5)


def test_clip_runs_once_per_forward(encoder):
    calls = []
    hook = encoder.diffusion.clip.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            encoder(images(2))
    finally:
        hook.remove()
    assert len(calls) == 1


def test_trainable_parts_and_gradients(encoder):
    trainable = {name for name, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.split(".")[0] in ("norm", "reduce") or n.startswith("diffusion.captioner.") for n in trainable
    )
    assert {"norm.weight", "reduce.weight", "diffusion.captioner.pos_embed"} <= trainable
    encoder.train()
    try:
        assert not encoder.diffusion.unet.training and not encoder.diffusion.clip.training
        encoder(images(2)).sum().backward()
        for name, param in encoder.named_parameters():
            if param.requires_grad:
                assert param.grad is not None and param.grad.abs().sum() > 0, name
            else:
                assert param.grad is None, name
    finally:
        encoder.zero_grad(set_to_none=True)
        encoder.eval()


def test_token_smoothing_reaches_both_halves_of_a_fused_token(raw_config):
    """With the CLIP tower's ``smoothing_steps`` set, the U-Net half is smoothed exactly as the CLIP half is: by
    the colours of the CLIP tower's input, so both halves of a token speak for the same region."""
    from encoders.token_smoothing import colour_guided_smoothing

    conv = OmegaConf.load(CONFIGS / "fused_tiny_pretrained.yaml").encoder.clip
    conv.pop("pretrain")

    def build(**smoothing):
        raw = OmegaConf.merge(raw_config.encoder, {"clip": conv}, {"clip": smoothing})
        schema = OmegaConf.structured(encoder_class(raw.name).Config)
        return build_encoder(OmegaConf.to_object(OmegaConf.merge(schema, raw))).eval()

    plain, smoothed = build(), build(smoothing_steps=2, smoothing_sigma=0.4)
    x = images(2)
    with torch.no_grad():
        out_plain, out = plain(x), smoothed(x)
        width = smoothed.diffusion.clip.embed_dim
        clip_inputs = plain.diffusion.clip_inputs(x)
        assert torch.equal(out[..., :width], smoothed.diffusion.clip(clip_inputs))
        assert not torch.allclose(out[..., :width], out_plain[..., :width])
        # The U-Net half before its smoothing: the same encoder (its captioner reads the smoothed CLIP tokens) with
        # the setting read at forward time cleared; the tower keeps smoothing the CLIP half.
        config = smoothed.diffusion.config
        smoothed.diffusion.config = dataclasses.replace(
            config, clip=dataclasses.replace(config.clip, smoothing_steps=0)
        )
        unsmoothed = smoothed(x)
        smoothed.diffusion.config = config
        assert torch.equal(unsmoothed[..., :width], out[..., :width])
        dm = unsmoothed[..., width:].transpose(1, 2).reshape(2, -1, 8, 8)
        expected = colour_guided_smoothing(dm, clip_inputs, 2, 0.4).flatten(2).transpose(1, 2)
        torch.testing.assert_close(out[..., width:], expected)
        assert not torch.allclose(out[..., width:], unsmoothed[..., width:])
        # The mixing grounding attributes attention through is that smoothing, for both halves.
        mixing = smoothed.token_mixing(x)
        torch.testing.assert_close(out[..., width:], mixing @ unsmoothed[..., width:])
