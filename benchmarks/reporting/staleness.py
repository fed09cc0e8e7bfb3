"""Which results are stale: for each result file, the first commit after the one it was measured at that changed the
code it measures (git history), recorded in `benchmarks/staleness.json` so that RESULTS.md is a function of
committed files.

`python benchmarks/report.py` checks every result against the repository's HEAD (when git and the history are there)
before it renders; RESULTS.md then names, beside each run, the commit since which its numbers may no longer hold, and
the commit the check was made at. "Stale" means the code changed, not that the numbers did: a refactor that moves
files marks everything measured before it, until the benchmark is run again (or shown unchanged, e.g. the accuracy
reruns in docs/results.md).
"""

from __future__ import annotations

import json
import re
import subprocess

from benchmarks.reporting.base import HERE

STALENESS_FILE = HERE / "staleness.json"
ROOT = HERE.parent
# the library code no benchmark number depends on: the training loop, the user-facing API, the model card
_NOT_MEASURED = (":(exclude)peft_m2ist/training", ":(exclude)peft_m2ist/inference.py",
                 ":(exclude)peft_m2ist/loading.py", ":(exclude)peft_m2ist/model_card.py")
# what every measurement of a model runs besides the library: the methods, the scales and the measuring code
_SHARED_BENCHMARK_CODE = ("benchmarks/baselines.py", "benchmarks/scales.py", "benchmarks/measurement.py",
                          "benchmarks/timing.py")
_SCRIPT = re.compile(r"(benchmarks/[\w/]+\.py)")


def measured_code(result: dict) -> list[str]:
    """The git pathspecs of the code whose change makes `result` stale: its own script, the shared benchmark code
    and the library (less the training loop and the user-facing modules); a data-loader benchmark measures the
    data room only."""
    script = _SCRIPT.search(result.get("command", ""))
    own = [script.group(1)] if script else []
    if result.get("kind") == "data_scale":
        return ["peft_m2ist/data", "benchmarks/data_scale.py"]
    return ["peft_m2ist", *_NOT_MEASURED, *own, *_SHARED_BENCHMARK_CODE]


def measured_commit(result: dict) -> str | None:
    """The commit a result was measured at: `machine.git_commit`, or the commit its uncommitted changes were
    committed as (`"<commit> + uncommitted changes, committed as <commit>"`); None when not recorded."""
    text = str(result.get("machine", {}).get("git_commit") or "")
    committed_as = re.search(r"committed as ([0-9a-f]{7,40})", text)
    if committed_as:
        return committed_as.group(1)
    first = re.match(r"[0-9a-f]{7,40}\b", text)
    return first.group(0) if first else None


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def first_change(since: str, upto: str, pathspecs: list[str]) -> dict | None:
    """The oldest commit in `since..upto` that touches `pathspecs` (hash, date, how many such commits), or None."""
    log = _git("log", "--reverse", "--format=%h %cs", f"{since}..{upto}", "--", *pathspecs).splitlines()
    if not log:
        return None
    commit, date = log[0].split()
    return {"commit": commit, "date": date, "commits": len(log)}


def check(results: list[dict], upto: str = "HEAD") -> dict | None:
    """The staleness of every result against `upto`, or None where git or the history is missing (a tarball)."""
    try:
        checked_at = _git("rev-parse", "--short", upto)
    except (OSError, subprocess.CalledProcessError):
        return None
    files: dict[str, dict] = {}
    for result in results:
        commit = measured_commit(result)
        entry: dict = {"measured_at": commit}
        if commit is None:
            entry["stale_since"] = "unknown"
        else:
            try:
                entry["stale_since"] = first_change(commit, checked_at, measured_code(result))
            except subprocess.CalledProcessError:  # a commit this history does not hold
                entry["stale_since"] = "unknown"
        files[result["_file"]] = entry
    return {"checked_at": checked_at, "files": files}


_record: dict | None = None  # `benchmarks/staleness.json` as read once (every run's caption looks it up)


def refresh(results: list[dict]) -> None:
    """Write `benchmarks/staleness.json` for `results` at HEAD (kept as it is when git cannot say)."""
    global _record
    staleness = check(results)
    if staleness is not None:
        STALENESS_FILE.write_text(json.dumps(staleness, indent=2) + "\n")
        _record = staleness


def load() -> dict:
    """The record of `benchmarks/staleness.json` (empty when there is none), read from disk once."""
    global _record
    if _record is None:
        _record = (json.loads(STALENESS_FILE.read_text()) if STALENESS_FILE.exists()
                   else {"checked_at": None, "files": {}})
    return _record


def stale_note(result: dict, staleness: dict | None = None) -> str:
    """"" for a fresh (or unchecked) result; else the words to put after its machine line."""
    staleness = staleness or load()
    entry = staleness["files"].get(result["_file"])
    if not entry or entry["stale_since"] is None:
        return ""
    if entry["stale_since"] == "unknown":
        return "; **may be stale**: the commit it was measured at is not known to this history"
    since = entry["stale_since"]
    return (f"; **stale since {since['commit']}** ({since['date']}): {since['commits']} commit"
            f"{'s' if since['commits'] != 1 else ''} up to {staleness['checked_at']} changed the code it measures")


def staleness_section(results: list[dict]) -> list[str]:
    """One table: every result file, the commit it was measured at, and since which commit it is stale."""
    staleness = load()
    lines = [f"Checked at commit {staleness['checked_at']} by `python benchmarks/report.py` "
             "(`benchmarks/staleness.json`): a run is stale when a later commit changed the code it measures (its "
             "script, the shared benchmark code, the library less the training loop and user-facing modules); the "
             "numbers may still hold, but nobody has measured them since. Rerun the script named in the run's "
             "section to refresh it (the GPU runs: `python benchmarks/gpu_day.py`).", "",
             "| result | measured at | stale since | commits since that changed its code |",
             "| --- | --- | --- | ---: |"]
    for result in results:
        entry = staleness["files"].get(result["_file"])
        if entry is None:
            lines.append(f"| `{result['_file']}` | {measured_commit(result) or 'unknown'} | not checked | |")
            continue
        since = entry["stale_since"]
        if since is None:
            lines.append(f"| `{result['_file']}` | {entry['measured_at']} | fresh | 0 |")
        elif since == "unknown":
            lines.append(f"| `{result['_file']}` | {entry['measured_at'] or 'unknown'} | unknown | |")
        else:
            lines.append(f"| `{result['_file']}` | {entry['measured_at']} | **{since['commit']}** ({since['date']}) | "
                         f"{since['commits']} |")
    return lines
