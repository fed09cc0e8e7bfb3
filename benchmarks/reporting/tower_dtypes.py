"""RESULTS.md's "Frozen towers in int8" section: the towers' weight bytes and M2IST's exact training-memory account
with the towers in float32, bfloat16 and int8, from `benchmarks/tower_dtype_memory.py`'s JSON files."""

from __future__ import annotations

from benchmarks.reporting.base import ENVIRONMENT, machine_line, mib, ratio

PROSE = ENVIRONMENT.get_template("tower_dtypes.md.j2").module


def tower_dtype_section(results: list[dict]) -> list[str]:
    """The section's lines (none without a `tower_dtype_memory` result): per run, a table per dtype."""
    runs = [r for r in results if r.get("kind") == "tower_dtype_memory"]
    if not runs:
        return []
    lines = [PROSE.intro(), ""]
    for r in sorted(runs, key=lambda r: r["scale"] != "paper"):  # paper scale first
        s = r["settings"]
        measured, target = str(s["account_batches"][-1]), s["extrapolate_to"]
        lines += [PROSE.heading(r["scale"], r["scale_description"]), "",
                  f"- Machine: {machine_line(r)}",
                  f"- Command: `{r['command']}` -> `{r['_file']}`" + ("" if r.get("finished") else " (**unfinished**)"),
                  PROSE.settings(s), "",
                  f"| towers' dtype | vision MiB | text MiB | towers MiB | x float32 | quantized modules (vision; text) "
                  f"| weights MiB (step) | total MiB, batch {measured} | total MiB, batch {target} | x float32 |",
                  "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
        for dtype, e in r["dtypes"].items():
            towers, quantized = e["towers_weight_bytes"], e["quantized_modules"]
            counts = "; ".join(", ".join(f"{n} {kind}" for kind, n in quantized[t].items() if n) or "none"
                               for t in ("vision", "text"))
            extrapolated = e.get("account_extrapolated", {})
            lines.append(f"| {dtype} | {mib(towers['vision'])} | {mib(towers['text'])} | {mib(towers['total'])} | "
                         f"{ratio(e.get('towers_ratio_to_float32'))} | {counts} | "
                         f"{mib(e['account'][measured]['weights'])} | {mib(e['account'][measured]['total'])} | "
                         f"{mib(extrapolated.get('total'))} | {ratio(extrapolated.get('total_ratio_to_float32'))} |")
        lines.append("")
    return lines
