"""The CLIP encoder: penultimate-layer patch tokens from open_clip weight files and HF CLIPVisionModel folders."""

import pytest
import torch
from safetensors.torch import save_file

from encoders.config import ClipEncoderConfig
from encoders.registry import build_encoder

TINY = dict(model="ViT-B-16", image_size=32, patch_size=8, width=64, layers=3, head_width=32)


def _reference_open_clip(tower, images, keep_blocks):
    """open_clip's own slow path: embeddings then the first ``keep_blocks`` residual blocks, CLS dropped."""
    x = tower._embeds(images)
    for block in tower.transformer.resblocks[:keep_blocks]:
        x = block(x)
    return x[:, 1:]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_open_clip_weight_file_loads_and_gives_penultimate_tokens(tmp_path, suffix):
    source = build_encoder(ClipEncoderConfig(**TINY, init_seed=7))
    state = {f"visual.{k}": v.clone() for k, v in source.tower.state_dict().items()}
    state["text_projection"] = torch.zeros(4, 4)  # a full CLIP checkpoint also holds the text tower
    path = tmp_path / f"clip{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        save_file(state, str(path))
    loaded = build_encoder(ClipEncoderConfig(**TINY, init_seed=0, weights=str(path)))
    images = torch.randn(2, 3, 32, 32)
    out = loaded(images)
    assert out.shape == (2, 16, 64)
    torch.testing.assert_close(
        out, _reference_open_clip(source.tower, images, keep_blocks=2), rtol=0, atol=1e-6
    )
    assert not any(p.requires_grad for p in loaded.parameters())


def test_open_clip_weight_file_of_another_shape_is_rejected(tmp_path):
    other = build_encoder(ClipEncoderConfig(**{**TINY, "width": 32}))
    path = tmp_path / "other.pt"
    torch.save({f"visual.{k}": v for k, v in other.tower.state_dict().items()}, path)
    with pytest.raises(ValueError, match=r"does not match ViT-B-16: .* has shape \[\d+.*expected \["):
        build_encoder(ClipEncoderConfig(**TINY, weights=str(path)))
    torch.save({"text_projection": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="no 'visual"):
        build_encoder(ClipEncoderConfig(**TINY, weights=str(path)))


def test_hf_clip_vision_folder_gives_hidden_states_minus_two(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    hf = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).eval()
    hf.save_pretrained(tmp_path / "clip")
    encoder = build_encoder(ClipEncoderConfig(model="hf", weights=str(tmp_path / "clip")))
    assert (encoder.grid, encoder.embed_dim, encoder.image_size) == ((4, 4), 64, 32)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=images, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(encoder(images), expected, rtol=0, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_encoder(ClipEncoderConfig(model="hf", weights=str(tmp_path)))


def test_pool_type_avg_embeds_the_mean_patch_token_and_leaves_the_tokens_unchanged():
    images = torch.randn(2, 3, 32, 32)
    cls_tower = build_encoder(ClipEncoderConfig(**TINY, init_seed=3)).tower
    avg_tower = build_encoder(ClipEncoderConfig(**TINY, init_seed=3, pool_type="avg")).tower
    # The same weights: the patch tokens the LMM reads do not depend on the pooling.
    for (name, a), (_, b) in zip(cls_tower.state_dict().items(), avg_tower.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():
        final = avg_tower.ln_post(_reference_open_clip(avg_tower, images, keep_blocks=3))
        torch.testing.assert_close(avg_tower(images), final.mean(1) @ avg_tower.proj, rtol=0, atol=1e-5)
        cls = cls_tower.ln_post(cls_tower.transformer(cls_tower._embeds(images))[:, 0])
        torch.testing.assert_close(cls_tower(images), cls @ cls_tower.proj, rtol=0, atol=1e-5)


def test_pool_type_is_refused_for_hf_folders():
    with pytest.raises(ValueError, match="pool_type applies to open_clip"):
        ClipEncoderConfig(model="hf", weights="x", pool_type="avg")


def test_sin_cos_2d_positions_are_fixed_unit_sine_cosine_pairs():
    tower = build_encoder(ClipEncoderConfig(**TINY, init_seed=3, pos_embed_type="sin_cos_2d")).tower
    pos = tower.positional_embedding
    assert not pos.requires_grad and torch.equal(pos[0], torch.zeros(64))  # the CLS slot carries no position
    # Each patch's row and column are written as sin/cos pairs (sin^2 + cos^2 = 1): squared norm width / 2.
    torch.testing.assert_close(pos[1:].pow(2).sum(1), torch.full((16,), 32.0))
    # A 4 x 4 grid: all 16 positions differ, and the embedding does not depend on init_seed (nothing is drawn).
    assert torch.cdist(pos[1:], pos[1:]).add(torch.eye(16)).min() > 0.5
    other = build_encoder(ClipEncoderConfig(**TINY, init_seed=4, pos_embed_type="sin_cos_2d")).tower
    assert torch.equal(other.positional_embedding, pos)


def test_pos_embed_type_is_refused_for_hf_folders():
    with pytest.raises(ValueError, match="pos_embed_type applies to open_clip"):
        ClipEncoderConfig(model="hf", weights="x", pos_embed_type="sin_cos_2d")
