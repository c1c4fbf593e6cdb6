"""Tests of the DiffLMM diffusion encoder on tiny random Stable-Diffusion parts (configs/encoder/diffusion_tiny.yaml).

The references are independent of the code under test where it matters: the truncated U-Net is compared
with diffusers' own full forward (its ``up_blocks[i]`` output captured by a hook), an SD folder written by
diffusers' ``save_pretrained`` must load back to the same features, and the feature grid of the real SD-1.5
architecture is checked on a meta-device U-Net (no weights allocated).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from encoders.diffusion import (
    DiffusionEncoder,
    DiffusionEncoderConfig,
    check_unet_supported,
    sd15_unet_config,
    unet_feature_size,
    unet_features,
)
from encoders.registry import build_encoder, encoder_class
from encoders.transform import CLIP_MEAN, CLIP_STD

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "encoder"


def load_config(stem: str):
    """A config file's ``encoder:`` section as its Config dataclass, the way a YAML run builds it."""
    section = OmegaConf.load(CONFIGS / f"{stem}.yaml").encoder
    schema = OmegaConf.structured(encoder_class(section.name).Config)
    return OmegaConf.to_object(OmegaConf.merge(schema, section))


@pytest.fixture(scope="module")
def config() -> DiffusionEncoderConfig:
    return load_config("diffusion_tiny")


@pytest.fixture(scope="module")
def encoder(config) -> DiffusionEncoder:
    return build_encoder(config).eval()


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def save_sd_folder(encoder: DiffusionEncoder, folder: Path) -> None:
    encoder.unet.save_pretrained(folder / "unet")
    encoder.vae.save_pretrained(folder / "vae")
    encoder.scheduler.save_pretrained(folder / "scheduler")


def test_tiny_config_shapes(encoder):
    assert encoder.grid == (8, 8) == encoder.clip.grid
    assert encoder.embed_dim == 64 and encoder.num_tokens == 64 and encoder.image_size == 64
    with torch.no_grad():
        out = encoder(images(3))
    assert out.shape == (3, 64, 64)
    assert torch.isfinite(out).all()


def test_sd15_architecture_grid_on_meta_device():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15_unet_config())
    # 384 px / VAE factor 8 = 48 latents -> up_blocks[1] at 24x24 with 1280 channels (the CLIP-336 grid).
    assert unet_feature_size(unet, 48, 1) == 24
    assert list(reversed(unet.config.block_out_channels))[1] == 1280
    assert unet.config.cross_attention_dim == 768
    check_unet_supported(unet)


@pytest.mark.parametrize(("up_block", "side"), [(0, 16), (1, 16), (2, 16), (3, 16), (1, 14), (3, 14)])
def test_truncated_unet_equals_full_forward(encoder, up_block, side):
    """unet_features == diffusers' full forward's up_blocks[i] output (14: non-halving sides)."""
    gen = torch.Generator().manual_seed(side)
    sample = torch.randn(2, 4, side, side, generator=gen)
    ehs = torch.randn(2, 64, 32, generator=gen)
    t = torch.tensor([100])
    captured = {}
    hook = encoder.unet.up_blocks[up_block].register_forward_hook(lambda m, i, o: captured.update(out=o))
    try:
        with torch.no_grad():
            encoder.unet(sample, t, encoder_hidden_states=ehs)
            ours = unet_features(encoder.unet, sample, t, ehs, up_block)
    finally:
        hook.remove()
    assert torch.equal(ours, captured["out"])
    assert ours.shape[-1] == unet_feature_size(encoder.unet, side, up_block)


def test_encoder_features_equal_reference_pipeline(encoder):
    """The encoder's forward equals VAE mean -> scale -> add_noise -> full U-Net, built here by hand."""
    x = images(2)
    with torch.no_grad():
        latents = encoder.vae.encode(x).latent_dist.mean * encoder.vae.config.scaling_factor
        noise = encoder.fixed_noise.expand_as(latents)
        noisy = encoder.scheduler.add_noise(latents, noise, torch.tensor([100, 100]))
        alpha = encoder.scheduler.alphas_cumprod[100]
        assert torch.allclose(noisy, alpha.sqrt() * latents + (1 - alpha).sqrt() * noise, atol=1e-6)
        # CLIP sees the image un-normalised from [-1, 1] and CLIP-normalised (same 64 px size: no resize).
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        captions = encoder.captioner(encoder.clip(((x + 1) / 2 - mean) / std))
        captured = {}
        hook = encoder.unet.up_blocks[1].register_forward_hook(lambda m, i, o: captured.update(out=o))
        try:
            encoder.unet(noisy, 100, encoder_hidden_states=captions)
        finally:
            hook.remove()
        ours = encoder(x)
    assert torch.equal(ours, captured["out"].flatten(2).transpose(1, 2))


def test_sd_folder_roundtrip(encoder, config, tmp_path):
    from diffusers import PNDMScheduler

    save_sd_folder(encoder, tmp_path)
    # SD-1.5 ships a PNDM scheduler config; the DDPM scheduler must read the same noise schedule from it.
    shutil.rmtree(tmp_path / "scheduler")
    PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    ).save_pretrained(tmp_path / "scheduler")
    loaded = DiffusionEncoder(
        dataclasses.replace(config, sd_path=str(tmp_path), unet_config={}, vae_config={})
    ).eval()
    x = images(2)
    with torch.no_grad():
        assert torch.equal(loaded(x), encoder(x))


def test_missing_component_and_weights(encoder, config, tmp_path):
    save_sd_folder(encoder, tmp_path)
    (tmp_path / "text_encoder").mkdir()  # extra SD components are ignored
    shutil.rmtree(tmp_path / "vae")
    cfg = dataclasses.replace(config, sd_path=str(tmp_path), unet_config={}, vae_config={})
    with pytest.raises(FileNotFoundError, match=r"has no 'vae/' subfolder"):
        DiffusionEncoder(cfg)
    encoder.vae.save_pretrained(tmp_path / "vae")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"'unet/' has no weight file"):
        DiffusionEncoder(cfg)
    with pytest.raises(FileNotFoundError, match=r"is not a folder"):
        DiffusionEncoder(dataclasses.replace(cfg, sd_path=str(tmp_path / "nowhere")))


def test_gradients_reach_only_the_captioner(config):
    encoder = DiffusionEncoder(config).train()
    assert not encoder.unet.training and not encoder.vae.training and not encoder.clip.training
    assert encoder.captioner.training
    encoder(images(2)).sum().backward()
    for name, param in encoder.captioner.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for module in (encoder.unet, encoder.vae, encoder.clip):
        for name, param in module.named_parameters():
            assert not param.requires_grad and param.grad is None, name


def test_trainable_checkpoint_restores_features(config):
    """What the LMM saves (requires_grad parameters only) rebuilds the same encoder from the config."""
    trained = DiffusionEncoder(config).eval()
    with torch.no_grad():
        for param in trained.captioner.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    state = {name: p.detach().clone() for name, p in trained.named_parameters() if p.requires_grad}
    assert state and all(name.startswith("captioner.") for name in state)
    fresh = DiffusionEncoder(config).eval()
    x = images(2)
    with torch.no_grad():
        assert not torch.equal(fresh(x), trained(x))
        missing, unexpected = fresh.load_state_dict(state, strict=False)
        assert not unexpected
        assert all(not name.startswith("captioner.") for name in missing)
        assert torch.equal(fresh(x), trained(x))


def test_noise_modes(encoder, config):
    x = images(2)
    try:
        with torch.no_grad():
            assert encoder.noise == "auto"
            fixed = encoder.eval()(x)
            assert torch.equal(encoder(x), fixed)
            encoder.train()
            assert not torch.allclose(encoder(x), encoder(x))
            encoder.noise = "fixed"
            assert torch.equal(encoder(x), fixed)
            encoder.eval()
            encoder.noise = "stochastic"
            assert not torch.allclose(encoder(x), encoder(x))
            # The fixed noise map depends on noise_seed only, so a rebuilt encoder gives the same features.
            rebuilt = DiffusionEncoder(dataclasses.replace(config, noise="fixed")).train()
            assert torch.equal(rebuilt(x), fixed)
    finally:
        encoder.noise = "auto"
        encoder.eval()


def test_config_errors(config):
    with pytest.raises(ValueError, match="encoder.noise"):
        DiffusionEncoder(dataclasses.replace(config, noise="sometimes"))
    with pytest.raises(ValueError, match="encoder.up_block"):
        DiffusionEncoder(dataclasses.replace(config, up_block=4))
    with pytest.raises(ValueError, match="grid"):
        DiffusionEncoder(dataclasses.replace(config, image_size=128))
    with pytest.raises(ValueError, match="class embeddings"):
        DiffusionEncoder(
            dataclasses.replace(config, unet_config={**config.unet_config, "num_class_embeds": 3})
        )


def test_clip_inputs_resize_and_normalise(config):
    """At an SD size unlike CLIP's, a uniform image reaches CLIP at CLIP's size as CLIP's normalised colour."""
    vae = {**config.vae_config, "block_out_channels": [16, 32, 32, 32]}
    vae["down_block_types"] = ["DownEncoderBlock2D"] * 4
    vae["up_block_types"] = ["UpDecoderBlock2D"] * 4
    encoder = DiffusionEncoder(dataclasses.replace(config, image_size=128, vae_config=vae)).eval()
    assert encoder.grid == (8, 8)
    grey = torch.full((1, 3, 128, 128), 0.2)
    clip_in = encoder.clip_inputs(grey)
    expected = (0.6 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert clip_in.shape == (1, 3, 64, 64)
    assert torch.allclose(clip_in, expected.view(1, 3, 1, 1).expand_as(clip_in), atol=1e-5)
    with torch.no_grad():
        assert encoder(grey.expand(2, -1, -1, -1)).shape == (2, 64, 64)


def test_image_transform_is_sd_range(encoder):
    from PIL import Image

    transform = encoder.image_transform("resize")
    white = transform(Image.new("RGB", (100, 80), (255, 255, 255)))
    assert white.shape == (3, 64, 64) and torch.allclose(white, torch.ones_like(white))


@pytest.mark.parametrize("stem", ["clip", "clip_tiny", "diffusion", "diffusion_tiny", "fused", "fused_tiny"])
def test_config_files_parse(stem):
    config = load_config(stem)
    assert config.name == stem.removesuffix("_tiny")
    if stem in ("diffusion", "fused"):
        assert (config.image_size, config.timestep, config.up_block) == (384, 100, 1)
        assert config.clip.model == "ViT-L-14-336" and config.clip.select_layer == -2
