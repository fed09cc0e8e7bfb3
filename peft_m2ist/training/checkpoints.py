"""Checkpoint folders `OUTPUT/checkpoints/step_N`: writing them whole, keeping the newest few, finding `latest`.

A checkpoint is what `accelerator.save_state` stores (optimiser, scheduler, RNG states of every process, sampler)
with only the model's trainable weights (the adapter's side network and head: the frozen towers are rebuilt from
their names on resume, `load_checkpoint`), any folders copied in alongside it, and `run_state.json`, written last.
Weights with a non-finite value are never saved (`TrainingDiverged`). It is written into
`step_N.tmp/` and renamed to `step_N/` once complete, so a process killed while saving leaves a `.tmp` folder
that nothing here counts as a checkpoint.

accelerate's own `ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=...)` is not used: it writes
straight into `checkpoint_<i>` (a killed save leaves a folder `load_state()` would pick), deletes the oldest
checkpoint *before* saving the new one, and numbers checkpoints by save count, not by optimiser step.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import safe_open

from .atomic import fresh_tmp_dir, replace_dir, write_json
from .divergence import check_finite_weights

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
"""The folder under the output folder that holds the checkpoints."""
RUN_STATE_FILE = "run_state.json"
"""Written last into each checkpoint folder (see `peft_m2ist.training.run_state`): its presence marks it complete."""
CHECKPOINT_NAME = re.compile(r"^step_(\d+)$")
"""Checkpoint folders are named `step_N`; nothing else in `OUTPUT/checkpoints` counts as one."""


def checkpoint_step(folder: str | os.PathLike) -> int | None:
    """N for a folder named exactly `step_N`, else None."""
    match = CHECKPOINT_NAME.match(Path(folder).name)
    return int(match.group(1)) if match else None


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in `output_dir/checkpoints`, oldest step first.

    Complete: a folder named `step_N` holding `run_state.json` (written last, see `save_checkpoint`).
    """
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    folders = [d for d in root.iterdir()
               if d.is_dir() and checkpoint_step(d) is not None and (d / RUN_STATE_FILE).is_file()]
    return sorted(folders, key=checkpoint_step)


def resolve_checkpoint(arg: str | None, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder `--resume_from_checkpoint arg` names: 'latest' is the newest complete one (or None).

    A folder named explicitly must exist and hold `run_state.json`, else `FileNotFoundError`.
    """
    if not arg:
        return None
    if arg == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(arg)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {arg}: no such folder")
    if not (path / RUN_STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {arg}: no {RUN_STATE_FILE} in it, so it is no complete "
                                "checkpoint of this script (its save was interrupted, or an older version wrote it)")
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: str | os.PathLike, step: int, limit: int,
                    state: dict[str, Any], copy_in: Iterable[str | os.PathLike] = ()) -> Path:
    """Save `OUTPUT/checkpoints/step_<step>` whole; call it on every process. Returns the folder.

    `accelerator.save_state` writes into `step_N.tmp` (every process its RNG state; of the models, only the
    trainable weights, which must be finite, else `TrainingDiverged`), then the main process copies
    each existing folder of `copy_in` into it under its own name (hard links: `link_or_copy`), writes `state` as `run_state.json` and renames
    the folder to `step_N`. Afterwards the newest `limit` complete checkpoints (by step) are kept (0: all).
    """
    folder = Path(output_dir) / CHECKPOINTS_DIR / f"step_{step}"
    tmp = folder.with_name(f"{folder.name}.tmp")
    if accelerator.is_main_process:
        fresh_tmp_dir(folder)
    accelerator.wait_for_everyone()
    hook = accelerator.register_save_state_pre_hook(partial(_keep_trainable_weights, where=f"step {step}"))
    try:
        accelerator.save_state(str(tmp))
    finally:
        hook.remove()
    accelerator.wait_for_everyone()  # every process has written its RNG states
    if accelerator.is_main_process:
        for source in map(Path, copy_in):
            if source.is_dir():
                shutil.copytree(source, tmp / source.name, copy_function=link_or_copy)
        write_json(tmp / RUN_STATE_FILE, state, default=str)
        replace_dir(tmp, folder)
        if limit:
            for old in checkpoint_dirs(output_dir)[:-limit]:
                shutil.rmtree(old)
    return folder


def link_or_copy(source: str, target: str) -> None:
    """Hard-link `source` as `target` (no second copy on disk), or copy it where links are not possible.

    Safe for the files this package writes: none is ever rewritten in place (`atomic`: a new version is a new
    file, renamed), so the linked file keeps the content it had when linked.
    """
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def trainable_names(model: torch.nn.Module) -> set[str]:
    """The names (as in `model.state_dict()`) of the parameters of `model` that get gradients."""
    return {name for name, param in model.named_parameters(remove_duplicate=False) if param.requires_grad}


def _keep_trainable_weights(models: list[torch.nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str,
                            where: str) -> None:
    """`save_state`'s pre-hook: keep only each model's trainable weights, all finite, in what it saves."""
    for i, (model, state) in enumerate(zip(models, weights)):
        keep = trainable_names(model)
        weights[i] = {name: tensor for name, tensor in state.items() if name in keep}
        check_finite_weights(weights[i], f"the checkpoint at {where}")


def load_checkpoint(accelerator: Accelerator, folder: str | os.PathLike) -> None:
    """`accelerator.load_state(folder)` for a checkpoint of `save_checkpoint`: the trainable weights it holds over
    the frozen ones the models already have (a checkpoint holding every weight loads too).

    A checkpoint that lacks some trainable weight of a model (another adapter configuration) raises a `ValueError`
    naming the folder and the first missing weights, before anything is loaded.
    """
    for i, model in enumerate(accelerator._models):
        stored = Path(folder) / f"model{f'_{i}' if i else ''}.safetensors"
        if not stored.is_file():
            continue  # accelerate's pickle format, or a sharded or DeepSpeed state: load_state checks it
        with safe_open(stored, framework="pt") as handle:
            missing = sorted(trainable_names(model) - set(handle.keys()))
        if missing:
            raise ValueError(f"{stored} lacks {len(missing)} trainable weights of the model ({', '.join(missing[:3])}"
                             "...): it is a checkpoint of another adapter configuration")
    accelerator.load_state(str(folder), strict=False)


def drop_checkpoints_after(output_dir: str | os.PathLike, step: int) -> list[Path]:
    """Delete the checkpoints of `output_dir` newer than `step`, and leftover `*.tmp` / `*.old` folders.

    Used when a run resumes one of its own checkpoints: what came after it belongs to the abandoned continuation,
    and must not be picked by `latest` or count towards the limit. Returns the deleted folders.
    """
    root = Path(output_dir) / CHECKPOINTS_DIR
    dropped = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        n = checkpoint_step(folder)
        if folder.is_dir() and (folder.name.endswith((".tmp", ".old")) or (n is not None and n > step)):
            logger.info(f"deleting {folder}: written after the checkpoint resumed from")
            shutil.rmtree(folder)
            dropped.append(folder)
    return dropped
