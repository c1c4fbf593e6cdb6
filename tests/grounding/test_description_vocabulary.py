"""``grounding.description_words``: ``world`` reads the shapes world's colours and kinds (grounding.evaluator)."""

import json

import pytest

from grounding.evaluator import description_vocabulary


def test_world_means_the_colours_and_kinds_the_world_was_generated_with(tiny_world, tmp_path):
    from datamodules.shapes import ShapesWorldConfig, generate_world

    default = ShapesWorldConfig()  # the tiny world's colours and kinds are the defaults
    words = description_vocabulary("world", tiny_world)
    assert words == [*default.colours, *default.kinds]
    small = dict(n_pretrain=2, n_instruct=2, n_val=1, n_val_qa=6, n_objects=2, samples_per_shard=2)
    generate_world(
        ShapesWorldConfig(colours=("red", "blue"), kinds=("circle", "star"), **small), tmp_path / "w"
    )
    assert description_vocabulary("world", tmp_path / "w") == ["red", "blue", "circle", "star"]


def test_a_list_or_null_is_kept(tmp_path):
    assert description_vocabulary(["red", "circle"], tmp_path) == ["red", "circle"]
    assert description_vocabulary(None, tmp_path) is None


def test_a_world_without_its_summary_or_colours_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"world needs the shapes world's .*world\.json .*FileNotFoundError"):
        description_vocabulary("world", tmp_path)
    (tmp_path / "world.json").write_text(json.dumps({"config": {"colours": ["red"]}}))
    with pytest.raises(ValueError, match=r"naming config.colours and config.kinds \(KeyError"):
        description_vocabulary("world", tmp_path)
    with pytest.raises(ValueError, match=r"expected 'world', a list of words or null"):
        description_vocabulary("planet", tmp_path)
