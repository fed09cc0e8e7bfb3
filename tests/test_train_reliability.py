"""examples/train_rec.py's guards: one run per output folder, divergence stopped, an unwritable folder refused.

Real processes where it matters: the first run of the lock test is a subprocess, the second another, and the
diverging run exits with its own code. The runs are the tiny ones of `tests/test_train_resume.py`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_train_script as script_tests
import torch
from safetensors.torch import load_file

from peft_m2ist.training import LOCK_FILE, OutputLockedError, TrainingDiverged, checkpoint_dirs

towers = script_tests.towers
train_rec = script_tests.train_rec
_args, _run, SCRIPT, ROOT = script_tests._args, script_tests._run, script_tests.SCRIPT, script_tests.ROOT
pytestmark = pytest.mark.slow


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"ended ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.01)


def test_a_second_run_on_a_used_output_dir_stops_at_once_naming_the_first(towers, train_rec, tmp_path):
    """Both would pass the "earlier run" check (the folder is empty when they start). The first holds the lock; it
    is paused (SIGSTOP) while the second (in this test's process) starts, which stops before loading anything (its
    vision tower does not even exist), naming the first's PID. Once the first has finished, a rerun with
    --overwrite_output_dir works. (`test_a_lock_held_elsewhere_stops_every_process_of_a_two_process_run` checks the
    exit code of a refused script.)"""
    out = tmp_path / "run"
    first_args = _args(towers, out, "--max_train_steps", "2")
    first = subprocess.Popen([sys.executable, str(SCRIPT), *first_args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        lock = out / LOCK_FILE
        _wait_for(lambda: lock.is_file() and f"pid={first.pid}" in lock.read_text(), first, "the first run's lock")
        first.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(OutputLockedError) as refused:  # this process is another one than the first run's
            train_rec.main(_args(towers, out, "--max_train_steps", "2", "--vision_model", str(tmp_path / "no-tower")))
        waited = time.monotonic() - started
        first.send_signal(signal.SIGCONT)
        log = first.communicate(timeout=600)[0]
    finally:
        first.kill()
        first.wait()
    # at once, before the towers load (its vision tower does not even exist), naming the first run's PID
    assert waited < 10 and f"{out} is in use by another training run (PID {first.pid} on host" in str(refused.value)
    assert first.returncode == 0, log[-3000:]
    assert json.loads((out / "results.json").read_text())["steps"] == 2 and not lock.exists()

    result = train_rec.main([*first_args, "--overwrite_output_dir"])
    assert result["steps"] == 2 and not lock.exists()


def test_a_lock_held_elsewhere_stops_every_process_of_a_two_process_run(towers, tmp_path):
    """Only the main process takes the lock; the others learn that it failed instead of waiting for it."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'pid=1\\n'); "
                               "print('held', flush=True); time.sleep(300)", str(out / LOCK_FILE)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = _run(_args(towers, out), script_tests.TWO_CPU_PROCESSES, check=False, env=script_tests.CPU)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    assert proc.stderr.count("is in use by another training run (PID 1 on host ?") >= 2, proc.stderr[-3000:]


def test_an_unwritable_output_dir_is_refused_before_the_towers_load(train_rec, tmp_path):
    """A folder this user cannot write into (for root, whom permissions do not stop, sysfs), named in the error."""
    if sys.platform != "linux":
        pytest.skip("needs Linux")
    import os

    if os.geteuid() == 0:
        read_only = Path("/sys/kernel")
    else:
        read_only = tmp_path / "read-only"
        read_only.mkdir()
        read_only.chmod(0o555)
    argv = ["--output_dir", str(read_only), "--vision_model", str(tmp_path / "no-such-tower"), "--report_to", "none"]
    with pytest.raises(PermissionError, match=rf"--output_dir {read_only} is not writable"):
        train_rec.main(argv)


def test_a_diverging_run_stops_naming_the_step_and_never_saves_non_finite_weights(towers, train_rec, tmp_path):
    """At lr 1e5 the tiny run's loss is NaN at step 3: it stops there (exit code 1) with a message that names the
    step and a lower learning rate, not inside the box utilities. Its checkpoint of step 2 holds finite weights;
    resuming it stops again with the message (no crash), and with --on_nonfinite skip it finishes, its NaN steps
    skipped and counted, and no adapter whose predictions are all NaN is kept as the best."""
    out = tmp_path / "run"
    diverging = _args(towers, out, "--lr_head", "1e5", "--lr_adapter", "1e5")
    proc = _run(diverging, check=False)
    assert proc.returncode == 1
    assert "TrainingDiverged: step 3: the loss and the gradient norm (nan) are not finite; the run diverged: lower " \
           "the learning rate (--lr_head, --lr_adapter; try a tenth" in proc.stderr, proc.stderr[-3000:]
    assert [c.name for c in checkpoint_dirs(out)] == ["step_2"]
    weights = load_file(out / "checkpoints" / "step_2" / "model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())

    with pytest.raises(TrainingDiverged, match=r"^step 3: the loss"):
        train_rec.main([*diverging, "--resume_from_checkpoint", "latest"])
    result = train_rec.main([*diverging, "--resume_from_checkpoint", "latest", "--on_nonfinite", "skip"])
    assert result["steps"] == 12 and result["args"]["on_nonfinite"] == "skip"
    # the NaN steps were skipped, so the weights are step 2's: whatever they predict, a best adapter is only ever
    # one whose evaluation found real boxes (not all non-finite, not all without area)
    broken = [h for h in result["history"] if h["non_finite"] >= 1.0 or h["degenerate"] >= 1.0]
    best = json.loads((out / "results.json").read_text())["best"]
    assert best == result["best"]
    if best is None:
        assert len(broken) == len(result["history"]) and not (out / "best_adapter").exists()
    else:
        assert best["non_finite"] < 1.0 and best["degenerate"] < 1.0 and (out / "best_adapter").exists()
    assert json.loads((out / "checkpoints" / "step_12" / "run_state.json").read_text())["skipped_steps"] == 10
    final = load_file(out / "final_adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in final.values())


def test_an_adapter_diverged_to_finite_but_useless_weights_is_never_the_best(towers, train_rec, tmp_path):
    """At lr 1e4 the weights blow up but stay finite: the loss never turns NaN, the boxes overlap no target (Acc
    and mean IoU 0). The run finishes, but keeps no best adapter: the first evaluation is no longer "best" merely
    for beating a placeholder."""
    out = tmp_path / "run"
    result = train_rec.main(_args(towers, out, "--lr_head", "1e4", "--lr_adapter", "1e4", "--num_epochs", "1"))
    assert [(h["accuracy"], h["mean_iou"], h["non_finite"]) for h in result["history"]] == [(0.0, 0.0, 0.0)]
    assert result["best"] is None and not (out / "best_adapter").exists() and (out / "final_adapter").is_dir()
