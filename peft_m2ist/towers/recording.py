"""`TapRecorder`: where the taps placed on the towers' modules hand their outputs during one tower forward."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class TapRecorder:
    """Collects the outputs of tap layers during one forward pass of the towers.

    A plain object (not an `nn.Module`) shared by every tap of one model; it records only between `start()` and
    `stop()`, so running the towers on their own (or with the side network switched off) stores nothing, and only the
    taps named in `start()`, so taps that another side network reads store nothing either.
    """

    def __init__(self) -> None:
        self.active = False
        self.wanted: frozenset[str] = frozenset()
        self.records: dict[str, torch.Tensor] = {}
        self.taken_over = False  # set when a newer model re-wrapped the same towers and its recorder took the taps

    def start(self, tap_names: Iterable[str]) -> None:
        """Record the taps named `tap_names` (full module names) until `stop()`."""
        self.records = {}
        self.wanted = frozenset(tap_names)
        self.active = True

    def wants(self, tap_name: str) -> bool:
        return self.active and tap_name in self.wanted

    def stop(self) -> dict[str, torch.Tensor]:
        """Stop recording; returns what was recorded, tap name -> detached output."""
        self.active = False
        self.wanted = frozenset()
        records, self.records = self.records, {}
        return records
