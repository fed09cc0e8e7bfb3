"""examples/train_rec.py checkpoints: resuming at an epoch's end, run state, used output folders, atomic writes.

The runs are tiny (48 training rows, 6 steps an epoch, 2 epochs) and run in this process through `main`; a crash is
the script's own `--crash_after_steps` with `os._exit` turned into an exception.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import test_train_script as script_tests
import torch
from safetensors.torch import load_file

towers = script_tests.towers  # the tiny local towers, saved once per module
train_rec = script_tests.train_rec  # the script as a module, accelerate set up for one CPU process


class Crash(Exception):
    """Raised instead of `os._exit` by `--crash_after_steps`."""


def _args(towers, out: Path, *extra: str) -> list[str]:
    return script_tests._args(towers, out, *extra)


def _crash(monkeypatch) -> None:
    def exit_(status: int) -> None:
        raise Crash(status)

    monkeypatch.setattr(os, "_exit", exit_)  # the module the script calls it from


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = _adapter(a), _adapter(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


def _assert_same_history(got: list[dict], expected: list[dict]) -> None:
    assert [(h["epoch"], h["step"]) for h in got] == [(h["epoch"], h["step"]) for h in expected]
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        for key in e:
            assert g[key] == pytest.approx(e[key], rel=1e-6, abs=1e-9), key


@pytest.fixture(scope="module")
def straight(towers, train_rec, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run: its folder and results (12 steps, checkpoints step_10 and step_12 kept)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    return out, train_rec.main(_args(towers, out))


@pytest.mark.slow
@pytest.mark.parametrize("crash_step", [6, 12], ids=["end-of-first-epoch", "last-step"])
def test_a_checkpoint_on_an_epochs_last_step_is_evaluated_after_resuming(towers, train_rec, straight, tmp_path,
                                                                          monkeypatch, crash_step):
    """Saved on epoch 0's last step (6) or the run's last (12), before that epoch's evaluation: the resumed run
    evaluates it first and ends with the uninterrupted run's history, best score, best and final adapters."""
    straight_dir, expected = straight
    assert [h["epoch"] for h in expected["history"]] == [0, 1]
    out = tmp_path / "run"
    _crash(monkeypatch)
    with pytest.raises(Crash):
        train_rec.main(_args(towers, out, "--crash_after_steps", str(crash_step)))
    assert (out / "checkpoints" / f"step_{crash_step}").is_dir() and not (out / "results.json").exists()
    saved = json.loads((out / "checkpoints" / f"step_{crash_step}" / "run_state.json").read_text())
    assert saved["step"] == crash_step and saved["elapsed_s"] > 0
    monkeypatch.undo()

    resumed = train_rec.main(_args(towers, out, "--resume_from_checkpoint", "latest"))
    assert resumed["steps"] == 12
    _assert_same_history(resumed["history"], expected["history"])
    assert resumed["best"] == pytest.approx(expected["best"]) and resumed["best"]["accuracy"] >= 0
    assert json.loads((out / "results.json").read_text())["history"] == resumed["history"]
    assert json.loads((out / "best.json").read_text()) == resumed["best"]
    _assert_same_adapter(out / "best_adapter", straight_dir / "best_adapter")
    _assert_same_adapter(out / "final_adapter", straight_dir / "final_adapter")
    assert resumed["elapsed_s"] >= saved["elapsed_s"]  # goes on from the checkpoint's instead of restarting


@pytest.mark.slow
def test_resuming_a_finished_run_keeps_its_history_and_skips_a_half_written_checkpoint(towers, train_rec, straight,
                                                                                       tmp_path):
    """`latest` passes over a checkpoint folder without run_state.json (its save never finished); resuming the
    finished run re-evaluates its last epoch and trains no further."""
    straight_dir, expected = straight
    out = tmp_path / "run"
    shutil.copytree(straight_dir, out)
    half = out / "checkpoints" / "step_14"  # a save killed after the weights, before the optimiser state
    half.mkdir()
    shutil.copy(out / "checkpoints" / "step_12" / "model.safetensors", half)
    assert train_rec.resolve_checkpoint("latest", out) == out / "checkpoints" / "step_12"

    resumed = train_rec.main(_args(towers, out, "--resume_from_checkpoint", "latest"))
    assert resumed["steps"] == 12
    _assert_same_history(resumed["history"], expected["history"])
    assert resumed["elapsed_s"] >= json.loads((out / "checkpoints" / "step_12" / "run_state.json").read_text())[
        "elapsed_s"]
    _assert_same_adapter(out / "final_adapter", straight_dir / "final_adapter")
    assert not half.exists()  # newer than the checkpoint resumed from: dropped
    assert json.loads((out / "results.json").read_text())["history"] == resumed["history"]


def _old_run(out: Path) -> None:
    """What an earlier run left in `out`: two complete checkpoints of a long run, its best.json and results.json."""
    for step in (1400, 1500):
        folder = out / "checkpoints" / f"step_{step}"
        folder.mkdir(parents=True)
        (folder / "run_state.json").write_text(json.dumps({"step": step}))
    (out / "best.json").write_text(json.dumps({"accuracy": 0.99, "epoch": 7, "step": 1400}))
    (out / "results.json").write_text("{}")


@pytest.mark.slow
def test_an_output_dir_with_an_earlier_runs_outputs_is_refused_unless_overwritten(towers, train_rec, tmp_path):
    out = tmp_path / "run"
    _old_run(out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(FileExistsError, match=r"checkpoints, best\.json, results\.json.*--overwrite_output_dir"):
        train_rec.main(_args(towers, out, "--max_train_steps", "4"))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing touched

    result = train_rec.main(_args(towers, out, "--max_train_steps", "4", "--overwrite_output_dir"))
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert train_rec.resolve_checkpoint("latest", out).name == "step_4"
    best = json.loads((out / "best.json").read_text())
    assert best == result["best"] and best["step"] == 4 and best["accuracy"] < 0.99
    assert json.loads((out / "results.json").read_text())["steps"] == 4


def test_overwrite_output_dir_and_resume_latest_exclude_each_other(train_rec, capsys):
    with pytest.raises(SystemExit) as stopped:
        train_rec.parse_args(["--overwrite_output_dir", "--resume_from_checkpoint", "latest"])
    assert stopped.value.code == 2
    assert "--overwrite_output_dir would delete the checkpoints --resume_from_checkpoint latest" in capsys.readouterr().err


def test_only_complete_folders_named_step_n_are_checkpoints_in_step_order(train_rec, tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_9", "step_10", "step_1000", "step_final", "step_200_v2", "step_11.tmp", "step_12", "old"):
        (root / name).mkdir(parents=True)
        (root / name / "run_state.json").write_text("{}")
    (root / "step_12" / "run_state.json").unlink()  # interrupted before its state was written
    (root / "step_13").write_text("")  # a file, not a folder
    assert [d.name for d in train_rec.checkpoint_dirs(tmp_path)] == ["step_9", "step_10", "step_1000"]
    assert train_rec.resolve_checkpoint("latest", tmp_path) == root / "step_1000"
    assert train_rec.checkpoint_step(root / "step_200_v2") is None
    with pytest.raises(FileNotFoundError, match=r"no run_state\.json"):
        train_rec.resolve_checkpoint(str(root / "step_12"), tmp_path)


def test_json_state_is_replaced_whole_or_not_at_all(train_rec, tmp_path, monkeypatch):
    path = tmp_path / "best.json"
    train_rec.write_json(path, {"accuracy": 0.5})

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        train_rec.write_json(path, {"accuracy": 0.75, "history": list(range(10000))})
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["best.json"]


@pytest.mark.slow
def test_a_damaged_state_file_is_named_in_the_error(towers, train_rec, straight, tmp_path):
    straight_dir, _ = straight
    out = tmp_path / "run"
    shutil.copytree(straight_dir, out)
    for damaged in (out / "best.json", out / "checkpoints" / "step_12" / "run_state.json"):
        damaged.write_text(damaged.read_text()[:20])  # cut short, as by a crash mid-write
    with pytest.raises(ValueError, match=r"step_12/run_state\.json is not valid JSON"):
        train_rec.main(_args(towers, out, "--resume_from_checkpoint", "latest"))
