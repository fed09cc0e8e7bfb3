"""The section "Many adapters, one tower pass": the `multi_adapter` result files of `benchmarks/multi_adapter.py`."""

from __future__ import annotations

from benchmarks.reporting.base import ENVIRONMENT, machine_line, ratio

PROSE = ENVIRONMENT.get_template("multi_adapter.md.j2").module


def _seconds(entry: dict, key: str) -> str:
    value = entry.get(key)
    return "n/a" if value is None else f"{value:.3f}"


def multi_adapter_section(results: list[dict]) -> list[str]:
    """One table row per run (scale, rows, the medians and the ratios), then the runs' commands and machines."""
    runs = [r for r in results if r.get("kind") == "multi_adapter"]
    if not runs:
        return [PROSE.no_runs(), ""]
    lines = [PROSE.caption(runs[0]["goal_ratio"]), "",
             "| scale | rows (per adapter) | mixed s (CPU s) | whole batch x4 s (CPU s) | ratio (CPU time) | goal "
             "| own rows x4 s | mixed / own rows | mixed / towers alone | max diff |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in runs:
        t, s = r["times"], r["settings"]
        rows = s["batch_size"]
        per = rows // len(s["adapters"])
        met = "**met**" if r["ratio"] <= r["goal_ratio"] else "not met"
        lines.append(
            f"| {r['scale']} ({r['scale_description']}) | {rows} ({per}) | {_seconds(t['mixed'], 'median_s')} "
            f"({_seconds(t['mixed'], 'median_cpu_s')}) | {_seconds(t['whole_batch_x4'], 'median_s')} "
            f"({_seconds(t['whole_batch_x4'], 'median_cpu_s')}) | {ratio(r['ratio'])} ({ratio(r['ratio_cpu'])}) | "
            f"<= {r['goal_ratio']} {met} | {_seconds(t['own_rows_x4'], 'median_s')} | "
            f"{ratio(r['ratio_to_own_rows'])} | {ratio(r['mixed_over_towers'])} | "
            f"{r['max_abs_diff_to_adapters_alone']:.1e} |")
    lines += ["", PROSE.columns(), ""]
    lines += [PROSE.run_line(r["_file"], r["command"], machine_line(r)) for r in runs]
    return [*lines, ""]
