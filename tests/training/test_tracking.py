"""peft_m2ist.training.tracking: what `--report_to` hands accelerate as `log_with`."""

from __future__ import annotations

import importlib.util

from peft_m2ist.training import tracking


def test_report_to_names_the_trackers(monkeypatch):
    assert tracking.trackers("none") is None
    assert tracking.trackers("wandb") == ["wandb"]
    assert tracking.trackers("tensorboard,wandb") == ["tensorboard", "wandb"]
    installed: set[str] = set()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in installed else None)
    assert tracking.trackers("auto") is None
    installed.add("trackio")
    assert tracking.trackers("auto") == ["trackio"]
    installed.add("tensorboard")
    assert tracking.trackers("auto") == ["tensorboard"]  # the first of AUTO_TRACKERS only
