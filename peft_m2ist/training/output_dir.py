"""The run's output folder: the adapters (their towers recorded in their config), `best.json`, and the check of a
used folder.

Layout of `OUTPUT` (besides tracker logs): `.lock` while a run writes into it (`peft_m2ist.training.lock`),
`checkpoints/` (see `peft_m2ist.training.checkpoints`),
`best_adapter/` and `best.json` (the best evaluation so far), `final_adapter/` and `results.json`.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from .atomic import fresh_tmp_dir, replace_dir, write_json
from .checkpoints import CHECKPOINTS_DIR, drop_checkpoints_after, resolve_checkpoint
from .lock import OutputLock, claim_output_dir
from .run_state import RunState

logger = logging.getLogger(__name__)

BEST_ADAPTER = "best_adapter"
"""`OUTPUT/best_adapter/`: the adapter with the best evaluation so far."""
BEST_FILE = "best.json"
"""`OUTPUT/best.json`: the score, epoch and step of the adapter in `OUTPUT/best_adapter/`."""
FINAL_ADAPTER = "final_adapter"
RESULTS_FILE = "results.json"
RUN_OUTPUTS = (CHECKPOINTS_DIR, BEST_ADAPTER, FINAL_ADAPTER, BEST_FILE, RESULTS_FILE)
"""What a training run writes into its output folder (besides tracker logs); see `prepare_output_dir`."""


def save_adapter(model: Any, folder: str | os.PathLike) -> None:
    """`model.save_pretrained`, written into `<folder>.tmp`, then moved to `folder`. The towers the adapter was
    trained on travel in its `adapter_config.json` (`M2ISTConfig.base_towers`)."""
    tmp = fresh_tmp_dir(folder)
    model.save_pretrained(tmp)
    replace_dir(tmp, folder)


def save_best(model: Any, output_dir: str | os.PathLike, best: dict[str, Any]) -> None:
    """Save `model` as `OUTPUT/best_adapter` (see `save_adapter`), then its score `best` as `OUTPUT/best.json`."""
    save_adapter(model, Path(output_dir) / BEST_ADAPTER)
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


def estimated_sizes(model: Any) -> tuple[int, int]:
    """`(checkpoint, adapter)`: estimated bytes of one checkpoint and of one adapter folder of `model`.

    An adapter is the trainable weights; a checkpoint holds them, the optimiser's two moments of each (AdamW), a
    copy of the best adapter, and about 1 MiB of RNG, scheduler, sampler and run state.
    """
    adapter = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return 4 * adapter + 2**20, adapter


def check_free_space(output_dir: str | os.PathLike, model: Any, accelerator: Accelerator | None = None, *,
                     keep: int, every: int, steps: int) -> int:
    """Raise `OSError` (ENOSPC) naming `output_dir` unless its disk has room for what the run will write.

    That is `keep + 1` checkpoints (`--checkpoints_total_limit`: the newest kept ones, plus the one being written
    before the oldest goes; `keep=0` keeps all the run saves, one every `every` of its `steps`, and one if it is
    stopped) and three adapter folders (best, final, and one being written), sized by `estimated_sizes`. Returns
    the estimate in bytes. With `accelerator`, only its main process (the one that writes them) checks.
    """
    saves = (steps // every if every else 0) + 1
    checkpoints = min(keep, saves) if keep else saves
    checkpoint, adapter = estimated_sizes(model)
    needed = checkpoint * (checkpoints + 1) + 3 * adapter
    if accelerator is not None and not accelerator.is_main_process:
        return needed
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"--output_dir {output_dir} has {free / 2**20:.1f} MiB free, but the run needs "
                      f"about {needed / 2**20:.1f} MiB ({checkpoints + 1} checkpoints of {checkpoint / 2**20:.1f} "
                      f"MiB and 3 adapters of {adapter / 2**20:.1f} MiB): free some space, lower "
                      "--checkpoints_total_limit, or choose another --output_dir")
    return needed


def open_output_dir(output_dir: str | os.PathLike, resume: str | None, overwrite: bool, accelerator: Accelerator,
                    started: float) -> tuple[OutputLock | None, Path | None, RunState]:
    """Everything a training run checks in `output_dir` before anything loads; call it on every process.

    The folder must be writable and free (`claim_output_dir`: its lock, held from now on); `resume`
    (`--resume_from_checkpoint`) is resolved and its run state read; `prepare_output_dir` checks (or cleans) what
    earlier runs left. Returns `(lock, checkpoint, run_state)`: the lock (None on the other processes; release
    it when the run ends), the checkpoint to resume (or None) and the run state to start from. If a check fails,
    the lock is released before the error propagates: the folder is left as it was.
    """
    lock = claim_output_dir(output_dir, accelerator)
    try:
        checkpoint, run = resolve_checkpoint(resume, output_dir), RunState(started=started)
        if checkpoint is not None:
            run = RunState.from_checkpoint(checkpoint, started)
        prepare_output_dir(output_dir, checkpoint, run.step, overwrite, accelerator, latest=resume == "latest")
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock, checkpoint, run


def earlier_outputs(output_dir: str | os.PathLike) -> list[str]:
    """The names of `RUN_OUTPUTS` present in `output_dir` (an empty folder does not count)."""
    found = []
    for name in RUN_OUTPUTS:
        path = Path(output_dir) / name
        if path.exists() and not (path.is_dir() and not any(path.iterdir())):
            found.append(name)
    return found


def prepare_output_dir(output_dir: str | os.PathLike, checkpoint: str | os.PathLike | None, resumed_step: int,
                       overwrite: bool, accelerator: Accelerator, latest: bool = False) -> None:
    """Check `output_dir` before a run writes into it; call it on every process, before anything loads.

    Resuming from one of its own checkpoints (at step `resumed_step`) continues that run: the checkpoints after it
    belong to the abandoned continuation and are deleted, with the leftovers of interrupted saves, so that `latest`
    and the clean-up pick the new ones (`overwrite` then raises `ValueError`). With `latest`
    (`--resume_from_checkpoint latest`) and no complete checkpoint (`checkpoint` None), the run starts anew: what
    an unfinished run left (interrupted checkpoint saves, and its best adapter when it wrote neither a final
    adapter nor results) is deleted. Otherwise, outputs of an earlier run (`RUN_OUTPUTS`) raise
    `FileExistsError`, or with `overwrite` are deleted first.
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
    if latest and checkpoint is None and found and not {FINAL_ADAPTER, RESULTS_FILE} & set(found):
        accelerator.wait_for_everyone()  # every process has looked before the main one deletes
        if accelerator.is_main_process:
            deleted = [f"{CHECKPOINTS_DIR}/{f.name}" for f in drop_checkpoints_after(output_dir, -1)]
            for name in (BEST_ADAPTER, BEST_FILE):
                if name in found:
                    path = output_dir / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                    deleted.append(name)
            logger.warning(f"--resume_from_checkpoint latest: {output_dir} holds no complete checkpoint (its run was "
                           "stopped before saving one): starting a new run, after deleting what the unfinished run "
                           f"left ({', '.join(deleted) or 'nothing'})")
        accelerator.wait_for_everyone()
        found = earlier_outputs(output_dir)
    if found and not overwrite:
        continue_it = ("" if latest else "pass --resume_from_checkpoint latest to continue it (if it saved a "
                       "checkpoint), ")
        raise FileExistsError(
            f"{output_dir} already holds the outputs of an earlier run ({', '.join(found)}) and no complete "
            f"checkpoint of it is being resumed: {continue_it}--overwrite_output_dir to delete them, or choose another "
            "--output_dir"
        )
    accelerator.wait_for_everyone()  # every process has looked before the main one deletes
    if found and accelerator.is_main_process:
        for name in found:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        logger.info(f"--overwrite_output_dir: deleted {', '.join(found)} in {output_dir}")
    accelerator.wait_for_everyone()
