"""benchmarks/gpu_day.py: the GPU rows in one command, and its CPU dry run at tiny sizes (so a GPU only runs it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import gpu_day, report

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_skipped_without_cuda_is_run_by_the_script():
    skipped_without_cuda = re.compile(r"skipif\(\s*not torch\.cuda\.is_available\(\)")
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "tests").rglob("*.py")
               if skipped_without_cuda.search(path.read_text())}
    assert modules and modules <= set(gpu_day.CUDA_TESTS)


def test_the_rows_fit_nine_minutes_and_write_distinct_files():
    expected = gpu_day.TESTS_BUDGET_S + sum(row.budget_s + gpu_day.STARTUP_S for row in gpu_day.ROWS)
    assert expected <= gpu_day.TOTAL_BUDGET_S <= 9 * 60
    files = [row.file("cuda") for row in gpu_day.ROWS]
    assert len(set(files)) == len(files)
    assert files[:4] == ["gpu_paper_scale_cuda.json", "gpu_paper_scale_cuda_tf32.json", "gpu_paper_scale_cuda_bf16.json",
                         "gpu_paper_scale_cuda_tf32_channelslast.json"]  # gpu_paper_scale.py's own names
    assert "m2ist_paper" in next(row for row in gpu_day.ROWS if row.name == "preset").methods


def test_a_row_that_does_not_fit_what_is_left_is_skipped(tmp_path):
    manifest = gpu_day.main(["--dry-run", "--output-dir", str(tmp_path), "--total-budget", "1"], log=lambda _: None)
    assert list(manifest["steps"]) == ["cuda_tests", *(row.name for row in gpu_day.ROWS)]
    assert all(step["status"].startswith("skipped") for step in manifest["steps"].values())


@pytest.mark.slow
def test_the_dry_run_runs_every_step_and_the_report_reads_its_folder(tmp_path):
    manifest = gpu_day.main(["--dry-run", "--output-dir", str(tmp_path)], log=lambda _: None)
    assert manifest["dry_run"] and manifest["device"] == "cpu" and manifest["commit"]
    assert {name: step["status"] for name, step in manifest["steps"].items()} == dict.fromkeys(
        ["cuda_tests", *(row.name for row in gpu_day.ROWS)], 0)
    assert json.loads((tmp_path / gpu_day.MANIFEST).read_text()) == manifest
    assert manifest["steps"]["tf32"]["dropped_flags"] == ["--tf32"]  # CUDA-only
    for row in gpu_day.ROWS:
        result = json.loads((tmp_path / row.file("cpu")).read_text())
        assert result["scale"] == "tiny" and result["settings"]["bf16"] == ("--bf16" in row.flags)
        assert result["settings"]["channels_last"] == ("--channels-last" in row.flags)
        assert result["methods"] and all(m["params"]["trainable"] > 0 for m in result["methods"].values())
        assert "step_time" in next(iter(result["methods"].values()))
    # report.py reads the folder: its files join the report under their own names, and the page renders
    results = report.gpu_day_results(report.load_results(), tmp_path)
    names = [r["_file"] for r in results]
    assert "results/gpu_paper_scale_cpu_bf16.json" in names and "results/gpu_day.json" not in names
    assert len(names) == len(set(names)) == len(report.load_results()) + len(gpu_day.ROWS)
    assert "gpu_paper_scale_cpu_tf32_preset.json" in report.render(results, None)
