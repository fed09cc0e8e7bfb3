"""peft_m2ist.training.divergence (and what it relies on): non-finite values stop or skip, never a broken best."""

from __future__ import annotations

import errno
import logging
import math
import shutil
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from peft_m2ist.modeling.loss import box_losses
from peft_m2ist.training import (
    NonFiniteGuard,
    TrainingDiverged,
    check_free_space,
    evaluate,
    is_new_best,
    save_checkpoint,
)


@pytest.fixture
def setup():
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e5)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def _backward(accelerator, model, scale: float) -> torch.Tensor:
    loss = model(torch.ones(1, 2)).sum() * scale
    accelerator.backward(loss)
    return loss


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_learning_rate(setup):
    accelerator, model, optimizer = setup
    guard = NonFiniteGuard("stop", accelerator, optimizer)
    assert guard.check(_backward(accelerator, model, 1.0), model.parameters(), 1.0, step=1)
    with pytest.raises(TrainingDiverged, match=r"step 7: the loss and the gradient norm \(nan\) are not finite; the "
                                               r"run diverged: lower the learning rate .*100000"):
        guard.check(_backward(accelerator, model, math.nan), model.parameters(), 1.0, step=7)
    model.zero_grad()
    with pytest.raises(TrainingDiverged, match=r"step 8: the gradient norm \(inf\) is not finite"):
        guard.check(_backward(accelerator, model, 1e30), model.parameters(), 0.0, step=8)  # a finite loss


def test_skip_mode_counts_the_skipped_steps(setup, caplog):
    accelerator, model, optimizer = setup
    guard = NonFiniteGuard("skip", accelerator, optimizer, skipped=2)
    with caplog.at_level(logging.WARNING, logger="peft_m2ist.training.divergence"):
        assert not guard.check(_backward(accelerator, model, math.inf), model.parameters(), 1.0, step=5)
    assert guard.skipped == 3 and "step 5: the loss and the gradient norm (inf) are not finite: optimiser step " \
        "skipped (--on_nonfinite skip; 3 skipped so far)" in caplog.text
    model.zero_grad()
    assert guard.check(_backward(accelerator, model, 1.0), model.parameters(), 1.0, step=6)
    assert guard.skipped == 3


def test_non_finite_predicted_boxes_give_a_nan_loss_instead_of_an_error():
    target = torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2)
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [math.nan] * 4], requires_grad=True)
    losses = box_losses(pred, target)
    assert math.isnan(losses["loss_l1"].item()) and math.isnan(losses["loss_giou"].item())
    (losses["loss_l1"] + losses["loss_giou"]).backward()  # still part of the graph
    finite = box_losses(target.clone(), target)
    assert float(finite["loss_l1"]) == 0.0 and float(finite["loss_giou"]) == pytest.approx(0.0, abs=1e-6)


def test_the_first_real_evaluation_is_the_best_never_a_broken_adapters():
    assert is_new_best({"accuracy": 0.0, "mean_iou": 0.05, "non_finite": 0.0}, None)  # poor, but it finds boxes
    assert not is_new_best({"accuracy": 0.0, "mean_iou": 0.0, "non_finite": 1.0}, None)  # all NaN
    assert not is_new_best({"accuracy": 0.0, "mean_iou": 0.0, "non_finite": 0.0, "degenerate": 1.0}, None)  # no area
    assert is_new_best({"accuracy": 0.0, "mean_iou": 0.0, "non_finite": 0.0, "degenerate": 0.2}, None)  # misses
    assert is_new_best({"accuracy": 0.3, "mean_iou": 0.3, "non_finite": 0.5}, {"accuracy": 0.2})
    assert not is_new_best({"accuracy": 0.2, "mean_iou": 0.3}, {"accuracy": 0.2})


class _Boxes(torch.nn.Module):
    def forward(self, pred):
        return SimpleNamespace(pred_boxes=pred)


def test_evaluation_reports_the_share_of_non_finite_predictions():
    accelerator = Accelerator(cpu=True)
    label = [0.5, 0.5, 0.2, 0.2]
    rows = [{"pred": torch.tensor(label), "labels": torch.tensor(label), "phrase_type": "attribute"},
            {"pred": torch.tensor([math.nan] * 4), "labels": torch.tensor(label), "phrase_type": "attribute"}]
    loader = accelerator.prepare(DataLoader(rows, batch_size=2))
    with pytest.warns(UserWarning, match="1 of 2 predictions are not finite"):
        scores = evaluate(_Boxes(), loader, accelerator)
    assert scores["accuracy"] == 0.5 and scores["non_finite"] == 0.5


def test_a_checkpoint_with_non_finite_trainable_weights_is_never_written(setup, tmp_path):
    accelerator, model, _optimizer = setup
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with pytest.raises(TrainingDiverged, match=r"the checkpoint at step 4: .*weight holds non-finite values"):
        save_checkpoint(accelerator, tmp_path, 4, 2, {"step": 4})
    assert not (tmp_path / "checkpoints" / "step_4").exists()


def test_a_disk_too_full_for_the_checkpoints_is_refused_naming_the_folder(setup, tmp_path, monkeypatch):
    _accelerator, model, _optimizer = setup
    needed = check_free_space(tmp_path, model, keep=2, every=2, steps=20)  # 3 checkpoints of 4 x 12 B + 1 MiB, 3
    assert needed == 3 * (4 * 12 + 2**20) + 3 * 12  # adapters of 12 B
    assert check_free_space(tmp_path, model, keep=0, every=2, steps=6) == 5 * (4 * 12 + 2**20) + 3 * 12  # all
    assert check_free_space(tmp_path, model, keep=2, every=0, steps=6) == 2 * (4 * 12 + 2**20) + 3 * 12  # stop
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    with pytest.raises(OSError, match=rf"--output_dir {tmp_path} has 1.0 MiB free, but the run needs about 3.0 MiB "
                                      r"\(3 checkpoints") as refused:
        check_free_space(tmp_path, model, keep=2, every=2, steps=20)
    assert refused.value.errno == errno.ENOSPC
