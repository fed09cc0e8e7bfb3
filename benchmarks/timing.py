"""Timing: tasks run in interleaved rounds (A, B, C, A, B, C, ...), so that every method sees the same machine."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_times(tasks: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device,
                      deadline: float | None = None, log=print,
                      cpu_times: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Run A, B, C, A, B, C, ...: `warmup` untimed rounds, then up to `repeats` timed rounds (stops at `deadline`).

    Returns wall-clock seconds per task; `cpu_times`, when given, receives this process's CPU seconds per task (all
    threads), which other processes sharing the cores disturb much less than the wall clock.
    """
    times: dict[str, list[float]] = {name: [] for name in tasks}
    last: dict[str, float] = {}
    for r in range(warmup + repeats):
        if deadline is not None and r > warmup and time.perf_counter() > deadline:
            log(f"  time budget reached after {r - warmup} timed rounds")
            break
        for name, task in tasks.items():
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            task()
            _sync(device)
            elapsed = last[name] = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
                if cpu_times is not None:
                    cpu_times.setdefault(name, []).append(time.process_time() - cpu_start)
        log(f"  round {r + 1}/{warmup + repeats}" + (" (warm-up)" if r < warmup else "") + ": "
            + ", ".join(f"{n}={last[n]:.3f}s" for n in tasks))
    return times


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
