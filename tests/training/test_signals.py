"""peft_m2ist.training.signals: SIGTERM / SIGINT are recorded, and the run ends with 128 + the signal number."""

from __future__ import annotations

import os
import signal

import pytest
from accelerate import Accelerator

from peft_m2ist.training import OutputLock, StopSignals


def test_sigterm_is_recorded_and_ends_the_run_with_143_after_the_save(tmp_path, capsys):
    accelerator = Accelerator(cpu=True)
    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignals().install()
    stop.exit_if_requested(accelerator, "nothing")  # no signal yet: goes on
    assert not stop.requested(accelerator) and stop.exit_code == 0
    lock = OutputLock(tmp_path).acquire()
    os.kill(os.getpid(), signal.SIGTERM)  # handled: the test process lives on
    assert stop.requested(accelerator) and stop.exit_code == 143
    with pytest.raises(SystemExit) as ended:
        stop.exit_if_requested(accelerator, tmp_path / "step_5", lock)
    assert ended.value.code == 143
    assert f"stopped by SIGTERM: saved {tmp_path / 'step_5'}; continue with --resume_from_checkpoint latest" \
        in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is before and not lock.held  # handlers back, folder free


def test_a_second_ctrl_c_interrupts_at_once():
    stop = StopSignals().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.uninstall()
