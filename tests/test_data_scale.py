"""benchmarks/data_scale.py on a tiny synthetic layout: the counts it writes, the index it measures, the JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import data_scale


def test_split_counts_follow_refcoco_and_sum_to_the_totals():
    counts = data_scale.split_counts(50000, 142210)
    assert counts == {name: (sents, refs) for name, (sents, refs) in data_scale.REFCOCO_SPLITS.items()}


@pytest.mark.slow
def test_a_tiny_run_writes_every_measure(tmp_path):
    out = tmp_path / "data_scale.json"
    result = data_scale.main(["--images", "20", "--refs", "40", "--sentences", "100", "--workers", "0",
                              "--batch-size", "4", "--throughput-batches", "1", "--output", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["dataset"]["images"] == 20 and result["dataset"]["refs"] == 40
    assert sum(result["index"]["records"].values()) == result["dataset"]["sentences"] >= 100
    assert result["index"]["seconds"] > 0 and result["index"]["peak_rss_mb"] > 0
    assert result["throughput"]["results"]["0"]["records"] == 6 * 4  # at least 6 batches per worker count
    assert result["gpu_need"]["records_per_s"] > 0
    assert set(result["goals"]) == {"index_under_60_s", "index_under_2_gb", "loader_keeps_up_with_gpu_step"}


@pytest.mark.slow
def test_compare_reference_times_both_loaders_interleaved(tmp_path):
    out = tmp_path / "data_scale.json"
    result = data_scale.main(["--images", "20", "--refs", "40", "--sentences", "100", "--workers", "0",
                              "--batch-size", "2", "--throughput-batches", "1", "--canvas", "128",
                              "--compare-reference", "--rounds", "2", "--output", str(out)])
    throughput = result["throughput"]
    current, reference = throughput["results"]["0"], throughput["reference"]["results"]["0"]
    assert [len(current["timings"]), len(reference["timings"])] == [2, 2]  # reference, current, current, reference
    assert current["records"] == reference["records"] == 2 * 6 * 2
    assert throughput["speedup"]["0"] == pytest.approx(current["records_per_s"] / reference["records_per_s"])
    assert "loader_2x_reference_per_worker" not in result["goals"]  # judged on 1 worker, not measured here
    assert all(len(t["load_average_1min"]) == 2 for t in current["timings"])
    assert result["machine"]["load_average_1min_at_start"] >= 0
