"""The convolutional CLIP tower (``encoder.model: convnet``): local tokens, its pooled embedding, weight files and
the config's checks."""

import pytest
import torch
from safetensors.torch import save_file

from encoders.clip import build_vision_tower
from encoders.config import ClipEncoderConfig
from encoders.registry import build_encoder
from encoders.token_smoothing import colour_guided_smoothing

TINY = dict(
    model="convnet",
    image_size=32,
    width=32,
    conv_channels=(8, 16),
    pool_type="avg",
    pos_embed_type="sin_cos_2d",
)


def _influence(tower, row, col, size):
    """Which input pixels the token at grid cell (row, col) depends on: the support of its gradient."""
    images = torch.randn(1, 3, size, size, requires_grad=True)
    side = size // tower.patch_size[0]
    tower.features(images)[0, row * side + col].sum().backward()
    return images.grad[0].abs().sum(0) > 0


def test_each_token_depends_on_exactly_its_receptive_field_and_nothing_beyond():
    tower = build_vision_tower(ClipEncoderConfig(**{**TINY, "image_size": 64, "conv_channels": (16, 32, 64)}))
    # By hand: the stem's 3x3 sees 3 px; each later 3x3 conv adds 2 input steps of the grid it reads (1, 2, 2, 4, 4
    # px): stride-2 to 5, stride-1 to 9, stride-2 to 13, stride-1 to 21, stride-2 to 29.
    assert tower.patch_size == (8, 8) and tower.receptive_field == 29
    support = _influence(tower, 4, 4, 64)
    rows, cols = support.any(1).nonzero().flatten(), support.any(0).nonzero().flatten()
    # An interior token sees a solid square of receptive_field pixels around its 8-px cell (32..39), no more.
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (29, 29)
    assert support[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
    assert rows.min() <= 32 and rows.max() >= 39 and cols.min() <= 32 and cols.max() >= 39
    # So a corner token never sees the far corner: changing those pixels leaves it bit for bit the same.
    images = torch.randn(1, 3, 64, 64)
    changed = images.clone()
    changed[..., 40:, 40:] = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        a, b = tower.forward_tokens(images), tower.forward_tokens(changed)
    assert torch.equal(a[0, 0], b[0, 0]) and not torch.equal(a[0, 63], b[0, 63])


def test_conv_depths_set_the_stride_1_convs_per_stage_and_the_receptive_field():
    # 48 px, stride 4, one stride-1 conv in both stages (the last too): 3 -> 5 -> 9 -> 13 -> 21 px by hand.
    config = ClipEncoderConfig(
        **{**TINY, "image_size": 48, "conv_channels": (16, 32), "conv_depths": (1, 1), "width": 64}
    )
    tower = build_vision_tower(config)
    convs = [m for m in tower.body if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [1, 2, 1, 2, 1] and tower.receptive_field == 21
    support = _influence(tower, 6, 6, 48)
    rows, cols = support.any(1).nonzero().flatten(), support.any(0).nonzero().flatten()
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (21, 21)
    assert tower.forward_tokens(torch.zeros(1, 3, 48, 48)).shape == (1, 144, 64)
    # None is the default layout (one stride-1 conv in every stage but the last), spelled out or not.
    default = build_vision_tower(ClipEncoderConfig(**TINY))
    explicit = build_vision_tower(ClipEncoderConfig(**{**TINY, "conv_depths": (1, 0)}))
    assert [type(m) for m in default.body] == [type(m) for m in explicit.body]
    pairs = zip(default.state_dict().items(), explicit.state_dict().items(), strict=True)
    assert all(ka == kb and torch.equal(a, b) for (ka, a), (kb, b) in pairs)


def test_the_embedding_is_the_projected_mean_token_and_the_lmm_tokens_add_fixed_positions():
    encoder = build_encoder(ClipEncoderConfig(**TINY, init_seed=3))
    tower = encoder.tower
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # (2, 64, 32): stride 4 on 32 px, an 8 x 8 grid, row-major
        features = tower.body(images).flatten(2).transpose(1, 2)
        torch.testing.assert_close(tower(images), tower.proj(features.mean(1)))
        torch.testing.assert_close(encoder(images), features + tower.positional_embedding)
    assert encoder.grid == (8, 8) and encoder.embed_dim == 32 and encoder.num_tokens == 64
    pos = tower.positional_embedding
    # Row and column as sin/cos pairs (squared norm width / 2), all 64 distinct, not drawn from init_seed.
    torch.testing.assert_close(pos.pow(2).sum(1), torch.full((64,), 16.0))
    assert torch.cdist(pos, pos).add(torch.eye(64)).min() > 0.1
    other = build_encoder(ClipEncoderConfig(**TINY, init_seed=4)).tower
    assert torch.equal(other.positional_embedding, pos)
    assert not torch.equal(other.proj.weight, tower.proj.weight)
    # Frozen once wrapped by the encoder, as every CLIP tower.
    assert not any(p.requires_grad for p in encoder.parameters())


def test_a_weight_file_loads_exactly_and_one_of_another_shape_is_named(tmp_path):
    trained = build_vision_tower(ClipEncoderConfig(**TINY, init_seed=7))
    path = tmp_path / "visual.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    encoder = build_encoder(ClipEncoderConfig(**TINY, init_seed=0, weights=str(path)))
    for key, value in trained.state_dict().items():
        assert torch.equal(encoder.tower.state_dict()[key], value), key
    with pytest.raises(ValueError, match="does not match convnet"):
        build_encoder(ClipEncoderConfig(**{**TINY, "width": 48}, weights=str(path)))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image_size": None}, "model 'convnet' needs image_size"),
        ({"layers": 3}, "layers: ViT sizes"),
        ({"patch_size": 8}, "patch_size 8: a convnet with 2 conv_channels has stride 4"),
        ({"image_size": 30}, "image_size 30 is not a multiple of the convnet's stride 4"),
        ({"conv_channels": ()}, "conv_channels must be positive"),
        ({"pool_type": "tok"}, "no CLS token"),
        ({"pos_embed_type": "learnable"}, "pos_embed_type: sin_cos_2d"),
        ({"conv_depths": (1,)}, r"conv_depths \[1\]: one count >= 0 per entry of conv_channels \(2\)"),
        ({"conv_depths": (1, -1)}, "conv_depths"),
        ({"smoothing_steps": -1}, "smoothing_steps must be >= 0, got -1"),
        ({"smoothing_sigma": 0.0}, "smoothing_sigma must be > 0, got 0.0"),
    ],
)
def test_config_errors_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        ClipEncoderConfig(**{**TINY, **change})


def test_conv_depths_belong_to_the_convnet():
    with pytest.raises(ValueError, match="conv_depths applies to model 'convnet', not 'ViT-B-32'"):
        ClipEncoderConfig(model="ViT-B-32", conv_depths=(1, 1, 0))


def test_smoothing_belongs_to_the_convnet():
    with pytest.raises(ValueError, match="smoothing_steps applies to model 'convnet', not 'ViT-B-32'"):
        ClipEncoderConfig(model="ViT-B-32", smoothing_steps=3)


def test_the_tower_smooths_what_the_lmm_reads_only():
    plain = build_vision_tower(ClipEncoderConfig(**TINY))
    smoothed = build_vision_tower(ClipEncoderConfig(**TINY, smoothing_steps=2, smoothing_sigma=0.8))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # Same weights (same init seed); the contrastive embedding is untouched, so one cached tower serves both.
        assert torch.equal(plain(images), smoothed(images))
        tokens = smoothed.forward_tokens(images)
        cells = plain.body(images)
        expected = colour_guided_smoothing(cells, images, 2, 0.8).flatten(2).transpose(1, 2)
        # Positions are added after the smoothing: each token still says exactly where it is.
        torch.testing.assert_close(tokens - smoothed.positional_embedding, expected)
        assert not torch.allclose(tokens, plain.forward_tokens(images))


def test_token_mixing_is_the_smoothing_the_tower_applies():
    plain = build_vision_tower(ClipEncoderConfig(**TINY))
    smoothed = build_vision_tower(ClipEncoderConfig(**TINY, smoothing_steps=2, smoothing_sigma=0.8))
    images = torch.randn(2, 3, 32, 32)
    assert plain.token_mixing(images) is None
    with torch.no_grad():
        mixing = smoothed.token_mixing(images)
        cells = plain.body(images).flatten(2).transpose(1, 2)  # (B, n, C), row-major
        torch.testing.assert_close(
            smoothed.forward_tokens(images) - smoothed.positional_embedding, mixing @ cells
        )
    encoder = build_encoder(ClipEncoderConfig(**TINY, smoothing_steps=2, smoothing_sigma=0.8))
    torch.testing.assert_close(encoder.token_mixing(images), mixing)
