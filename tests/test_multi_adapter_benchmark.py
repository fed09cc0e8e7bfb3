"""`benchmarks/multi_adapter.py` on the tiny scale (no timing is judged here) and its RESULTS.md section."""

from __future__ import annotations

import json

from benchmarks import multi_adapter
from benchmarks.reporting.multi_adapter import multi_adapter_section


def test_multi_adapter_benchmark_writes_its_ratios_and_the_report_shows_them(tmp_path):
    out = tmp_path / "multi_adapter_tiny.json"
    args = multi_adapter.parse_args(["--scale", "tiny", "--batch-size", "4", "--repeats", "1", "--warmup", "0",
                                     "--head-layers", "1", "--head-ffn-dim", "64", "--output", str(out)])
    multi_adapter.run(args, log=lambda *_: None)
    result = {**json.loads(out.read_text()), "_file": "results/multi_adapter_tiny.json"}
    assert result["kind"] == "multi_adapter" and result["finished"]
    assert result["settings"]["row_adapters"] == ["a", "b", "c", "d"]
    assert set(result["settings"]["adapters"].values()) == {"m2ist_shared_sum", "m2ist_shared_gated",
                                                            "m2ist_cross_attention_sum", "m2ist_cross_attention_gated"}
    times = result["times"]
    assert result["ratio"] == times["mixed"]["median_s"] / times["whole_batch_x4"]["median_s"]
    assert result["ratio_cpu"] == times["mixed"]["median_cpu_s"] / times["whole_batch_x4"]["median_cpu_s"]
    assert result["max_abs_diff_to_adapters_alone"] < 1e-5  # each row is its adapter's own answer
    section = "\n".join(multi_adapter_section([result]))
    assert f"| {result['ratio']:.3f} ({result['ratio_cpu']:.3f}) |" in section
    assert "`results/multi_adapter_tiny.json`: `python " in section


def test_no_run_says_so():
    assert multi_adapter_section([{"kind": "memory_time"}])[0].startswith("No run of `benchmarks/multi_adapter.py`")
