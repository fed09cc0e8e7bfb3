"""The learning-rate schedule of a run: any transformers scheduler, or the authors' step decay (`step`)."""

from __future__ import annotations

import argparse

import torch
from transformers import get_scheduler

STEP_DECAY = "step"
"""`--lr_scheduler step`: the learning rates times 0.1 from epoch `--lr_drop_epoch` on (the authors' StepLR)."""
STEP_DECAY_FACTOR = 0.1


def check_schedule_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`--lr_scheduler step` needs `--lr_drop_epoch` and takes no warm-up; a usage error otherwise."""
    if args.lr_scheduler == STEP_DECAY:
        if not args.lr_drop_epoch or args.lr_drop_epoch < 1:
            parser.error("--lr_scheduler step needs --lr_drop_epoch N >= 1 (the epoch from which the learning "
                         "rates are multiplied by 0.1; the authors: 60 of 90, 120 of 180 for RefCOCO+)")
        if args.warmup_ratio:
            parser.error("--lr_scheduler step has no warm-up: pass --warmup_ratio 0")
    elif args.lr_drop_epoch is not None:
        parser.error(f"--lr_drop_epoch goes with --lr_scheduler step, not {args.lr_scheduler!r}")


def build_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, total_steps: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The scheduler `args` ask for, stepped once per optimiser step.

    `step`: `StepLR` with its step at `lr_drop_epoch * steps_per_epoch` optimiser steps (one drop, x0.1); any other
    name goes to `transformers.get_scheduler` with `warmup_ratio * total_steps` warm-up steps.
    """
    if args.lr_scheduler == STEP_DECAY:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_drop_epoch * steps_per_epoch,
                                               gamma=STEP_DECAY_FACTOR)
    return get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=int(args.warmup_ratio * total_steps),
                         num_training_steps=total_steps)
