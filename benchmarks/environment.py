"""Where results go and what wrote them: the results folder, the machine and the command line of a run."""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_start": os.getloadavg()[0],  # > cpu_count: other processes shared the cores
        # float32 precision torch allows: matmuls ("highest" = no TF32) and cuDNN convolutions (TF32 by default)
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }
    try:
        import peft
        import transformers

        info["transformers"] = transformers.__version__
        info["peft"] = peft.__version__
    except ImportError:
        pass
    with suppress(OSError):
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=Path(__file__).parent, check=False).stdout.strip()
        # The benchmarks' own outputs (results/*.json, RESULTS.md) do not count: a run rewrites them as it goes.
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":(exclude)benchmarks/results", ":(exclude)benchmarks/RESULTS.md"],
                                 capture_output=True, text=True, cwd=Path(__file__).parents[1], check=False).stdout
        info["git_worktree_clean"] = not changed.strip()  # False: uncommitted code changes on top of git_commit
    return info


def command_line() -> str:
    return "python " + " ".join([str(Path(sys.argv[0]).as_posix()), *sys.argv[1:]])


def free(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def mib(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:,.1f}"
