"""The REC accuracy metric and its IoU, against hand-computed values."""

from __future__ import annotations

import evaluate
import pytest
import torch

from peft_m2ist.metrics import REC_METRIC_PATH, box_iou, load_rec_metric, paired_box_iou

# (prediction cxcywh, reference cxcywh, IoU by hand, phrase type)
CASES = [
    # identical boxes touching the left, top and bottom borders: corners [0, 0, 0.2, 1]
    ([0.1, 0.5, 0.2, 1.0], [0.1, 0.5, 0.2, 1.0], 1.0, "a"),
    # prediction sticks out right: [0.6, 0.4, 1.6, 0.6] clamps to [0.6, 0.4, 1.0, 0.6] = the reference
    # (unclamped the IoU would be 0.08 / 0.2 = 0.4, a miss)
    ([1.1, 0.5, 1.0, 0.2], [0.8, 0.5, 0.4, 0.2], 1.0, "b"),
    # zero-area prediction inside the reference
    ([0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.2, 0.2], 0.0, "a"),
    # prediction entirely outside: clamps to the zero-area corner [1, 1, 1, 1]
    ([1.5, 1.5, 0.2, 0.2], [0.9, 0.9, 0.2, 0.2], 0.0, "b"),
    # exactly 0.5: reference [0, 0, 0.5, 1] inside prediction [0, 0, 1, 1] -> counts (>=)
    ([0.5, 0.5, 1.0, 1.0], [0.25, 0.5, 0.5, 1.0], 0.5, "a"),
    # half overlap sideways: [0.2, 0, 0.6, 0.4] vs [0, 0, 0.4, 0.4]: 0.08 / 0.24 = 1/3
    ([0.4, 0.2, 0.4, 0.4], [0.2, 0.2, 0.4, 0.4], 1 / 3, "c"),
]
PREDICTIONS = [case[0] for case in CASES]
REFERENCES = [case[1] for case in CASES]
TYPES = [case[3] for case in CASES]


@pytest.fixture(scope="module")
def metric():
    return load_rec_metric()


def test_hand_computed_example(metric):
    result = metric.compute(predictions=PREDICTIONS, references=REFERENCES, phrase_types=TYPES)
    assert result["accuracy"] == pytest.approx(3 / 6)
    assert result["mean_iou"] == pytest.approx((1 + 1 + 0 + 0 + 0.5 + 1 / 3) / 6)
    assert result["accuracy_a"] == pytest.approx(2 / 3)
    assert result["accuracy_b"] == pytest.approx(1 / 2)
    assert result["accuracy_c"] == 0.0


def test_without_phrase_types_only_overall_keys(metric):
    assert set(metric.compute(predictions=PREDICTIONS, references=REFERENCES)) == {"accuracy", "mean_iou"}


def test_add_batch_then_compute(metric):
    for prediction, reference in zip(PREDICTIONS, REFERENCES):
        metric.add_batch(predictions=[prediction], references=[reference])
    assert metric.compute()["accuracy"] == pytest.approx(0.5)


def test_threshold_and_length_checks(metric):
    strict = metric.compute(predictions=PREDICTIONS, references=REFERENCES, iou_threshold=0.75)
    assert strict["accuracy"] == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="phrase_types"):
        metric.compute(predictions=PREDICTIONS, references=REFERENCES, phrase_types=TYPES[:2])



@pytest.mark.parametrize(
    "reference",
    [
        [100.0, 50.0, 40.0, 20.0],  # pixels
        [0.2, 0.2, 0.6, 0.6],  # corners [x0, y0, x1, y1] read as cxcywh: sticks out of the canvas
        [0.5, 0.5, 0.0, 0.2],  # zero width
        [0.5, 0.5, -0.1, 0.2],
        [float("nan"), 0.5, 0.2, 0.2],
    ],
)
def test_references_outside_the_format_are_refused(metric, reference):
    with pytest.raises(ValueError, match="reference 1 is"):
        metric.compute(predictions=[[0.5, 0.5, 0.2, 0.2]] * 2, references=[[0.5, 0.5, 0.2, 0.2], reference])


@pytest.mark.parametrize("threshold", [50, 0, -0.5, True, "0.5"])
def test_iou_threshold_must_be_in_zero_one(metric, threshold):
    with pytest.raises(ValueError, match="iou_threshold"):
        metric.compute(predictions=PREDICTIONS, references=REFERENCES, iou_threshold=threshold)


def test_non_finite_predictions_are_misses_with_a_warning(metric):
    predictions = [[float("nan"), 0.5, 0.2, 0.2], *PREDICTIONS[1:]]
    with pytest.warns(UserWarning, match="1 of 6 predictions are not finite"):
        result = metric.compute(predictions=predictions, references=REFERENCES)
    assert result["accuracy"] == pytest.approx(2 / 6)  # case 0 (a hit) became a miss
    assert result["mean_iou"] == pytest.approx((0 + 1 + 0 + 0 + 0.5 + 1 / 3) / 6)


def test_loads_by_path_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = evaluate.load(str(REC_METRIC_PATH))
    assert module.compute(predictions=[[0.5, 0.5, 0.2, 0.2]], references=[[0.5, 0.5, 0.2, 0.2]])["accuracy"] == 1.0


def test_box_iou_pairwise_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 5.0, 9.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [4.0, 4.0, 6.0, 6.0]])
    expected = torch.tensor([[1 / 7, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(box_iou(a, b), expected)
    assert torch.allclose(paired_box_iou(a, b[:2]), torch.tensor([1 / 7, 0.0]))
    assert not torch.isnan(box_iou(a[1:], a[1:])).any()
    with pytest.raises(ValueError):
        paired_box_iou(a, b)
