"""Accuracy at equal budget: the accuracy runs grouped into comparisons (several seeds each), their tables, and the
accuracy goals of the M2IST variants (mean over the seeds that trained both methods compared)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass

from benchmarks.reporting.base import GOAL_METHOD, LABELS, PROSE, machine_line, mib, millions, ordered


def accuracy_groups(results: list[dict]) -> list[list[dict]]:
    """Accuracy runs grouped by scale and settings, the seed aside (one group = one comparison, several seeds)."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        if r.get("kind") == "accuracy":
            key = json.dumps([r["scale"], {k: v for k, v in r["settings"].items() if k != "seed"}], sort_keys=True)
            groups.setdefault(key, []).append(r)
    return list(groups.values())


def mean_accuracy(runs: list[dict], method: str, split: str) -> float | None:
    """Mean Acc@0.5 of `method` on `split` over the runs (seeds) that trained it."""
    values = [r["methods"][method]["scores"][split]["accuracy"] for r in runs if method in r["methods"]]
    return sum(values) / len(values) if values else None


def accuracy_section(results: list[dict]) -> list[str]:
    groups = accuracy_groups(results)
    if not groups:
        return [PROSE.accuracy_not_run(), ""]
    lines = []
    for runs in groups:
        first = runs[0]
        s = first["settings"]
        splits = list(first.get("chance", {}))
        seeds = [r["settings"]["seed"] for r in runs]
        lines += [PROSE.accuracy_heading(first["scale"], first.get("scale_description", "")), ""]
        for r in runs:
            partial = len(r["methods"]) != len(first["methods"])
            lines.append(PROSE.accuracy_seed(r["settings"]["seed"], machine_line(r), r["command"], r["_file"],
                                             len(r["methods"]) if partial else None))
        lines += [PROSE.accuracy_settings(s, s.get("head_layers", 6), s.get("head_ffn_dim", 2048), f"{s['lr_head']:g}",
                                          f"{s['lr_adapter']:g}", f"{s['lr_tower']:g}", f"{s['warmup_ratio']:g}"),
                  PROSE.chance_level([f"{k} {v:.3f}" for k, v in first.get("chance", {}).items()]), "",
                  "| method | seed | trainable | train memory MiB (exact, step 1) | train wall s (shared cores) | "
                  + " | ".join(f"Acc@0.5 {sp}" for sp in splits) + " |",
                  "| --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(splits)]
        for m in ordered({m: None for r in runs for m in r["methods"]}):
            for r in runs:
                if m not in r["methods"]:
                    continue
                e = r["methods"][m]
                lines.append(f"| {LABELS.get(m, m)} | {r['settings']['seed']} | {millions(e['params']['trainable'])}"
                             f" | {mib(e['account']['total'])} | {e['train_time_s']:.0f} | "
                             + " | ".join(f"{e['scores'][sp]['accuracy']:.3f}" for sp in splits) + " |")
        lines.append("")
        lines += _accuracy_by_phrase_type(runs, "test" if "test" in splits else splits[0])
        lines += _accuracy_goals(runs, splits, seeds)
    return lines


def _accuracy_by_phrase_type(runs: list[dict], split: str) -> list[str]:
    """Mean Acc@0.5 per phrase type (the benchmark's `phrase_type` column) on `split`, over the seeds."""
    methods = ordered({m: None for r in runs for m in r["methods"]})
    types = sorted({k[len("accuracy_"):] for r in runs for e in r["methods"].values()
                    for k in e["scores"].get(split, {}) if k.startswith("accuracy_")})
    if not types:
        return []
    lines = [PROSE.phrase_type_caption(split), "",
             "| method | " + " | ".join(types) + " |", "| --- |" + " ---: |" * len(types)]
    for m in methods:
        cells = []
        for t in types:
            values = [r["methods"][m]["scores"][split][f"accuracy_{t}"] for r in runs if m in r["methods"]]
            cells.append(f"{sum(values) / len(values):.3f}")
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


ACCURACY_GOALS = (("full", "within 2 points of full fine-tuning", lambda d: d >= -0.02),
                  ("lora", "above LoRA", lambda d: d > 0),
                  ("head_only", "above head only", lambda d: d > 0))


@dataclass
class SplitCheck:
    """One accuracy goal on one split: means over the seeds that trained both methods (fractions, not points)."""

    split: str
    mine: float  # GOAL_METHOD
    theirs: float  # the method compared with
    met: bool
    per_seed: list[float]  # GOAL_METHOD minus the other, seed by seed

    @property
    def diff(self) -> float:
        return self.mine - self.theirs


def _scores_by_seed(runs: list[dict]) -> dict[int, dict[str, dict]]:
    """Each seed's method entries, gathered from every run (file) of that seed: a method may be trained apart."""
    by_seed: dict[int, dict[str, dict]] = {}
    for r in runs:
        by_seed.setdefault(r["settings"]["seed"], {}).update(r["methods"])
    return by_seed


def accuracy_goal_checks(runs: list[dict], splits: list[str], method: str = GOAL_METHOD,
                         ) -> list[tuple[str, int, list[SplitCheck] | None]]:
    """Per accuracy goal of `method`: its label, the number of seeds that trained both methods (in one run or in two
    runs of that seed), and one `SplitCheck` per split (None when no seed trained both)."""
    by_seed = _scores_by_seed(runs)
    checks = []
    for other, label, holds in ACCURACY_GOALS:
        both = [{"methods": ms} for ms in by_seed.values() if method in ms and other in ms]
        if not both:
            checks.append((label, 0, None))
            continue
        cells = []
        for sp in splits:
            mine, theirs = mean_accuracy(both, method, sp), mean_accuracy(both, other, sp)
            per_seed = [mean_accuracy([r], method, sp) - mean_accuracy([r], other, sp) for r in both]
            cells.append(SplitCheck(sp, mine, theirs, bool(holds(mine - theirs)), per_seed))
        checks.append((label, len(both), cells))
    return checks


def per_seed(differences: list[float]) -> str:
    """` (per seed -0.8 / -5.1 / -0.4; standard error 1.5)`, in points, when there is more than one seed; else ''.

    The standard error is that of the mean paired difference (sample standard deviation / sqrt(seeds)): how far the
    mean may move with other seeds."""
    if len(differences) < 2:
        return ""
    error = statistics.stdev(differences) / math.sqrt(len(differences))
    return (" (per seed " + " / ".join(f"{100 * d:+.1f}" for d in differences)
            + f"; standard error {100 * error:.1f})")


def _accuracy_goals(runs: list[dict], splits: list[str], seeds: list[int]) -> list[str]:
    """The issue's accuracy goals for `GOAL_METHOD`, then the same comparisons for the other M2IST variants trained,
    each on the mean over the seeds that trained both methods compared."""
    lines = [PROSE.accuracy_goals_caption(sorted(set(seeds))), "",
             "| goal | " + " | ".join(splits) + " |", "| --- |" + " --- |" * len(splits)]
    trained = {m for r in runs for m in r["methods"]}
    for method in [GOAL_METHOD, *(m for m in ordered(trained) if m.startswith("m2ist_") and m != GOAL_METHOD)]:
        for label, n, cells in accuracy_goal_checks(runs, splits, method):
            if cells is None:
                lines.append(f"| {LABELS.get(method, method)} {label} |" + " not run |" * len(splits))
                continue
            lines.append(f"| {LABELS.get(method, method)} {label} ({n} seed{'s' if n > 1 else ''}) | "
                         + " | ".join(f"{100 * c.mine:.1f} vs {100 * c.theirs:.1f} ({100 * c.diff:+.1f}) "
                                      f"**{'met' if c.met else 'missed'}**" + per_seed(c.per_seed) for c in cells)
                         + " |")
    lines.append("")
    return lines


