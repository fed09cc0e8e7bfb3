"""Which experiment trackers `--report_to` asks accelerate to log to."""

from __future__ import annotations

import importlib.util

AUTO_TRACKERS = ("tensorboard", "trackio")
"""What `auto` looks for, in this order: the first one installed is used."""


def trackers(report_to: str) -> list[str] | None:
    """`Accelerator(log_with=...)` for `report_to`: 'none' -> None, 'auto' -> the first installed of
    `AUTO_TRACKERS` (None if neither is), anything else -> its comma-separated names."""
    if report_to == "none":
        return None
    if report_to != "auto":
        return report_to.split(",")
    found = [name for name in AUTO_TRACKERS if importlib.util.find_spec(name)]
    return found[:1] or None
