"""RESULTS.md says which runs are stale and since which commit (benchmarks/reporting/staleness.py)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from benchmarks.reporting import base, staleness


def _is_git_checkout() -> bool:
    if shutil.which("git") is None:
        return False
    done = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=staleness.ROOT, capture_output=True,
                          text=True)
    return done.returncode == 0 and done.stdout.strip() == "false"  # a full history, not a shallow clone


def test_the_measured_commit_is_the_one_uncommitted_changes_were_committed_as():
    assert staleness.measured_commit({"machine": {"git_commit": "946e654"}}) == "946e654"
    gpu = {"machine": {"git_commit": "df1a3d9 + uncommitted changes, committed as 0421494"}}
    assert staleness.measured_commit(gpu) == "0421494"
    assert staleness.measured_commit({"machine": {"git_commit": None}}) is None
    assert staleness.measured_commit({}) is None


def test_a_benchmark_is_stale_when_its_own_script_or_the_library_changes_not_the_training_loop():
    code = staleness.measured_code({"kind": "memory_time", "command": "python benchmarks/gpu_paper_scale.py --bf16"})
    assert "benchmarks/gpu_paper_scale.py" in code and "peft_m2ist" in code
    assert ":(exclude)peft_m2ist/training" in code and "benchmarks/baselines.py" in code
    assert staleness.measured_code({"kind": "data_scale"}) == ["peft_m2ist/data", "benchmarks/data_scale.py"]


def test_the_note_beside_a_run_names_the_commit_and_the_check():
    record = {"checked_at": "abc1234", "files": {
        "results/a.json": {"measured_at": "1111111", "stale_since": {"commit": "2222222", "date": "2026-12-01",
                                                                     "commits": 3}},
        "results/b.json": {"measured_at": "1111111", "stale_since": None},
        "results/c.json": {"measured_at": None, "stale_since": "unknown"}}}
    note = staleness.stale_note({"_file": "results/a.json"}, record)
    assert "stale since 2222222" in note and "2026-12-01" in note and "3 commits up to abc1234" in note
    assert staleness.stale_note({"_file": "results/b.json"}, record) == ""
    assert "may be stale" in staleness.stale_note({"_file": "results/c.json"}, record)
    assert staleness.stale_note({"_file": "results/unchecked.json"}, record) == ""


def test_every_committed_result_is_in_the_record_and_results_md_shows_its_state():
    record = staleness.load()
    results = base.load_results()
    assert record["checked_at"] and set(record["files"]) == {r["_file"] for r in results}
    text = (base.HERE / "RESULTS.md").read_text()
    assert "## Which runs are stale" in text and f"Checked at commit {record['checked_at']}" in text
    for name, entry in record["files"].items():
        since = entry["stale_since"]
        if isinstance(since, dict):
            assert f"| `{name}` | {entry['measured_at']} | **{since['commit']}** ({since['date']}) |" in text


@pytest.mark.skipif(not _is_git_checkout(), reason="needs the repository's full git history")
def test_the_record_is_what_git_says_at_the_commit_it_was_checked_at():
    record = staleness.load()
    assert staleness.check(base.load_results(), upto=record["checked_at"]) == record
