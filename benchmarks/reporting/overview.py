"""The one table RESULTS.md opens with: per method, what a user choosing a tuning method compares, each against full
fine-tuning, from the headline run of each kind (the details below show every run)."""

from __future__ import annotations

from benchmarks.reporting.accuracy import accuracy_groups, mean_accuracy
from benchmarks.reporting.base import LABELS, PROSE, gib, machine_line, millions, ordered

GPU_RUN = "results/gpu_paper_scale_cuda.json"
"""Paper scale on a GPU, float32, batch 64: the exact account, the CUDA peak, step time and inference latency."""
CPU_ACCOUNT_RUN = "results/memory_time_paper_cpu.json"
"""Paper scale on the CPU: the exact account, extrapolated from batches 1 and 2 to 64."""
CPU_TIMING_RUN = "results/memory_time_paper_cpu_timing_1thread.json"
"""Paper scale on the CPU, one torch thread: step time and inference latency at batch 2."""


def _by_file(results: list[dict]) -> dict[str, dict]:
    return {r["_file"]: r for r in results}


def _memory(entry: dict | None, key: str) -> str:
    """`8.25 GiB (0.259)`: a training-memory figure and its ratio to full fine-tuning."""
    if not entry or key not in entry:
        return "n/a"
    figure = entry[key]
    total = figure.get("total", figure.get("training_memory"))
    return f"{gib(total)} GiB ({figure['ratio_to_full']:.3f})" if "ratio_to_full" in figure else f"{gib(total)} GiB"


def _step(entry: dict | None) -> str:
    if not entry or "step_time" not in entry:
        return "n/a"
    step = entry["step_time"]
    return f"{step['median_s']:.3f} s ({step['ratio_to_full']:.3f})"


def _inference(run: dict | None, method: str) -> str:
    timing = (run or {}).get("inference", {}).get(method)
    return "n/a" if not timing else f"{timing['median_s'] * 1000:.0f} ms ({timing['ratio_to_towers']:.3f})"


def _accuracy(results: list[dict]) -> tuple[dict[str, str], str]:
    """Per method, mean val Acc@0.5 over the seeds of the default-scale comparison with the most seeds and its
    difference from full fine-tuning in points; and a caption naming the comparison. M2IST methods come from the
    runs with the fixed BERT-family FFN tap where there are any (the baselines do not tap the towers)."""
    groups = [g for g in accuracy_groups(results) if g[0]["scale"] == "default"]
    if not groups:
        return {}, "no accuracy run"
    runs = max(groups, key=lambda g: len({r["settings"]["seed"] for r in g}))
    fixed = [g for g in groups if "text_ffn_tap" in g[0]["settings"]]
    full = mean_accuracy(runs, "full", "val")
    cells = {}
    for method in {m for g in groups for r in g for m in r["methods"]}:
        source = runs
        if method.startswith("m2ist_") and any(method in r["methods"] for g in fixed for r in g):
            source = max((g for g in fixed if any(method in r["methods"] for r in g)),
                         key=lambda g: len({r["settings"]["seed"] for r in g if method in r["methods"]}))
        elif not any(method in r["methods"] for r in runs):
            continue
        mine = mean_accuracy(source, method, "val")
        seeds = len({r["settings"]["seed"] for r in source if method in r["methods"]})
        delta = "" if full is None or method == "full" else f", {100 * (mine - full):+.1f}"
        tap = ", fixed tap" if source is not runs else ""
        cells[method] = f"{100 * mine:.1f}{delta} ({seeds} seeds{tap})"
    return cells, runs[0]["scale_description"]


def overview_section(results: list[dict]) -> list[str]:
    """The table (GPU columns where a GPU run exists, the CPU's otherwise; every column says where it comes from)."""
    files = _by_file(results)
    gpu, account, timing = files.get(GPU_RUN), files.get(CPU_ACCOUNT_RUN), files.get(CPU_TIMING_RUN)
    accuracy, accuracy_scale = _accuracy(results)
    methods = ordered({m: None for r in (gpu, account, timing) if r for m in r["methods"]})
    lines = [PROSE.overview_caption(
        gpu_machine=machine_line(gpu) if gpu else None, gpu_file=GPU_RUN if gpu else None,
        cpu_machine=machine_line(account) if account else None, cpu_file=CPU_ACCOUNT_RUN if account else None,
        timing_machine=machine_line(timing) if timing else None, timing_file=CPU_TIMING_RUN if timing else None,
        accuracy_scale=accuracy_scale), ""]
    lines.append("| method | trainable (paper scale) | train memory, GPU exact account, batch 64 | train memory, GPU "
                 "CUDA peak, batch 64 | train memory, CPU exact account, batch 64 (extrapolated) | step time, GPU, "
                 "batch 64 | step time, CPU 1 thread, batch 2 | inference, GPU (x towers alone) | Acc@0.5 val, "
                 "default scale (points vs full) |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for method in methods:
        entry = {name: (run or {}).get("methods", {}).get(method) for name, run in
                 (("gpu", gpu), ("account", account), ("timing", timing))}
        params = next((e["params"]["trainable"] for e in entry.values() if e and "params" in e), None)
        gpu_account = entry["gpu"] and {"account": entry["gpu"].get("account", {}).get("64")}
        lines.append(
            f"| {LABELS.get(method, method)} | {millions(params)} | {_memory(gpu_account, 'account')} | "
            f"{_memory(entry['gpu'], 'cuda_peak')} | {_memory(entry['account'], 'account_extrapolated')} | "
            f"{_step(entry['gpu'])} | {_step(entry['timing'])} | {_inference(gpu, method)} | "
            f"{accuracy.get(method, 'n/a')} |"
        )
    lines += ["", PROSE.overview_footnote(), ""]
    return lines
