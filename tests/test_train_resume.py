"""examples/train_rec.py killed and resumed: the same adapters, bytes for bytes; run state; used output folders.

A crash is real: train_rec.py runs as a subprocess (`subprocess.Popen`), the test waits until a given checkpoint
folder exists (polling every 5 ms; a checkpoint is renamed to `step_N` only once complete) and sends SIGKILL, so
the script gets no chance to clean up. The run is then resumed with `--resume_from_checkpoint latest` and must
end with the final (and best) adapter of an uninterrupted run, byte for byte, and the same history. The runs are
tiny (48 training rows, 6 steps an epoch, 2 epochs, a checkpoint every 2 steps).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_train_script as script_tests
from earlier_run import write_earlier_run
from safetensors.torch import load_file

from peft_m2ist.training import resolve_checkpoint

towers = script_tests.towers  # the tiny local towers, saved once per module
train_rec = script_tests.train_rec  # the script as a module, accelerate set up for one CPU process
_args, _run, SCRIPT, ROOT = script_tests._args, script_tests._run, script_tests.SCRIPT, script_tests.ROOT


def _start_and_kill(args: list[str], when: Path, log: Path, timeout: float = 600,
                    sig: signal.Signals = signal.SIGKILL) -> int:
    """Start train_rec.py on `args` and send it `sig` (SIGKILL) as soon as `when` exists; its exit code.

    Fails if the run ends before `when` appears, or (SIGKILL) had already finished when the kill was sent: the kill
    must land mid-run. After another signal, the run may take its time to end (up to `timeout`).
    """
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + timeout
        while not when.exists():
            assert proc.poll() is None, f"ended ({proc.returncode}) before {when} existed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {when} after {timeout} s"
            time.sleep(0.005)
        proc.send_signal(sig)
        if sig != signal.SIGKILL:
            proc.wait(timeout)
    finally:
        proc.kill()  # nothing left running if an assertion failed (a no-op after the SIGKILL)
        proc.wait()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL, f"finished ({proc.returncode}) before the kill:\n{log.read_text()[-3000:]}"
    return proc.returncode


def _resume(towers, out: Path) -> int:
    """Resume `out` with `--resume_from_checkpoint latest` in a subprocess; the step of the checkpoint it took."""
    proc = _run(_args(towers, out, "--resume_from_checkpoint", "latest"))
    return int(re.search(r"Resumed from \S+step_(\d+) \(step", proc.stdout + proc.stderr).group(1))


def _bytes(out: Path, adapter: str) -> bytes:
    return (out / adapter / "adapter_model.safetensors").read_bytes()


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _assert_same_run(out: Path, straight: Path) -> None:
    """`out` ended as the uninterrupted `straight`: adapters byte for byte, history and best score exactly."""
    assert _bytes(out, "final_adapter") == _bytes(straight, "final_adapter")
    assert _bytes(out, "best_adapter") == _bytes(straight, "best_adapter")
    got, expected = _results(out), _results(straight)
    assert got["history"] == expected["history"] and [h["epoch"] for h in got["history"]] == [0, 1]
    assert got["best"] == expected["best"] == json.loads((out / "best.json").read_text())
    assert got["steps"] == 12


@pytest.fixture(scope="module")
def straight(towers, tmp_path_factory) -> Path:
    """An uninterrupted run, in a subprocess like the killed ones: its folder (checkpoints step_10 and step_12)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    _run(_args(towers, out))
    return out


@pytest.mark.slow
def test_a_run_killed_mid_epoch_and_resumed_ends_with_the_same_adapter_bytes(towers, straight, tmp_path):
    """Killed once step_8 (mid-epoch 1) is saved; `latest` continues from the newest complete checkpoint."""
    # 12 steps, a checkpoint every 2, the newest 2 kept (--checkpoints_total_limit)
    assert sorted(d.name for d in (straight / "checkpoints").iterdir()) == ["step_10", "step_12"]
    out = tmp_path / "run"
    _start_and_kill(_args(towers, out), out / "checkpoints" / "step_8", tmp_path / "killed.log")
    assert not (out / "final_adapter").exists() and not (out / "results.json").exists()
    assert _resume(towers, out) >= 8
    _assert_same_run(out, straight)
    # the adapter folder holds the side network and head only, and so do the checkpoints (the towers are rebuilt)
    weights = load_file(out / "final_adapter" / "adapter_model.safetensors")
    assert weights and all(".m2ist_side." in k or ".m2ist_head." in k for k in weights)
    saved = load_file(out / "checkpoints" / "step_12" / "model.safetensors")
    assert len(saved) == len(weights) and all(".m2ist_side." in k or ".m2ist_head." in k for k in saved)


@pytest.mark.slow
@pytest.mark.parametrize("kill_step", [6, 12], ids=["end-of-first-epoch", "last-step"])
def test_a_checkpoint_on_an_epochs_last_step_is_evaluated_after_resuming(towers, straight, tmp_path, kill_step):
    """Saved on epoch 0's last step (6) or the run's last (12), before that epoch's evaluation, and killed during
    it: the resumed run evaluates that epoch first and ends with the uninterrupted run's history, best score, best
    and final adapters."""
    out = tmp_path / "run"
    _start_and_kill(_args(towers, out), out / "checkpoints" / f"step_{kill_step}", tmp_path / "killed.log")
    assert not (out / "results.json").exists()
    saved = json.loads((out / "checkpoints" / f"step_{kill_step}" / "run_state.json").read_text())
    assert saved["step"] == kill_step and saved["elapsed_s"] > 0
    assert saved["evaluated_epoch"] == {6: -1, 12: 0}[kill_step]  # the epoch ending there was not evaluated yet

    assert _resume(towers, out) == kill_step
    _assert_same_run(out, straight)
    assert _results(out)["elapsed_s"] >= saved["elapsed_s"]  # goes on from the checkpoint's instead of restarting


@pytest.mark.slow
def test_a_run_killed_while_saving_a_checkpoint_resumes_from_the_one_before(towers, straight, tmp_path):
    """Killed as soon as `step_10.tmp` appears (the save takes a while: weights, optimiser, RNG states, the best
    adapter, run_state.json); a `.tmp` folder left behind is no checkpoint, and the resumed run drops it."""
    out = tmp_path / "run"
    _start_and_kill(_args(towers, out), out / "checkpoints" / "step_10.tmp", tmp_path / "killed.log")
    left = {d.name for d in (out / "checkpoints").iterdir()}
    assert {"step_6", "step_8"} <= left or {"step_8", "step_10"} <= left, left
    step = _resume(towers, out)
    assert step == (10 if "step_10" in left else 8)  # the save may just have finished before the kill landed
    assert not (out / "checkpoints" / "step_10.tmp").exists()
    _assert_same_run(out, straight)


@pytest.mark.slow
def test_resuming_a_finished_run_keeps_its_history_and_skips_a_half_written_checkpoint(towers, train_rec, straight,
                                                                                       tmp_path):
    """`latest` passes over a checkpoint folder without run_state.json (its save never finished); resuming the
    finished run re-evaluates its last epoch and trains no further."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    half = out / "checkpoints" / "step_14"  # a save killed after the weights, before the optimiser state
    half.mkdir()
    shutil.copy(out / "checkpoints" / "step_12" / "model.safetensors", half)
    assert resolve_checkpoint("latest", out) == out / "checkpoints" / "step_12"

    resumed = train_rec.main(_args(towers, out, "--resume_from_checkpoint", "latest"))
    assert resumed["steps"] == 12 and resumed["history"] == _results(straight)["history"]
    assert resumed["elapsed_s"] >= json.loads((out / "checkpoints" / "step_12" / "run_state.json").read_text())[
        "elapsed_s"]
    assert _bytes(out, "final_adapter") == _bytes(straight, "final_adapter")
    assert not half.exists()  # newer than the checkpoint resumed from: dropped
    assert _results(out)["history"] == resumed["history"]


@pytest.mark.slow
def test_a_run_killed_while_saving_its_first_checkpoint_starts_anew_with_latest(towers, straight, tmp_path):
    """Killed as soon as `step_2.tmp` appears, before any checkpoint is complete: `latest` finds none, deletes the
    partial folder with a message and starts a new run, which ends as the uninterrupted one."""
    out = tmp_path / "run"
    _start_and_kill(_args(towers, out), out / "checkpoints" / "step_2.tmp", tmp_path / "killed.log")
    if (out / "checkpoints" / "step_2").exists():
        pytest.skip("the save finished before the kill landed (a loaded machine)")
    assert resolve_checkpoint("latest", out) is None
    proc = _run(_args(towers, out, "--resume_from_checkpoint", "latest"))
    log = proc.stdout + proc.stderr
    assert "holds no complete checkpoint (its run was stopped before saving one): starting a new run" in log
    assert "checkpoints/step_2.tmp" in log and "Resumed from" not in log
    assert f"taking over the stale lock {out / '.lock'} of PID " in log  # the killed run's, released by its death
    _assert_same_run(out, straight)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_next_step_and_the_resumed_run_ends_the_same(towers, straight, tmp_path):
    """What a scheduler does before a kill: SIGTERM once step_4 is saved. The run finishes its optimiser step,
    saves it as a checkpoint, says so and exits with 143 (128 + SIGTERM); `latest` then resumes it exactly."""
    out, log = tmp_path / "run", tmp_path / "terminated.log"
    code = _start_and_kill(_args(towers, out), out / "checkpoints" / "step_4", log, sig=signal.SIGTERM)
    text = log.read_text()
    assert code == 143, text[-3000:]
    saved = re.search(r"stopped by SIGTERM: saved (\S+step_(\d+)); continue with --resume_from_checkpoint latest",
                      text)
    assert saved, text[-3000:]
    step = int(saved.group(2))
    assert 4 <= step < 12 and resolve_checkpoint("latest", out).name == f"step_{step}"
    assert not (out / "final_adapter").exists() and not (out / ".lock").exists()  # released on the way out
    assert _resume(towers, out) == step
    _assert_same_run(out, straight)


@pytest.mark.slow
def test_an_output_dir_with_an_earlier_runs_outputs_is_refused_unless_overwritten(towers, train_rec, tmp_path):
    out = tmp_path / "run"
    write_earlier_run(out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(FileExistsError, match=r"checkpoints, best\.json, results\.json.*--overwrite_output_dir"):
        train_rec.main(_args(towers, out, "--max_train_steps", "4"))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing touched

    result = train_rec.main(_args(towers, out, "--max_train_steps", "4", "--overwrite_output_dir"))
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert resolve_checkpoint("latest", out).name == "step_4"
    best = json.loads((out / "best.json").read_text())
    assert best == result["best"] and best["step"] == 4 and best["accuracy"] < 0.99
    assert _results(out)["steps"] == 4


def test_overwrite_output_dir_and_resume_latest_exclude_each_other(train_rec, capsys):
    with pytest.raises(SystemExit) as stopped:
        train_rec.parse_args(["--overwrite_output_dir", "--resume_from_checkpoint", "latest"])
    assert stopped.value.code == 2
    assert "--overwrite_output_dir would delete the checkpoints --resume_from_checkpoint latest" in capsys.readouterr().err


@pytest.mark.slow
def test_a_damaged_state_file_is_named_in_the_error(towers, train_rec, straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    for damaged in (out / "best.json", out / "checkpoints" / "step_12" / "run_state.json"):
        damaged.write_text(damaged.read_text()[:20])  # cut short, as by a crash mid-write
    with pytest.raises(ValueError, match=r"step_12/run_state\.json is not valid JSON"):
        train_rec.main(_args(towers, out, "--resume_from_checkpoint", "latest"))
