"""The section "Many adapters, one tower pass": the `multi_adapter` result files of `benchmarks/multi_adapter.py`."""

from __future__ import annotations

from benchmarks.reporting.base import ENVIRONMENT, machine_line, ratio

PROSE = ENVIRONMENT.get_template("multi_adapter.md.j2").module


def _seconds(entry: dict, key: str) -> str:
    value = entry.get(key)
    return "n/a" if value is None else f"{value:.3f}"


def _both(entry: dict) -> str:
    """Wall-clock median (CPU-time median) of one task, in seconds."""
    return f"{_seconds(entry, 'median_s')} ({_seconds(entry, 'median_cpu_s')})"


def _ratios(entry: dict, base: dict) -> str:
    """`entry / base` on the wall-clock medians (on the CPU-time medians)."""
    def of(key: str) -> float | None:
        return entry[key] / base[key] if entry.get(key) and base.get(key) else None

    return f"{ratio(of('median_s'))} ({ratio(of('median_cpu_s'))})"


def multi_adapter_section(results: list[dict]) -> list[str]:
    """One table row per run (scale, rows, the medians and the ratios), then the runs' commands and machines."""
    runs = [r for r in results if r.get("kind") == "multi_adapter"]
    if not runs:
        return [PROSE.no_runs(), ""]
    lines = [PROSE.caption(runs[0]["goal_ratio"]), "",
             "| scale | rows (per adapter) | mixed s (CPU s) | whole batch x4 s (CPU s) | ratio (CPU time) | goal "
             "| own rows x4 s (CPU s) | mixed / own rows (CPU) | towers alone s (CPU s) | mixed / towers (CPU) "
             "| max diff |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        t, s = r["times"], r["settings"]
        rows = s["batch_size"]
        met = "**met**" if r["ratio"] <= r["goal_ratio"] else "not met"
        lines.append(
            f"| {r['scale']} ({r['scale_description']}) | {rows} ({rows // len(s['adapters'])}) | {_both(t['mixed'])} "
            f"| {_both(t['whole_batch_x4'])} | {ratio(r['ratio'])} ({ratio(r['ratio_cpu'])}) | <= {r['goal_ratio']} "
            f"{met} | {_both(t['own_rows_x4'])} | {_ratios(t['mixed'], t['own_rows_x4'])} | "
            f"{_both(t['towers_only'])} | {_ratios(t['mixed'], t['towers_only'])} | "
            f"{r['max_abs_diff_to_adapters_alone']:.1e} |")
    lines += ["", PROSE.columns(), ""]
    lines += [PROSE.run_line(r["_file"], r["command"], machine_line(r)) for r in runs]
    return [*lines, ""]
