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
