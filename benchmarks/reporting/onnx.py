"""The ONNX section of RESULTS.md: CPU latency of the export in onnxruntime against torch (`benchmarks/onnx_latency.py`),
in the words of `benchmarks/templates/onnx.md.j2`."""

from __future__ import annotations

from benchmarks.reporting.base import ENVIRONMENT, machine_line


def onnx_latency_section(results: list[dict]) -> list[str]:
    """The section's lines; a line saying how to make them when no `onnx_latency` run is there."""
    runs = [r for r in results if r.get("kind") == "onnx_latency"]
    if not runs:
        return ["No run yet: `python benchmarks/onnx_latency.py` writes `benchmarks/results/onnx_latency.json`."]
    filled = [{
        "file": r["_file"],
        "command": r["command"],
        "model": r["model"],
        "towers": " + ".join(f"`{t}`" for t in (r.get("towers") or {}).values() if t) or "its towers",
        "image_size": r["image_size"],
        "text_tokens": r["text_tokens"],
        "export_seconds": f"{r['export_seconds']:.0f}",
        "onnx_mib": f"{r['onnx_mib']:.1f}",
        "onnxruntime": r["packages"]["onnxruntime"],
        "machine": machine_line(r),
        "rows": r["rows"],
    } for r in runs]
    return ENVIRONMENT.get_template("onnx.md.j2").render(runs=filled).rstrip("\n").splitlines()
