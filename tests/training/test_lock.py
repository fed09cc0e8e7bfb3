"""peft_m2ist.training.lock: one run per output folder, the holder named, a dead holder's lock taken over."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

import pytest
from accelerate import Accelerator

from peft_m2ist.training.lock import (
    LOCK_FILE,
    OutputLock,
    OutputLockedError,
    check_writable,
    claim_output_dir,
)

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"pid={os.getpid()}\\nhost=elsewhere\\n".encode())
print("held", flush=True)
time.sleep(60)
"""


def test_a_folder_locked_by_another_process_is_refused_naming_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / LOCK_FILE)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=rf"in use by another training run \(PID {holder.pid} on host "
                                                    "elsewhere"):
            OutputLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # its process is gone, and the operating system with it dropped its lock: the file is taken over
    lock = OutputLock(tmp_path).acquire()
    assert (tmp_path / LOCK_FILE).read_text() == f"pid={os.getpid()}\nhost={socket.gethostname()}\n"
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_message(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(f"pid={dead.pid}\nhost={socket.gethostname()}\n")
    with caplog.at_level(logging.WARNING, logger="peft_m2ist.training.lock"):
        lock = OutputLock(tmp_path).acquire()
    assert lock.held
    assert f"taking over the stale lock {tmp_path / LOCK_FILE} of PID {dead.pid}" in caplog.text
    assert "which no longer runs" in caplog.text
    assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid={os.getpid()}\n")
    lock.release()


def test_one_process_takes_a_lock_it_still_holds_from_an_earlier_run_back(tmp_path):
    """A run in this process that ended by an exception (its lock not released) does not lock out the next one."""
    first = OutputLock(tmp_path).acquire()
    second = OutputLock(tmp_path).acquire()
    assert second.held and not first.held
    second.release()


def test_claim_checks_that_the_folder_is_writable_before_locking(tmp_path):
    accelerator = Accelerator(cpu=True)
    lock = claim_output_dir(tmp_path / "new" / "run", accelerator)  # created
    assert lock.held and (tmp_path / "new" / "run" / LOCK_FILE).is_file()
    lock.release()
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match=r"--output_dir .*file/run is not writable"):
        check_writable(tmp_path / "file" / "run")
