"""The output folder's lock: one training run at a time per `--output_dir`, and a writable folder checked first.

`OutputLock` holds `OUTPUT/.lock` for the whole run: an exclusive `fcntl.flock` on the file, whose content names
the holder (PID and host). A second run on the same folder finds the lock taken and stops at once with a
`OutputLockedError` that names them. The operating system drops a `flock` when its process dies, however it
dies (SIGKILL included), so a lock file left by a dead run is taken over; when its content names a process of
this host that no longer runs, the take-over is reported. Only the main process of a multi-process run takes the
lock; `claim_output_dir` tells the others whether it got it, so none of them waits for a run that stopped.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import logging
import os
import socket
import uuid
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
"""`OUTPUT/.lock`: held by the run writing into `OUTPUT`; it names the holder's PID and host."""

_HELD: dict[Path, OutputLock] = {}
"""The locks this process holds, by lock file (resolved): a run in this process that ended by an exception without
releasing its lock (a test calling `main()` again) must not lock itself out."""


class OutputLockedError(RuntimeError):
    """Another run (named in the message) holds the output folder's lock."""


def process_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this host (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(path: Path) -> dict[str, str]:
    """`{"pid": ..., "host": ...}` as written in the lock file `path` (empty when it names nobody)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _describe(holder: dict[str, str]) -> str:
    return f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}"


class OutputLock:
    """An exclusive lock on `folder/.lock`, taken by `acquire()` without waiting; `release()` gives it back."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> OutputLock:
        """Take the lock, or raise `OutputLockedError` naming the holder. Returns `self`."""
        key = self.path.resolve()
        if key in _HELD:  # an earlier run of this very process that did not get to release it
            _HELD[key].release()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = _holder(self.path)
                raise OutputLockedError(
                    f"{self.path.parent} is in use by another training run ({_describe(holder)}; its lock is "
                    f"{self.path}): wait for it to finish, or choose another --output_dir. Two runs writing into one "
                    "folder would overwrite each other's checkpoints and adapters."
                ) from None
            try:  # the holder may have deleted the file between our open and our lock: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _holder(self.path)
        if previous.get("pid"):
            if previous.get("host") == socket.gethostname() and not process_alive(int(previous["pid"])):
                how = "which no longer runs"
            else:
                how = "which no longer holds it"
            logger.warning(f"taking over the stale lock {self.path} of {_describe(previous)}, {how} (its run "
                           "ended without releasing it, e.g. killed)")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid={os.getpid()}\nhost={socket.gethostname()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        _HELD[key] = self
        atexit.register(self.release)  # a run ending by an exception leaves no lock file behind
        return self

    def release(self) -> None:
        """Delete the lock file and give the lock back (a no-op when not held)."""
        if self._fd is None:
            return
        _HELD.pop(self.path.resolve(), None)
        atexit.unregister(self.release)
        try:
            self.path.unlink(missing_ok=True)  # while still locked: a run waiting to open it then makes a new one
        finally:
            os.close(self._fd)
            self._fd = None


def check_writable(folder: str | os.PathLike) -> None:
    """Create `folder` if needed and write and delete a file in it; `PermissionError` naming it if that fails."""
    folder = Path(folder)
    probe = folder / f".write-test-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise PermissionError(
            f"--output_dir {folder} is not writable ({type(error).__name__}: {error}): the run could save no "
            "checkpoint and no adapter. Choose another --output_dir, or make it writable."
        ) from error


def claim_output_dir(output_dir: str | os.PathLike, accelerator: Accelerator) -> OutputLock | None:
    """Check that `output_dir` is writable and take its lock; call it on every process, before anything loads.

    The main process does both and returns the held `OutputLock` (release it when the run ends; the process ending
    releases it anyway); the others return None. If the main process fails (`PermissionError`,
    `OutputLockedError`), every process raises the same error, so none waits for the others.
    """
    lock, failure = None, None
    if accelerator.is_main_process:
        try:
            check_writable(output_dir)
            lock = OutputLock(output_dir).acquire()
        except (PermissionError, OutputLockedError) as error:
            failure = error
    if accelerator.num_processes > 1:
        shared = [failure]
        broadcast_object_list(shared, from_process=0)
        failure = shared[0]
    if failure is not None:
        raise failure
    return lock
