"""The run's output folder: adapters with their `towers.json`, `best.json`, and the check of a used folder.

Layout of `OUTPUT` (besides tracker logs): `checkpoints/` (see `peft_m2ist.training.checkpoints`),
`best_adapter/` and `best.json` (the best evaluation so far), `final_adapter/` and `results.json`.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ..pretrained.towers_file import TOWERS_FILE
from .atomic import fresh_tmp_dir, replace_dir, write_json
from .checkpoints import CHECKPOINTS_DIR, drop_checkpoints_after

logger = logging.getLogger(__name__)

BEST_ADAPTER = "best_adapter"
"""`OUTPUT/best_adapter/`: the adapter with the best evaluation so far."""
BEST_FILE = "best.json"
"""`OUTPUT/best.json`: the score, epoch and step of the adapter in `OUTPUT/best_adapter/`."""
FINAL_ADAPTER = "final_adapter"
RESULTS_FILE = "results.json"
RUN_OUTPUTS = (CHECKPOINTS_DIR, BEST_ADAPTER, FINAL_ADAPTER, BEST_FILE, RESULTS_FILE)
"""What a training run writes into its output folder (besides tracker logs); see `prepare_output_dir`."""


def save_adapter(model: Any, folder: str | os.PathLike, towers: dict[str, str]) -> None:
    """`model.save_pretrained` plus `towers` as `towers.json`, written into `<folder>.tmp`, then moved to `folder`."""
    tmp = fresh_tmp_dir(folder)
    model.save_pretrained(tmp)
    write_json(tmp / TOWERS_FILE, towers, default=str)
    replace_dir(tmp, folder)


def save_best(model: Any, output_dir: str | os.PathLike, best: dict[str, Any], towers: dict[str, str]) -> None:
    """Save `model` as `OUTPUT/best_adapter` (see `save_adapter`), then its score `best` as `OUTPUT/best.json`."""
    save_adapter(model, Path(output_dir) / BEST_ADAPTER, towers)
    write_json(Path(output_dir) / BEST_FILE, best, default=str)


def restore_best_adapter(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, best: dict[str, Any]) -> None:
    """Put `OUTPUT/best_adapter` and `best.json` (score `best`) back as they were when `checkpoint` was saved.

    The checkpoint holds a copy of `best_adapter/` when one existed at its step; without it, what `OUTPUT` holds
    came after that step and is deleted.
    """
    output_dir = Path(output_dir)
    saved = Path(checkpoint) / BEST_ADAPTER
    if saved.is_dir():
        tmp = fresh_tmp_dir(output_dir / BEST_ADAPTER)
        shutil.copytree(saved, tmp)
        replace_dir(tmp, output_dir / BEST_ADAPTER)
        write_json(output_dir / BEST_FILE, best, default=str)
    else:
        shutil.rmtree(output_dir / BEST_ADAPTER, ignore_errors=True)
        (output_dir / BEST_FILE).unlink(missing_ok=True)


def earlier_outputs(output_dir: str | os.PathLike) -> list[str]:
    """The names of `RUN_OUTPUTS` present in `output_dir` (an empty folder does not count)."""
    found = []
    for name in RUN_OUTPUTS:
        path = Path(output_dir) / name
        if path.exists() and not (path.is_dir() and not any(path.iterdir())):
            found.append(name)
    return found


def prepare_output_dir(output_dir: str | os.PathLike, checkpoint: str | os.PathLike | None, resumed_step: int,
                       overwrite: bool, accelerator: Accelerator) -> None:
    """Check `output_dir` before a run writes into it; call it on every process, before anything loads.

    Resuming from one of its own checkpoints (at step `resumed_step`) continues that run: the checkpoints after it
    belong to the abandoned continuation and are deleted, with the leftovers of interrupted saves, so that `latest`
    and the clean-up pick the new ones (`overwrite` then raises `ValueError`). Otherwise, outputs of an earlier run
    (`RUN_OUTPUTS`) raise `FileExistsError`, or with `overwrite` are deleted first.
    """
    output_dir = Path(output_dir)
    own = checkpoint is not None and Path(checkpoint).resolve().parent == (output_dir / CHECKPOINTS_DIR).resolve()
    if own:
        if overwrite:
            raise ValueError(f"--overwrite_output_dir would delete {checkpoint}, the checkpoint to resume from")
        if accelerator.is_main_process:
            drop_checkpoints_after(output_dir, resumed_step)
        accelerator.wait_for_everyone()
        return
    found = earlier_outputs(output_dir)
    if found and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds the outputs of an earlier run ({', '.join(found)}) and no complete "
            "checkpoint of it is being resumed: pass --resume_from_checkpoint latest to continue it (if it saved "
            "a checkpoint), --overwrite_output_dir to delete them, or choose another --output_dir"
        )
    accelerator.wait_for_everyone()  # every process has looked before the main one deletes
    if found and accelerator.is_main_process:
        for name in found:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        logger.info(f"--overwrite_output_dir: deleted {', '.join(found)} in {output_dir}")
    accelerator.wait_for_everyone()
