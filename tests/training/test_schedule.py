"""The step schedule's flags are checked together; any other name goes to transformers' schedulers."""

from __future__ import annotations

import argparse

import pytest
import torch

from peft_m2ist.training import build_scheduler, check_schedule_args


def _check(**values) -> str | None:
    parser = argparse.ArgumentParser()
    args = argparse.Namespace(**{"lr_scheduler": "cosine", "lr_drop_epoch": None, "warmup_ratio": 0.0, **values})
    try:
        check_schedule_args(parser, args)
    except SystemExit:
        return "usage error"
    return None


def test_step_needs_a_drop_epoch_and_no_warmup(capsys):
    assert _check(lr_scheduler="step", lr_drop_epoch=60) is None
    assert _check(lr_scheduler="step") == "usage error"
    assert "--lr_drop_epoch" in capsys.readouterr().err
    assert _check(lr_scheduler="step", lr_drop_epoch=60, warmup_ratio=0.05) == "usage error"
    assert "--warmup_ratio 0" in capsys.readouterr().err
    assert _check(lr_drop_epoch=60) == "usage error"  # a drop epoch with another scheduler
    assert _check(warmup_ratio=0.05) is None


def test_other_names_are_transformers_schedulers():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    args = argparse.Namespace(lr_scheduler="linear", lr_drop_epoch=None, warmup_ratio=0.5)
    scheduler = build_scheduler(args, optimizer, total_steps=4, steps_per_epoch=2)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.0, 0.5, 1.0, 0.5])
