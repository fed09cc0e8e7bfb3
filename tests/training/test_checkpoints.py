"""peft_m2ist.training.checkpoints: `step_N` folders written whole, the newest kept, `latest` resolved."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from safetensors import safe_open

from peft_m2ist.training.checkpoints import (
    checkpoint_dirs,
    checkpoint_step,
    drop_checkpoints_after,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)


def test_only_complete_folders_named_step_n_are_checkpoints_in_step_order(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_9", "step_10", "step_1000", "step_final", "step_200_v2", "step_11.tmp", "step_12", "old"):
        (root / name).mkdir(parents=True)
        (root / name / "run_state.json").write_text("{}")
    (root / "step_12" / "run_state.json").unlink()  # interrupted before its state was written
    (root / "step_13").write_text("")  # a file, not a folder
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["step_9", "step_10", "step_1000"]
    assert resolve_checkpoint("latest", tmp_path) == root / "step_1000"
    assert checkpoint_step(root / "step_200_v2") is None and checkpoint_step(root / "step_10") == 10
    with pytest.raises(FileNotFoundError, match=r"no run_state\.json"):
        resolve_checkpoint(str(root / "step_12"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_checkpoint(str(root / "step_99"), tmp_path)
    assert resolve_checkpoint(str(root / "step_9"), tmp_path) == root / "step_9"


def test_latest_without_any_checkpoint_is_none(tmp_path):
    assert resolve_checkpoint("latest", tmp_path) is None  # no checkpoints folder at all: a new run
    assert resolve_checkpoint(None, tmp_path) is None


@pytest.fixture
def accelerator() -> Accelerator:
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    accelerator.prepare(model, optimizer)
    return accelerator


def test_a_checkpoint_is_saved_whole_and_only_the_newest_are_kept(accelerator, tmp_path):
    best = tmp_path / "best_adapter"
    stale = tmp_path / "checkpoints" / "step_6.tmp"  # left by a save killed earlier
    stale.mkdir(parents=True)
    (stale / "junk").write_text("")
    for step in (2, 4, 6):
        if step == 4:  # no best adapter before the first evaluation; one afterwards
            best.mkdir()
            (best / "adapter_model.safetensors").write_text(f"as of step {step}")
        folder = save_checkpoint(accelerator, tmp_path, step, 2, {"step": step}, copy_in=[best])
        assert folder == tmp_path / "checkpoints" / f"step_{step}"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_4", "step_6"]
    newest = tmp_path / "checkpoints" / "step_6"
    assert json.loads((newest / "run_state.json").read_text()) == {"step": 6}
    assert (newest / "best_adapter" / "adapter_model.safetensors").read_text() == "as of step 4"
    # hard-linked, not copied: an unchanged best adapter takes no space again
    assert (newest / "best_adapter" / "adapter_model.safetensors").stat().st_ino == \
        (best / "adapter_model.safetensors").stat().st_ino
    assert (newest / "model.safetensors").is_file() and (newest / "optimizer.bin").is_file()
    assert not (newest / "junk").exists()


def _frozen_then_trainable(frozen_from: torch.nn.Module | None = None, extra: bool = False) -> torch.nn.Sequential:
    layers = [torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)] + ([torch.nn.Linear(2, 2)] if extra else [])
    model = torch.nn.Sequential(*layers)
    if frozen_from is not None:
        model[0].load_state_dict(frozen_from[0].state_dict())
    model[0].requires_grad_(False)
    return model


def test_a_checkpoint_holds_only_the_trainable_weights_and_loads_over_the_frozen_ones(tmp_path):
    torch.manual_seed(0)
    trained = Accelerator(cpu=True)
    model = trained.prepare(_frozen_then_trainable())
    folder = save_checkpoint(trained, tmp_path, 1, 0, {"step": 1})
    with safe_open(folder / "model.safetensors", framework="pt") as saved:
        assert set(saved.keys()) == {"1.weight", "1.bias"}  # the frozen layer is rebuilt, not saved

    resumed = Accelerator(cpu=True)
    fresh = resumed.prepare(_frozen_then_trainable(frozen_from=model))  # same frozen layer, other trainable one
    assert not torch.equal(fresh[1].weight, model[1].weight)
    load_checkpoint(resumed, folder)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))

    other = Accelerator(cpu=True)
    other.prepare(_frozen_then_trainable(frozen_from=model, extra=True))
    with pytest.raises(ValueError, match=r"model\.safetensors lacks 2 trainable weights of the model \(2\.bias, "
                                         r"2\.weight\.\.\.\): it is a checkpoint of another adapter configuration"):
        load_checkpoint(other, folder)


def test_a_limit_of_zero_keeps_every_checkpoint(accelerator, tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(accelerator, tmp_path, step, 0, {"step": step}, copy_in=[tmp_path / "absent"])
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["step_1", "step_2", "step_3"]
    assert not (tmp_path / "checkpoints" / "step_3" / "absent").exists()


def test_checkpoints_after_the_resumed_step_and_leftovers_are_dropped(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_4", "step_6", "step_8", "step_10.tmp", "step_6.old", "step_final"):
        (root / name).mkdir(parents=True)
    dropped = drop_checkpoints_after(tmp_path, 6)
    assert sorted(p.name for p in dropped) == ["step_10.tmp", "step_6.old", "step_8"]
    assert sorted(p.name for p in root.iterdir()) == ["step_4", "step_6", "step_final"]
    assert drop_checkpoints_after(tmp_path / "elsewhere", 6) == []
