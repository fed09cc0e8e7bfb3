"""The GPU rows of RESULTS.md in one command, under 9 minutes: the CUDA-only tests, then `gpu_paper_scale.py` plain,
`--tf32`, `--bf16`, `--tf32 --channels-last` and the paper preset, each with its own time budget.

    python benchmarks/gpu_day.py                        # on the GPU: writes benchmarks/results/gpu_day/
    python benchmarks/report.py                         # RESULTS.md from benchmarks/results/ and that folder
    python benchmarks/gpu_day.py --dry-run --output-dir gpu_day_dry   # the same steps on the CPU at tiny sizes

Every row is a subprocess (`benchmarks/gpu_paper_scale.py --output FOLDER/<row file>`) killed at its budget plus
`KILL_MARGIN_S` (in the dry run, `gpu_paper_scale.main` with the same arguments, in this process); a row that does not fit what is left of `TOTAL_BUDGET_S` is skipped, and said so. The folder gets
one JSON per row (named as `gpu_paper_scale.py` names its own files, `_preset` for the preset row) and
`gpu_day.json`: the commit, the device, each step's command, exit status, seconds and file. `benchmarks/report.py`
reads the folder (`gpu_day_results`) in place of the same-named files of `benchmarks/results/`.

`--dry-run` runs the same steps on the CPU at the `tiny` scale (the paper's DETR + BERT layout at toy widths), batch
1, one timed round, four methods where a row runs them all, on one torch thread, in well under a minute, so that the first GPU only runs it; TF32 is CUDA-only, so
the dry run drops `--tf32` from the commands (and records that in `gpu_day.json`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root, for `benchmarks`

import torch  # noqa: E402

from benchmarks.environment import RESULTS_DIR  # noqa: E402

GPU_DAY_DIR = RESULTS_DIR / "gpu_day"
MANIFEST = "gpu_day.json"
TOTAL_BUDGET_S = 540.0
"""All steps together: 9 minutes."""
KILL_MARGIN_S = 45.0
"""A row's subprocess is killed this long after its `--time-budget` (start-up, model building, the last round)."""
CUDA_TESTS = ("tests/test_feed_forward.py",)
"""Test modules with tests skipped without CUDA (`skipif(not torch.cuda.is_available())`); run with `-k cuda`."""
TESTS_BUDGET_S = 60.0
STARTUP_S = 30.0
"""What a row takes beyond its `--time-budget` on a GPU machine, about: Python, CUDA and the exact account."""


@dataclass(frozen=True)
class Row:
    """One `gpu_paper_scale.py` run: its flags, its time budget (seconds) and its JSON file's suffix."""

    name: str
    flags: tuple[str, ...]
    budget_s: float
    methods: tuple[str, ...] = ()

    def file(self, device: str) -> str:
        """`gpu_paper_scale.py`'s own file name for these flags (`_preset` for the preset row)."""
        suffix = ("_bf16" if "--bf16" in self.flags else "") + ("_tf32" if "--tf32" in self.flags else "")
        suffix += "_channelslast" if "--channels-last" in self.flags else ""
        return f"gpu_paper_scale_{device}{suffix}{'_preset' if self.name == 'preset' else ''}.json"


ROWS = (
    Row("plain", (), 85.0),
    Row("tf32", ("--tf32",), 65.0),
    Row("bf16", ("--bf16",), 65.0),
    Row("tf32_channels_last", ("--tf32", "--channels-last"), 65.0),
    Row("preset", ("--tf32",), 40.0, methods=("m2ist_paper", "m2ist_shared_sum", "full")),
)
"""Every method in the first four (the preset among them); the preset row times the authors' model against the
library's M2IST and full fine-tuning alone, with more rounds in its budget."""

DRY_RUN = ("--scale", "tiny", "--device", "cpu", "--batch-size", "1", "--steps", "1", "--warmup", "0")
DRY_RUN_METHODS = ("full", "lora", "m2ist_shared_sum", "m2ist_paper")
"""The dry run's methods where a row runs every method: a baseline of each kind (towers trained, adapters in the
towers) and both M2IST models."""
DRY_RUN_BUDGET_S = 15.0
CUDA_ONLY_FLAGS = ("--tf32",)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def row_command(row: Row, output: Path, budget_s: float, dry_run: bool) -> tuple[list[str], list[str]]:
    """The row's command line, and the flags a dry run dropped from it."""
    flags = [f for f in row.flags if not (dry_run and f in CUDA_ONLY_FLAGS)]
    dropped = [f for f in row.flags if f not in flags]
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_paper_scale.py"), *flags, "--time-budget",
               f"{budget_s:g}", "--output", str(output), *(DRY_RUN if dry_run else ())]
    methods = row.methods or (DRY_RUN_METHODS if dry_run else ())
    if methods:
        command += ["--methods", *methods]
    return command, dropped


def run_step(command: list[str], timeout_s: float, log) -> dict:
    """Run `command` from the repository root, its output passed through; exit status and seconds."""
    log("$ " + " ".join(command))
    started = time.monotonic()
    try:
        status = subprocess.run(command, cwd=ROOT, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        status = "killed at its time limit"
    return {"command": " ".join(command[1:]), "status": status, "seconds": round(time.monotonic() - started, 1)}


def run_in_process(command: list[str], log) -> dict:
    """The dry run's `gpu_paper_scale.py` rows: its `main` called with the command's arguments, in this process on
    one torch thread (no process start-up, no threads fighting over a shared CPU)."""
    from benchmarks import gpu_paper_scale

    log("$ " + " ".join(command) + "   (in this process)")
    started, threads = time.monotonic(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gpu_paper_scale.main(command[2:])
        status: int | str = 0
    except (Exception, SystemExit) as error:  # a failed row is recorded; the next one runs
        status = f"{type(error).__name__}: {error}"
    finally:
        torch.set_num_threads(threads)
    return {"command": " ".join(command[1:]), "status": status, "seconds": round(time.monotonic() - started, 1)}


def main(argv: list[str] | None = None, log=print) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", type=Path, default=None, help=f"default: {GPU_DAY_DIR.relative_to(ROOT)}")
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    p.add_argument("--total-budget", type=float, default=TOTAL_BUDGET_S, help="seconds for every step together")
    a = p.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on a CPU")
    device = "cpu" if a.dry_run else "cuda"
    out = a.output_dir or GPU_DAY_DIR
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + a.total_budget
    manifest = {"kind": "gpu_day", "commit": git_commit(), "dry_run": a.dry_run, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "steps": {}}

    def save() -> None:
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))

    tests = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *CUDA_TESTS, "-k", "cuda"]
    if deadline - time.monotonic() < TESTS_BUDGET_S:
        manifest["steps"]["cuda_tests"] = {"status": f"skipped: under {TESTS_BUDGET_S:.0f} s of --total-budget"}
    else:
        manifest["steps"]["cuda_tests"] = run_step(tests, TESTS_BUDGET_S, log)
    save()
    for row in ROWS:
        budget = DRY_RUN_BUDGET_S if a.dry_run else row.budget_s
        left = deadline - time.monotonic()
        if left < budget + KILL_MARGIN_S:
            manifest["steps"][row.name] = {"status": f"skipped: {left:.0f} s left of --total-budget"}
            log(f"{row.name}: skipped, {left:.0f} s left")
            continue
        command, dropped = row_command(row, out / row.file(device), budget, a.dry_run)
        step = run_in_process(command, log) if a.dry_run else run_step(command, budget + KILL_MARGIN_S, log)
        manifest["steps"][row.name] = {**step, "file": row.file(device), "dropped_flags": dropped}
        save()
    failed = [name for name, step in manifest["steps"].items() if step.get("status") != 0]
    log(f"wrote {out}: " + (f"not all steps passed: {failed}" if failed else "every step passed"))
    return manifest


if __name__ == "__main__":
    sys.exit(1 if [s for s in main()["steps"].values() if s.get("status") != 0] else 0)
