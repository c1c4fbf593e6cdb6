"""``llm.attention_dropout``: transformers' dropout on the attention probabilities, set on a tiny random Llama or
on a loaded model's config, active in training mode only."""

import pytest
import torch

from lmm.config import LLMConfig
from lmm.llm import LLMBackbone


def _config(world, **kw) -> LLMConfig:
    return LLMConfig(tokenizer=str(world / "tokenizer"), hidden_size=32, num_layers=2, num_heads=2, **kw)


def _attention_rates(backbone: LLMBackbone) -> list[float]:
    """The dropout rate each decoder layer's attention applies (what transformers reads in the forward pass)."""
    return [layer.self_attn.attention_dropout for layer in backbone.model.model.layers]


def _logits(backbone: LLMBackbone, ids: torch.Tensor) -> torch.Tensor:
    return backbone.model(input_ids=ids, use_cache=False).logits


def test_attention_dropout_acts_in_training_only(tiny_world):
    dropped = LLMBackbone(_config(tiny_world, attention_dropout=0.5))
    plain = LLMBackbone(_config(tiny_world))
    assert _attention_rates(dropped) == [0.5, 0.5]
    assert _attention_rates(plain) == [0.0, 0.0]
    ids = torch.randint(5, len(dropped.tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    dropped.train()
    first, second = _logits(dropped, ids), _logits(dropped, ids)
    assert not torch.allclose(first, second), "two training passes drew the same dropout"
    dropped.eval()
    plain.eval()
    # Same init seed, and dropout has no weights: in eval mode the two models are the same function.
    torch.testing.assert_close(_logits(dropped, ids), _logits(plain, ids))


def test_a_loaded_model_keeps_its_setting_unless_the_config_sets_one(tiny_world, tmp_path):
    saved = LLMBackbone(_config(tiny_world, attention_dropout=0.1))
    saved.model.save_pretrained(tmp_path / "llm")
    saved.tokenizer.save_pretrained(tmp_path / "llm")
    kept = LLMBackbone(LLMConfig(path=str(tmp_path / "llm")))
    assert _attention_rates(kept) == pytest.approx([0.1, 0.1])
    changed = LLMBackbone(LLMConfig(path=str(tmp_path / "llm"), attention_dropout=0.3))
    assert _attention_rates(changed) == pytest.approx([0.3, 0.3])


@pytest.mark.parametrize("rate", [-0.1, 1.0])
def test_attention_dropout_outside_zero_to_one_is_refused(tiny_world, rate):
    with pytest.raises(ValueError, match="attention_dropout must be in"):
        _config(tiny_world, attention_dropout=rate)
