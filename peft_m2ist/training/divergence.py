"""Divergence: a non-finite loss or gradient norm stops the run (or skips that step), and no broken adapter is kept.

`NonFiniteGuard.check` runs after each backward: it collects whether the loss was finite over the micro-batches
of an optimiser step, and at the step's end clips the gradients (`--max_grad_norm`) and looks at their norm. With
`--on_nonfinite stop` (the default) a non-finite value raises `TrainingDiverged`, which names the step and
suggests a lower learning rate, before the optimiser applies it: the weights stay those of the last finite step,
and no checkpoint holds non-finite weights (`check_finite_weights`, run on every checkpoint save, makes sure of
it). With `--on_nonfinite skip` the optimiser step is skipped (the gradients are dropped, the scheduler goes on),
counted and logged.

`is_new_best` is the rule for the best adapter: an evaluation is only "best" when it beats the best so far (none
at the start) and its boxes overlap some target (mean IoU > 0; all-NaN predictions never do).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)

ON_NONFINITE = ("stop", "skip")
"""The choices of `--on_nonfinite`."""


class TrainingDiverged(FloatingPointError):
    """A non-finite loss, gradient norm or weight: the message names the step and the way out."""


def lower_lr_hint(learning_rates: list[float] | None = None) -> str:
    """The way out of a diverged run; `learning_rates`: the optimiser's, quoted."""
    now = f"; the optimiser's are {', '.join(f'{lr:g}' for lr in learning_rates)} at this step" if learning_rates else ""
    return ("the run diverged: lower the learning rate (--lr_head, --lr_adapter; try a tenth" + now + ") and start "
            "again, or pass --on_nonfinite skip to skip such steps")


class NonFiniteGuard:
    """Checks each optimiser step of a training loop for non-finite values (see the module docstring).

    Args:
        mode: "stop" or "skip".
        accelerator: the run's `Accelerator` (with several processes, every process takes the same decision).
        optimizer: the optimiser whose learning rates the stop message quotes.
        skipped: steps the run skipped before (a resumed run's count).
    """

    def __init__(self, mode: str, accelerator: Accelerator, optimizer: Any = None, skipped: int = 0) -> None:
        if mode not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {mode!r}")
        self.mode, self.accelerator, self.optimizer = mode, accelerator, optimizer
        self.skipped = skipped
        """Optimiser steps skipped so far (with `mode="skip"`), the earlier sessions' included."""
        self._loss_finite = True

    def check(self, loss: torch.Tensor, parameters: Any, max_grad_norm: float | None, step: int) -> bool:
        """Call after `accelerator.backward(loss)` on every micro-batch; True: apply the optimiser step.

        At the end of an optimiser step (`sync_gradients`) the gradients are clipped to `max_grad_norm` (0 or None:
        not clipped, only measured). A non-finite loss (in any micro-batch of the step, on any process) or gradient
        norm then raises `TrainingDiverged` naming `step` (mode "stop") or returns False (mode "skip"; with a
        float16 gradient scaler True, as the scaler skips that step in its own `step()`). With a
        float16 gradient scaler, an infinite gradient norm is the scaler's business (it skips that step itself
        and lowers its scale): only the loss is checked then.
        """
        accelerator = self.accelerator
        self._loss_finite &= bool(torch.isfinite(loss.detach()).all())
        if not accelerator.sync_gradients:
            return True
        norm = accelerator.clip_grad_norm_(parameters, max_grad_norm or math.inf)
        bad = []
        if not self._loss_finite:
            bad.append("the loss")
        if accelerator.scaler is None and norm is not None and not math.isfinite(float(norm)):
            bad.append(f"the gradient norm ({float(norm)})")
        self._loss_finite = True
        if accelerator.num_processes > 1:  # one decision for all: a NaN on one process stops (or skips) all
            flag = torch.tensor([1.0 if bad else 0.0], device=accelerator.device)
            if float(accelerator.reduce(flag, reduction="sum")) and not bad:
                bad.append("the loss on another process")
        if not bad:
            return True
        what = " and ".join(bad) + (" are" if len(bad) > 1 else " is")
        if self.mode == "stop":
            rates = [group["lr"] for group in self.optimizer.param_groups] if self.optimizer is not None else None
            raise TrainingDiverged(f"step {step}: {what} not finite; {lower_lr_hint(rates)}")
        self.skipped += 1
        logger.warning(f"step {step}: {what} not finite: optimiser step skipped (--on_nonfinite skip; "
                       f"{self.skipped} skipped so far)")
        # a float16 scaler skips a step with non-finite gradients itself, and its step() must run (it updates the
        # scale, and unscale_ was already called by the clipping above)
        return accelerator.scaler is not None


def check_finite_weights(state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise `TrainingDiverged` naming `where` and the first tensor of `state_dict` with a non-finite value."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TrainingDiverged(f"{where}: {name} holds non-finite values, so it is not saved; {lower_lr_hint()}")


def is_new_best(scores: Mapping[str, Any], best: Mapping[str, Any] | None) -> bool:
    """Whether the evaluation `scores` makes a new best adapter over `best` (None: no evaluation counted yet).

    Only a real evaluation does: one none of whose predictions is finite (`scores["non_finite"] == 1`), or all of
    whose boxes have no area (`scores["degenerate"] == 1`: what a diverged adapter predicts, e.g. at learning rates
    of 1e2 to 1e4, where the weights blow up but stay finite and the box head saturates), never does; its accuracy
    of 0 says nothing about the adapter but that it is broken. A poor adapter whose boxes merely miss (mean IoU 0 on
    a small split) still counts. Then it must beat the best so far.
    """
    if scores.get("non_finite", 0.0) >= 1.0 or scores.get("degenerate", 0.0) >= 1.0:
        return False
    return best is None or scores["accuracy"] > best["accuracy"]
