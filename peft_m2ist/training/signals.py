"""SIGTERM and SIGINT: the run saves a checkpoint at the next step boundary and exits, instead of dying unsaved.

Schedulers (SLURM, Kubernetes, ...) send SIGTERM some time before they kill a job, and Ctrl-C sends SIGINT.
`StopSignals.install()` replaces both handlers by one that only records the signal; the training loop asks
`requested()` after each optimiser step, saves a checkpoint there and ends (`exit_if_requested`) with `exit_code` (128 + the signal
number, the shell's convention for "ended by that signal": 143 for SIGTERM, 130 for SIGINT), so a scheduler or a
script sees that the run did not finish, and `--resume_from_checkpoint latest` continues it exactly. A second
SIGINT while waiting for the step boundary interrupts at once (`KeyboardInterrupt`).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import torch
from accelerate import Accelerator

from .lock import OutputLock

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Records SIGTERM / SIGINT instead of dying; see the module docstring."""

    def __init__(self) -> None:
        self.received: int | None = None
        """The first stop signal received (its number), or None."""
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        """Handle SIGTERM and SIGINT from now on (only from the main thread: in another one, nothing is done)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, unsaved
        self.received = self.received or signum
        message = (f"received {signal.Signals(signum).name}: saving a checkpoint at the end of this optimiser step, "
                   "then stopping (Ctrl-C again to stop at once, unsaved)\n")
        os.write(2, message.encode())  # not print(): the handler may have interrupted a write to stderr

    def requested(self, accelerator: Accelerator) -> bool:
        """Whether a stop signal was received, by any process (call it on every process at each step boundary)."""
        stop = self.received is not None
        if accelerator.num_processes > 1:  # a signal may reach only some processes: all stop at the same step
            flag = torch.tensor([float(self.received or 0)], device=accelerator.device)
            received = int(accelerator.reduce(flag, reduction="max"))
            self.received, stop = self.received or (received or None), bool(received)
        return stop

    @property
    def exit_code(self) -> int:
        """128 + the signal number (143 for SIGTERM, 130 for SIGINT); 0 when none was received."""
        return 128 + self.received if self.received else 0

    def exit_if_requested(self, accelerator: Accelerator, checkpoint: object, lock: OutputLock | None = None) -> None:
        """After the checkpoint `checkpoint` was saved: if a stop signal was received (`requested()` asked first,
        on every process), print so, end the trackers, release `lock` (the output folder's), put the old signal
        handlers back and raise `SystemExit(self.exit_code)`; else nothing."""
        if self.received is None:
            return
        name = signal.Signals(self.received).name if self.received else "a stop signal"
        accelerator.print(f"stopped by {name}: saved {checkpoint}; continue with --resume_from_checkpoint latest "
                          f"(exit code {self.exit_code})")
        accelerator.end_training()
        self.release(lock)
        raise SystemExit(self.exit_code)

    def release(self, lock: OutputLock | None = None) -> None:
        """At the run's end: put the previous signal handlers back and release `lock` (the output folder's)."""
        self.uninstall()
        if lock is not None:
            lock.release()
