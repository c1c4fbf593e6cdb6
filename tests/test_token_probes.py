"""benchmarks/token_probes.py: token weights against a hand-placed mask, the probe against separable and
shuffled labels, and an object's tower feature against the encoder run by hand on a trained tiny run."""

import numpy as np
import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope="module")
def probes():
    return load_benchmark("token_probes")


def test_token_weights_follow_the_padded_square(probes):
    # A 64 x 96 (W x H) image is centred on a 96-px square: 16 px of padding on the left. On a 4 x 4 grid of
    # 24-px cells, a mask over image columns 8..31 (square columns 24..47), rows 0..11 covers half of cell
    # (0, 1) and nothing else.
    mask = np.zeros((96, 64), bool)
    mask[0:12, 8:32] = True
    weights = probes.token_weights(mask, (64, 96), side=4)
    expected = np.zeros(16)
    expected[1] = 1.0
    np.testing.assert_allclose(weights, expected)
    # Two cells, one covered twice as much as the other: weights 2/3 and 1/3.
    mask = np.zeros((96, 64), bool)
    mask[24:48, 8:32] = True  # all of cell (1, 1)
    mask[48:60, 8:32] = True  # half of cell (2, 1)
    weights = probes.token_weights(mask, (64, 96), side=4)
    assert weights[5] == pytest.approx(2 / 3) and weights[9] == pytest.approx(1 / 3)
    assert weights.sum() == pytest.approx(1.0)
    # Cells that are not whole pixels (a 10-px square on a 4 x 4 grid): a full mask weighs every token alike.
    np.testing.assert_allclose(probes.token_weights(np.ones((10, 10), bool), (10, 10), side=4), 1 / 16)
    with pytest.raises(ValueError, match="empty"):
        probes.token_weights(np.zeros((10, 10), bool), (10, 10), side=4)


def test_window_feature_takes_the_neighbourhood_of_the_heaviest_token(probes):
    side, d = 4, 2
    tokens = torch.arange(side * side * d, dtype=torch.float32).reshape(side * side, d)
    weights = np.zeros(side * side)
    weights[[5, 6]] = [0.7, 0.3]  # heaviest: row 1, column 1
    inner = probes.window_feature(tokens, weights, side).reshape(3, 3, d)
    # Tokens 0-2, 4-6 and 8-10; token k holds (2k, 2k + 1).
    np.testing.assert_array_equal(inner[:, :, 0], [[0, 2, 4], [8, 10, 12], [16, 18, 20]])
    weights[:] = 0
    weights[15] = 1  # the bottom-right corner: the window's last row and column lie past the grid
    corner = probes.window_feature(tokens, weights, side).reshape(3, 3, d)
    np.testing.assert_array_equal(corner[:, :, 1], [[21, 23, 0], [29, 31, 0], [0, 0, 0]])


def test_probe_reads_a_linear_label_and_not_a_shuffled_one(probes):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 12))
    labels = list(np.argmax(x[:, :4] @ rng.normal(size=(4, 4)), axis=1))
    assert probes.probe_accuracy(x, labels) > 0.9
    shuffled = list(rng.permutation(labels))
    assert probes.probe_accuracy(x, shuffled) < 0.45  # four classes: about 0.25-0.3 by chance


def test_object_features_match_the_encoder_by_hand(probes, tiny_run):
    from datamodules.config import ShapesWorldConfig
    from datamodules.shapes import load_world_summary, render_scene
    from lmm.chat_runner import ChatRunner
    from lmm.run_dir import load_run

    model, config = load_run(tiny_run)
    features, labels = probes.object_features(model, config, n_scenes=3, batch_size=2)
    n = len(labels["cell"])
    assert n >= 3 and all(len(v) == n for v in labels.values())
    assert set(features) == {"tower", probes.WINDOW_LEVEL, "projector"} | {
        f"llm layer {i}" for i in range(1, config.llm.num_layers + 1)
    }
    assert all(x.shape == (n, model.llm.width) for k, x in features.items() if not k.startswith("tower"))
    assert features[probes.WINDOW_LEVEL].shape == (n, 9 * model.encoder.embed_dim)

    # The first shape of the first scene, computed independently: pad, encode, weight by mask coverage.
    world = ShapesWorldConfig.from_dict(load_world_summary(config.data.root)["config"])
    scene = render_scene(world.seed, world, split="val", index=probes.FIRST_INDEX)
    shape = scene.shapes[0]
    runner = ChatRunner(model, config.stages["instruct"].template, "pad")
    with torch.no_grad():
        tokens = model.encoder(runner.pixels(scene.image)[None])[0]
    side = int(round(model.encoder.num_tokens**0.5))
    width, height = scene.image.size
    square = max(width, height)
    top, left = (square - height) // 2, (square - width) // 2
    canvas = np.zeros((square, square))
    canvas[top : top + height, left : left + width] = shape.mask
    cell = square // side
    cover = np.array([[canvas[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell].mean() for c in range(side)]
                      for r in range(side)]).reshape(-1)  # fmt: skip
    expected = (torch.tensor(cover / cover.sum(), dtype=torch.float32)[:, None] * tokens).sum(0)
    np.testing.assert_allclose(features["tower"][0], expected.numpy(), rtol=1e-4, atol=1e-5)
    assert labels["kind"][0] == shape.kind and labels["cell"][0] == shape.cell


def test_tower_mode_probes_the_configured_tower_alone(probes, tiny_run, tiny_args):
    """--tower builds the tower from the config (here the same frozen random tiny tower the tiny run has) and
    gives only its level, equal to the run's tower level on the same scenes."""
    from lmm.run_dir import load_run

    model, config = probes.tower_model(tiny_args(vit=True))  # the tiny run's tower is the tiny ViT
    features, labels = probes.object_features(model, config, n_scenes=3, batch_size=2, tower_only=True)
    assert set(features) == {"tower", probes.WINDOW_LEVEL}
    run_features, run_labels = probes.object_features(*load_run(tiny_run), n_scenes=3, batch_size=2)
    assert labels == run_labels
    for level in ("tower", probes.WINDOW_LEVEL):
        np.testing.assert_allclose(features[level], run_features[level], rtol=1e-5, atol=1e-6)
