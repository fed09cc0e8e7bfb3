"""The paper's goals, checked for each M2IST variant in every paper-scale result file, and the summary of them for
the paper's configuration (memory, parameters, time, latency; accuracy from `benchmarks.reporting.accuracy`)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from benchmarks.reporting.accuracy import accuracy_goal_checks, accuracy_groups, per_seed
from benchmarks.reporting.base import (
    GOAL_METHOD,
    HERE,
    LABELS,
    MICRO,
    NOT_JUDGED,
    PAPER_BATCH,
    PROSE,
    VARIANTS,
    has_baseline,
    implementation_notes,
    millions,
    ratio,
    where,
)
from benchmarks.reporting.memory import peak_findings

# adapter-only count: the paper's 3.19M (arXiv 2407.01131) less the two LoRA adapters that the authors' public code
# (github.com/xuyang-liu16/M2IST) builds and never calls (docs/fidelity.md)
PAPER_ADAPTER_PARAMS = 2.99e6


@dataclass
class GoalCheck:
    """One goal measured once: the value and verdict of each M2IST variant in one result file."""

    goal: str  # "training memory <= 25% of full FT"
    how: str  # "exact account, batch 64 extrapolated" ("" for the plain measurement)
    source: str  # the result file and its settings, for the full table
    where: str  # the machine and settings in a few words, for the summary
    cells: dict[str, tuple[str, bool] | None]  # variant -> (value as printed, met); None = not measured
    in_summary: bool = True  # False: a side measurement (off the goal's batch, or CPU time of a GPU run)
    judged: bool = True  # False: shown for reference, no verdict (M2IST with micro-batches vs unsplit baselines)

    @property
    def label(self) -> str:
        return f"{self.goal} ({self.how})" if self.how else self.goal


def _paper_runs(results: list[dict]) -> list[dict]:
    return [r for r in results if r.get("kind") == "memory_time" and r["scale"] == "paper"]


def paper_goal_checks(results: list[dict]) -> list[GoalCheck]:
    """Every paper-scale goal measurement in `results` (memory, parameters, step time, inference latency)."""
    checks: list[GoalCheck] = []
    paper = _paper_runs(results)
    for r in paper:
        ms = r["methods"]
        src = (f"`{r['_file']}` (head dropout {r['settings'].get('head_dropout', 0.1)}"
               + (", head checkpointing" if r["settings"].get("head_checkpointing") else "") + ")")
        b = str(r["settings"]["account_batches"][-1])
        place, gpu = where(r), bool(r["machine"].get("gpu"))

        def add(goal: str, how: str, values: list[float | None], holds, fmt=ratio, side: bool = False, src=src,
                place=place, judged: bool = True) -> None:
            cells = {v: None if x is None else (fmt(x), bool(holds(x))) for v, x in zip(VARIANTS, values)}
            checks.append(GoalCheck(goal, how, src, place, cells, in_summary=not side, judged=judged))

        for key, goal, limit in (("ratio_to_full", "training memory <= 25% of full FT", 0.25),
                                 ("ratio_to_lora", "training memory <= 50% of LoRA", 0.5)):
            if all("account_extrapolated" in ms.get(v, {}) for v in VARIANTS):
                add(goal, f"exact account, batch {r['settings']['extrapolate_to']} extrapolated",
                    [ms[v]["account_extrapolated"].get(key) for v in VARIANTS], lambda x, lim=limit: x <= lim)
            if all("account" in ms.get(v, {}) for v in VARIANTS):
                add(goal, f"exact account, batch {b} measured", [ms[v]["account"][b].get(key) for v in VARIANTS],
                    lambda x, lim=limit: x <= lim, side=int(b) != PAPER_BATCH)
            if all("cuda_peak" in ms.get(v, {}) for v in VARIANTS):
                add(goal, f"CUDA peak, batch {r['settings']['batch_size']}",
                    [ms[v]["cuda_peak"].get(key) for v in VARIANTS], lambda x, lim=limit: x <= lim)
            for entry, how in (("live_peak", "live-tensor peak"),
                               ("live_peak" + MICRO, "live-tensor peak, towers in micro-batches of {}")):
                peaks = [ms.get(v, {}).get(entry, {}) for v in VARIANTS]
                values = [p.get(key) if p.get("batch_size") == PAPER_BATCH else None for p in peaks]
                if any(x is not None for x in values):
                    size = next(p.get("tower_micro_batch_size") for p, x in zip(peaks, values) if x is not None)
                    # a baseline could split its batch too (gradient accumulation): M2IST's split is not judged
                    add(goal, f"{how.format(size)}, batch {PAPER_BATCH}", values,
                        lambda x, lim=limit: x <= lim, judged=entry == "live_peak")
        if r is paper[0]:
            add(f"adapter-only params within 5% of {PAPER_ADAPTER_PARAMS / 1e6:.2f}M", "",
                [ms[v]["params"].get("adapter_only") if v in ms else None for v in VARIANTS],
                lambda x: abs(x / PAPER_ADAPTER_PARAMS - 1) <= 0.05, millions)
        if all("step_time" in ms.get(v, {}) for v in VARIANTS):
            add("training-step time <= 50% of full FT", "",
                [ms[v]["step_time"].get("ratio_to_full") for v in VARIANTS], lambda x: x <= 0.5)
            if all(ms[v]["step_time"].get("cpu_ratio_to_full") is not None for v in VARIANTS):
                add("training-step time <= 50% of full FT", "process CPU time",
                    [ms[v]["step_time"]["cpu_ratio_to_full"] for v in VARIANTS], lambda x: x <= 0.5, side=gpu)
        if "inference" in r:
            add("inference latency <= 1.3x towers alone", "",
                [r["inference"].get(v, {}).get("ratio_to_towers") for v in VARIANTS], lambda x: x <= 1.3)
            values = [r["inference"].get(v, {}).get("cpu_ratio_to_towers") for v in VARIANTS]
            if all(x is not None for x in values):
                add("inference latency <= 1.3x towers alone", "process CPU time", values, lambda x: x <= 1.3,
                    side=gpu)
    return checks


def _cell(cell: tuple[str, bool] | None, judged: bool = True) -> str:
    if cell is None:
        return "n/a"
    return f"{cell[0]} {NOT_JUDGED}" if not judged else f"{cell[0]} **{'met' if cell[1] else 'missed'}**"


def goals_section(results: list[dict]) -> list[str]:
    checks = paper_goal_checks(results)
    if not checks:
        return [PROSE.no_paper_results(), ""]
    lines = ["| goal | source | " + " | ".join(LABELS[m] for m in VARIANTS) + " |",
             "| --- | --- |" + " --- |" * len(VARIANTS)]
    lines += [f"| {c.label} | {c.source} | " + " | ".join(_cell(c.cells[v], c.judged) for v in VARIANTS) + " |"
              for c in checks]
    paper = _paper_runs(results)
    notes = [PROSE.goals_note()]
    if any(r["settings"].get("head_checkpointing") for r in paper):
        notes.append(PROSE.head_checkpointing_note())
    if any("head FFN hidden stored" in implementation_notes(r) for r in paper):
        notes.append(PROSE.head_ffn_stored_note())
    if any("frozen BN" in note for r in paper for note in implementation_notes(r)):
        notes.append(PROSE.frozen_bn_note())
    lines += [""] + [line for note in notes for line in (note, "")] + peak_findings(paper)
    reference = json.loads((HERE / "reference_paper.json").read_text())["methods"]
    for r in paper:
        ms = r["methods"]
        if all("account_extrapolated" in ms.get(m, {}) for m in ("full", "adapter", GOAL_METHOD)):
            parts = [PROSE.against_paper_part(LABELS[m], f"{ms[m]['account_extrapolated']['total'] / 1e9:.2f}",
                                              reference[ref]["train_memory_gb"])
                     for m, ref in (("full", "full"), ("adapter", "adapter"), (GOAL_METHOD, "m2ist"))]
            lines += [PROSE.against_paper(r["settings"]["extrapolate_to"], r["_file"], parts), ""]
    return lines


def summary_section(results: list[dict]) -> list[str]:
    """One row per goal for `GOAL_METHOD`: every measurement of it (value, machine, how), then how many met."""
    lines = [PROSE.summary_intro(GOAL_METHOD, PAPER_BATCH, NOT_JUDGED), "",
             "| goal | measurements | met |", "| --- | --- | ---: |"]
    checks = paper_goal_checks(results)
    for goal in dict.fromkeys(c.goal for c in checks):
        found = [(c, c.cells[GOAL_METHOD]) for c in checks
                 if c.goal == goal and c.in_summary and c.cells.get(GOAL_METHOD)]
        parts = [f"{value} {(NOT_JUDGED if not c.judged else 'met' if met else '**missed**')} ({c.where}"
                 + (f"; {c.how}" if c.how else "") + ")" for c, (value, met) in found]
        judged = [met for c, (_, met) in found if c.judged]
        lines.append(f"| {goal} | " + "<br>".join(parts) + f" | {sum(judged)} of {len(judged)} |")
    for runs in filter(has_baseline, accuracy_groups(results)):
        splits = list(runs[0].get("chance", {}))
        for label, n, cells in accuracy_goal_checks(runs, splits):
            if cells is None:
                lines.append(f"| Acc@0.5 {label} ({runs[0]['scale']} scale) | not run | |")
                continue
            parts = [f"{c.split} {100 * c.diff:+.1f} points {'met' if c.met else '**missed**'}{per_seed(c.per_seed)}"
                     for c in cells]
            lines.append(f"| Acc@0.5 {label} ({runs[0]['scale']} scale, mean of {n} seed{'s' if n > 1 else ''}) | "
                         + "<br>".join(parts) + f" | {sum(c.met for c in cells)} of {len(cells)} |")
    return [*lines, ""]
