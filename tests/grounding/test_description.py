"""Description accuracy (grounding.description) against hand-worked cases."""

import pytest

from grounding.description import DescriptionAccuracy, description_correct, description_error, phrase_key

WORDS = ["red", "blue", "green", "circle", "square", "triangle"]
GT = ["a large red circle", "a small blue square"]


def test_phrase_keys():
    assert phrase_key("A large red circle", WORDS) == ("circle", "red")
    assert phrase_key("the red circle", WORDS) == ("circle", "red")
    assert phrase_key("A large red circle") == ("large", "red", "circle")
    assert phrase_key("it", WORDS) == ()


@pytest.mark.parametrize(
    ("pred", "words", "error"),
    [
        (GT, WORDS, None),
        (["a large red circle"], WORDS, "missed"),
        ([], WORDS, "missed"),
        (["a large red circle", "it"], WORDS, "missed"),  # "it" is not an object mention
        ([*GT, "a small green triangle"], WORDS, "invented"),
        (["a large red circle", "a large red circle", "a small blue square"], WORDS, "invented"),
        (["a large red square", "a small blue circle"], WORDS, "attributes"),
        (["a large red circle", "a large red circle"], WORDS, "attributes"),  # one named twice, one missed
        (["a small red circle", "a small blue square"], None, "attributes"),
    ],
)
def test_why_a_description_is_wrong(pred, words, error):
    assert description_error(GT, pred, words) == error
    assert description_correct(GT, pred, words) is (error is None)


@pytest.mark.parametrize(
    ("pred", "words", "right"),
    [
        (GT, WORDS, True),
        (list(reversed(GT)), WORDS, True),  # order does not matter
        (["a small red circle", "a small blue square"], WORDS, True),  # size is not in the vocabulary
        (["a small red circle", "a small blue square"], None, False),  # ...but whole phrases must match
        (["A large red circle", "a small blue square"], None, True),  # case and articles do not count
        (["a large red circle"], WORDS, False),  # a shape missed
        ([*GT, "a small green triangle"], WORDS, False),  # a shape invented
        (["a large red square", "a small blue circle"], WORDS, False),  # kinds swapped between colours
        (["a large green circle", "a small blue square"], WORDS, False),  # a wrong colour
        ([*GT, "it"], WORDS, True),  # a phrase naming no attribute is not an object mention
        (["a large red circle", "a large red circle"], WORDS, False),  # the same shape twice
    ],
)
def test_description_correct(pred, words, right):
    assert description_correct(GT, pred, words) is right


def test_accuracy_is_the_fraction_of_right_images():
    metric = DescriptionAccuracy(WORDS)
    metric.update(GT, GT)
    metric.update(GT, list(reversed(GT)))
    metric.update(GT, GT[:1])
    metric.update(["a green triangle"], ["A green triangle"])
    assert float(metric.compute()) == pytest.approx(0.75)
    assert float(DescriptionAccuracy().compute()) == 0.0


def test_the_breakdown_shares_sum_to_one():
    metric = DescriptionAccuracy(WORDS)
    metric.update(GT, GT)
    metric.update(GT, GT[:1])
    metric.update(GT, [*GT, "a green triangle"])
    metric.update(GT, ["a large blue circle", "a small blue square"])
    metric.update(GT, ["a large red circle"])
    assert metric.breakdown() == pytest.approx(
        {"right": 0.2, "missed": 0.4, "invented": 0.2, "attributes": 0.2}
    )
    assert metric.breakdown()["right"] == pytest.approx(float(metric.compute()))
    assert DescriptionAccuracy().breakdown() == dict.fromkeys(
        ("right", "missed", "invented", "attributes"), 0.0
    )
