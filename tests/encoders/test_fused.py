"""Tests of DiffLMM's fused encoder on the tiny config (configs/encoder/fused_tiny.yaml).

Checks the output layout (CLIP channels then the reduced diffusion channels, on the shared 8x8 grid)
against a separately built CLIP encoder and the diffusion features, that CLIP runs once per forward, and
which parameters train.
"""

from __future__ import annotations

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
