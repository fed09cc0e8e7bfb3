"""The resume state: what a checkpoint records besides accelerate's state, and where a resumed run picks up.

`RunState` is saved as each checkpoint's `run_state.json` (step, last evaluated epoch, per-epoch history, best
score, steps skipped for non-finite values, elapsed time). Resuming restores it, evaluates an epoch whose training the checkpoint completed but whose
evaluation it predates (`epoch_to_evaluate_first`), and skips the batches of the current epoch already seen
without disturbing the restored RNG state (`resumed_batches`), so that the resumed run repeats the uninterrupted
one exactly.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .atomic import read_json
from .checkpoints import RUN_STATE_FILE


@dataclass
class RunState:
    """Progress of a training run; complete on the main process (the others track `step` and `evaluated_epoch`)."""

    step: int = 0
    """Optimiser steps taken."""
    evaluated_epoch: int = -1
    """The last epoch evaluated (-1: none yet)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One entry per evaluated epoch: epoch, step and the scores."""
    best: dict[str, Any] | None = None
    """The best evaluation so far (epoch, step, scores); None before the first one with finite predictions (see
    `peft_m2ist.training.divergence.is_new_best`)."""
    skipped_steps: int = 0
    """Optimiser steps skipped for a non-finite loss or gradient norm (`--on_nonfinite skip`)."""
    elapsed_s: float = 0.0
    """Run time of the earlier sessions, up to the checkpoint this one resumed from."""
    started: float = field(default_factory=time.monotonic)
    """When this session started (`time.monotonic`)."""

    def elapsed(self) -> float:
        """Seconds of run time so far, the earlier sessions' included."""
        return self.elapsed_s + time.monotonic() - self.started

    def to_json(self) -> dict[str, Any]:
        """What `run_state.json` holds (`started` is this session's own and is not saved)."""
        return {"step": self.step, "evaluated_epoch": self.evaluated_epoch, "history": self.history,
                "best": self.best, "skipped_steps": self.skipped_steps, "elapsed_s": round(self.elapsed(), 1)}

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, started: float) -> RunState:
        """The state saved in `checkpoint/run_state.json`, for a session that started at `started`.

        A damaged file, or one that is not a run state, raises a `ValueError` that names it.
        """
        path = Path(checkpoint) / RUN_STATE_FILE
        data = read_json(path, hint=": resume from another checkpoint (--resume_from_checkpoint PATH) or start over")
        try:
            best = data["best"]  # None, or (older checkpoints) {"accuracy": -1} before the first evaluation
            best = dict(best) if best is not None and best.get("accuracy", -1) >= 0 else None
            return cls(step=int(data["step"]), evaluated_epoch=int(data["evaluated_epoch"]),
                       history=list(data["history"]), best=best, skipped_steps=int(data.get("skipped_steps", 0)),
                       elapsed_s=float(data["elapsed_s"]), started=started)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: not a run state of this script ({type(error).__name__}: {error})") from error

    def position(self, steps_per_epoch: int, gradient_accumulation_steps: int = 1) -> tuple[int, int]:
        """`(epoch, batches)`: the epoch `step` falls in, and how many of its batches were already trained on."""
        epoch, done = divmod(self.step, steps_per_epoch)
        return epoch, done * gradient_accumulation_steps


def epoch_to_evaluate_first(step: int, steps_per_epoch: int, total_steps: int, evaluated_epoch: int) -> int | None:
    """The epoch whose training a checkpoint at `step` completed but whose evaluation it predates, if any.

    A checkpoint saved on an epoch's last step (or the run's last step) is written before that epoch's evaluation;
    resuming from it must evaluate that epoch before training on.
    """
    if step == 0 or (step % steps_per_epoch and step < total_steps):
        return None
    epoch = (step - 1) // steps_per_epoch
    return epoch if epoch > evaluated_epoch else None


def resumed_batches(accelerator: Accelerator, loader: Iterable, skip: int) -> Iterator:
    """The batches of `loader` (a prepared DataLoader) for this epoch, without its first `skip` ones.

    Starting a DataLoader's iterator draws from torch's global RNG. The uninterrupted run drew it before the
    checkpoint was taken, so when batches are skipped the restored RNG state is kept untouched by this draw
    (the draw happens when the first batch is fetched). With `skip=0` this is simply `iter(loader)`.
    """
    if not skip:
        return iter(loader)
    rng_state = torch.get_rng_state()
    batches = iter(accelerator.skip_first_batches(loader, skip))
    first = next(batches, None)
    torch.set_rng_state(rng_state)
    return itertools.chain([first] if first is not None else [], batches)
