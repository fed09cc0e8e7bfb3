"""Rewrite `benchmarks/RESULTS.md` and `benchmarks/results/memory_accuracy.png` from the JSON files in
`benchmarks/results/` (and the paper's reference numbers in `benchmarks/reference_paper.json`).

    python benchmarks/report.py
    python benchmarks/report.py --gpu-day DIR    # with the JSON of `benchmarks/gpu_day.py --output-dir DIR`

Every number in RESULTS.md comes from a JSON file written by a benchmark script; nothing is typed by hand. The words
around the numbers are in `benchmarks/templates/`: `RESULTS.md.j2` is the document's outline, `prose.md.j2` the
captions, paragraphs and footnotes inside its sections; `benchmarks/reporting/` computes what fills them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `benchmarks` and the library

from benchmarks.reporting.accuracy import accuracy_section
from benchmarks.reporting.base import ENVIRONMENT, GOAL_METHOD, HERE, load_results, millions
from benchmarks.reporting.figure import make_figure
from benchmarks.reporting.goals import goals_section, summary_section
from benchmarks.reporting.learning_curve import learning_curve_section, make_learning_curve_figure
from benchmarks.reporting.memory import memory_time_section
from benchmarks.reporting.multi_adapter import multi_adapter_section
from benchmarks.reporting.onnx import onnx_latency_section
from benchmarks.reporting.overview import overview_section
from benchmarks.reporting.staleness import refresh, staleness_section
from benchmarks.reporting.tower_dtypes import tower_dtype_section

RESULTS_MD = HERE / "RESULTS.md"


def reference_rows(reference: dict) -> list[str]:
    """The paper's own numbers (`reference_paper.json`), one table row per method."""
    full_gb = reference["methods"]["full"]["train_memory_gb"]
    return [f"| {e['label']} | {millions(e['tunable_params'])} | {e['train_memory_gb']} | "
            f"{e['train_memory_gb'] / full_gb:.3f} | {e['epoch_min']} | {e['refcoco_val']} |"
            for e in reference["methods"].values()]


def render(results: list[dict], figure: str | None) -> str:
    """The text of RESULTS.md: `templates/RESULTS.md.j2` filled with the sections computed from `results`."""
    reference = json.loads((HERE / "reference_paper.json").read_text())
    return ENVIRONMENT.get_template("RESULTS.md.j2").render(
        goal_method=GOAL_METHOD,
        overview="\n".join(overview_section(results)),
        summary="\n".join(summary_section(results)),
        goals="\n".join(goals_section(results)),
        reference_source=reference["source"],
        reference_rows=reference_rows(reference),
        memory_time=["\n".join(memory_time_section(r)) for r in results if r.get("kind") == "memory_time"],
        accuracy="\n".join(accuracy_section(results)),
        staleness="\n".join(staleness_section(results)),
        multi_adapter="\n".join(multi_adapter_section(results)),
        tower_dtypes="\n".join(tower_dtype_section(results)),
        onnx_latency="\n".join(onnx_latency_section(results)),
        figure=figure,
        learning_curve="\n".join(learning_curve_section(results, make_learning_curve_figure(results))),
    )


def gpu_day_results(results: list[dict], folder: Path) -> list[dict]:
    """`results` with the JSON files of a `benchmarks/gpu_day.py` folder (its `gpu_day.json` manifest aside) in
    place of the same-named files of `benchmarks/results/` (and added where none is): a result's `_file` is
    `results/<name>` wherever it was read from, as the report's sections look files up by that name."""
    if not folder.is_dir():
        return results
    by_file = {r["_file"]: r for r in results}
    for path in sorted(folder.glob("*.json")):
        if path.name != "gpu_day.json":
            by_file[f"results/{path.name}"] = {**json.loads(path.read_text()), "_file": f"results/{path.name}"}
    return [by_file[name] for name in sorted(by_file)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-day", type=Path, default=HERE / "results" / "gpu_day",
                        help="a benchmarks/gpu_day.py output folder (default: benchmarks/results/gpu_day, if any)")
    results = gpu_day_results(load_results(), parser.parse_args(argv).gpu_day)
    refresh(results)  # benchmarks/staleness.json at HEAD: which runs the code has moved past
    figure = make_figure(results)
    RESULTS_MD.write_text(render(results, figure))
    print(f"wrote {RESULTS_MD.relative_to(HERE.parent)}" + (f" and {figure}" if figure else ""))


if __name__ == "__main__":
    main()
