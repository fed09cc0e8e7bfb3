"""peft_m2ist.training.collapse: the mean-box baseline loss and the per-epoch "stuck" warnings."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import test_train_script
import torch
from PIL import Image

from peft_m2ist.modeling.loss import box_losses
from peft_m2ist.training import collapse
from peft_m2ist.training.collapse import (
    CollapseMonitor,
    batch_spread,
    canvas_labels,
    mean_box_baseline,
    training_labels,
)

towers = test_train_script.towers  # the fixture: a tiny MobileNetV2 and a tiny BERT saved as HF folders


def _labels(n: int = 300, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, generator=g) * 0.5 + 0.25
    size = torch.rand(n, 2, generator=g) * 0.3 + 0.1
    return torch.cat([centre, size], dim=1)


def test_the_baseline_is_the_model_loss_of_the_mean_box_with_the_configured_weights():
    labels = _labels()
    parts = box_losses(labels.mean(0).expand_as(labels), labels)
    baseline = mean_box_baseline(labels, l1_weight=5.0, giou_weight=2.0)
    assert baseline["num_records"] == 300
    assert baseline["box"] == pytest.approx(labels.mean(0).tolist(), abs=1e-6)
    assert baseline["loss_l1"] == pytest.approx(float(parts["loss_l1"]), rel=1e-5)
    assert baseline["loss_giou"] == pytest.approx(float(parts["loss_giou"]), rel=1e-5)
    assert baseline["loss"] == pytest.approx(5.0 * baseline["loss_l1"] + 2.0 * baseline["loss_giou"])


def test_the_baseline_in_chunks_equals_one_pass(monkeypatch):
    labels = _labels(50)
    whole = mean_box_baseline(labels)
    monkeypatch.setattr(collapse, "CHUNK", 7)
    chunked = mean_box_baseline(labels)
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-9)


def test_the_mean_box_beats_other_constant_boxes_on_l1_plus_giou_roughly():
    labels = _labels()
    baseline = mean_box_baseline(labels)
    for other in ([0.5, 0.5, 0.1, 0.1], [0.3, 0.6, 0.4, 0.2]):
        parts = box_losses(torch.tensor(other).expand_as(labels), labels)
        assert baseline["loss"] < float(parts["loss_l1"] + parts["loss_giou"])


def test_the_baseline_draws_no_random_numbers():
    torch.manual_seed(3)
    state = torch.get_rng_state()
    numpy_state = np.random.get_state()[1].copy()
    mean_box_baseline(_labels())
    assert torch.equal(torch.get_rng_state(), state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)


def test_no_labels_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        mean_box_baseline(torch.zeros(0, 4))


def test_canvas_labels_place_the_long_side_on_the_canvas():
    records = [{"bbox": [10, 20, 30, 60], "image": Image.new("RGB", (200, 100))},
               {"bbox": [0, 0, 50, 100], "image": (50, 100)}]
    assert canvas_labels(records) == pytest.approx(np.array([[0.1, 0.2, 0.1, 0.2], [0.25, 0.5, 0.5, 1.0]]))


def test_training_labels_of_a_records_dataset_read_no_pixels_and_stop_at_the_limit():
    images = [Image.new("RGB", (200, 100)), Image.new("RGB", (80, 160))]
    data = datasets.Dataset.from_dict(
        {"image": images, "bbox": [[10, 20, 30, 60], [0, 0, 40, 80]], "phrase": ["a", "b"]},
        features=datasets.Features({"image": datasets.Image(), "bbox": datasets.List(datasets.Value("float64")),
                                    "phrase": datasets.Value("string")}))
    assert training_labels(data) == pytest.approx(np.array([[0.1, 0.2, 0.1, 0.2], [0.125, 0.25, 0.25, 0.5]]))
    assert training_labels(data, limit=1).shape == (1, 4)


def test_batch_spread():
    assert batch_spread(torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 4)) == 0.0
    assert batch_spread(torch.tensor([[0.5, 0.5, 0.2, 0.2]])) == 0.0
    boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.3, 0.3]])
    assert batch_spread(boxes) == pytest.approx(float(boxes.std(0).mean()))


def test_a_model_at_the_mean_box_is_stuck_by_both_names():
    labels = _labels()
    monitor = CollapseMonitor(mean_box_baseline(labels))
    mean = labels.mean(0)
    for batch in labels.split(30):
        pred = mean.expand_as(batch) + 1e-4 * torch.arange(len(batch)).unsqueeze(1)
        parts = box_losses(pred, batch)
        monitor.update(parts["loss_l1"] + parts["loss_giou"], pred)
    entry = monitor.end_epoch(0)
    assert set(entry["warnings"]) == {"loss_at_mean_box", "boxes_collapsed"}
    assert all(message.startswith("stuck:") for message in entry["warnings"].values())
    assert entry["median_batch_spread"] < collapse.SPREAD_THRESHOLD
    assert monitor.epochs == [entry]


def test_a_learning_model_gets_no_warning_and_each_epoch_starts_afresh():
    labels = _labels()
    monitor = CollapseMonitor(mean_box_baseline(labels))
    monitor.update(float("nan"), labels[:2])  # a skipped non-finite step is not counted
    for batch in labels.split(30):
        pred = batch + 0.01
        parts = box_losses(pred, batch)
        monitor.update(parts["loss_l1"] + parts["loss_giou"], pred)
    entry = monitor.end_epoch(0)
    assert entry["warnings"] == {} and entry["train_loss"] < 0.5 * entry["mean_box_loss"]
    assert monitor.end_epoch(1)["train_loss"] is None  # nothing seen since epoch 0
    assert [e["epoch"] for e in monitor.epochs] == [0, 1]


def test_a_loss_a_little_below_the_baseline_is_still_stuck_and_a_lower_one_is_not():
    monitor = CollapseMonitor({"loss": 1.0})
    monitor.update(0.97, _labels(4))
    assert "loss_at_mean_box" in monitor.end_epoch(0)["warnings"]
    monitor.update(0.9, _labels(4))
    assert "loss_at_mean_box" not in monitor.end_epoch(1)["warnings"]


@pytest.mark.slow
def test_a_run_at_learning_rate_zero_ends_stuck_in_its_log_and_results(towers, tmp_path):
    """examples/train_rec.py on tiny local towers (tests/test_train_script.py's) with both learning rates at 0."""
    out = tmp_path / "lr0"
    proc = test_train_script._run(test_train_script._args(towers, out, "--lr_head", "0", "--lr_adapter", "0", "--checkpointing_steps", "0"))
    log = proc.stdout + proc.stderr
    assert "mean-box loss" in log and "stuck: epoch 1's mean training loss" in log
    results = json.loads((out / "results.json").read_text())
    baseline = results["mean_box_baseline"]
    assert baseline["num_records"] == 48 and baseline["loss"] > 0
    checks = results["collapse_checks"]
    assert [c["epoch"] for c in checks] == [0, 1]
    assert "loss_at_mean_box" in checks[-1]["warnings"]
    assert checks[-1]["warnings"]["loss_at_mean_box"] in log
    assert checks[-1]["train_loss"] > (1 - collapse.LOSS_MARGIN) * baseline["loss"]
