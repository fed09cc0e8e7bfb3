"""Accuracy at equal budget: the accuracy runs grouped into comparisons (several seeds each), their tables, and the
accuracy goals of the M2IST variants (mean over the seeds that trained both methods compared)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass

from benchmarks.reporting.base import (
    GOAL_METHOD,
    LABELS,
    PROSE,
    has_baseline,
    machine_line,
    mib,
    millions,
    ordered,
)


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
    lines = tap_fix_section(results)
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
        if has_baseline(runs):
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




PRE_FIX_TEXT_FFN_TAP = "output"
"""The BERT-family FFN tap of runs made before it was fixed (their settings have no `text_ffn_tap`)."""


def _settings_but(run: dict, *names: str) -> dict:
    return {k: v for k, v in run["settings"].items() if k not in names}


def _splits_cell(entries: dict, method: str, splits: list[str]) -> str:
    if method not in entries:
        return "not run"
    return " / ".join(f"{100 * entries[method]['scores'][sp]['accuracy']:.1f}" for sp in splits)


def _paired(before: dict, after: dict, method_before: str, method_after: str, splits: list[str]) -> str | None:
    """`after` minus `before` per split, in points, over the seeds that ran both (mean, per seed, standard error)."""
    seeds = [seed for seed in sorted(after) if method_after in after[seed] and method_before in before.get(seed, {})]
    if not seeds:
        return None
    cells = []
    for sp in splits:
        diffs = [after[s][method_after]["scores"][sp]["accuracy"] - before[s][method_before]["scores"][sp]["accuracy"]
                 for s in seeds]
        cells.append(f"{sp} {100 * sum(diffs) / len(diffs):+.1f}{per_seed(diffs)}")
    return f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}): " + "; ".join(cells)


def tap_fix_section(results: list[dict]) -> list[str]:
    """The accuracy runs made with the fixed BERT-family FFN tap (`text_ffn_tap` in their settings) beside the runs
    made before the fix with otherwise the same settings, seed by seed: M2IST shared / sum with the old and the fixed
    tap, and the paper preset (`m2ist_paper`) with the fixed one."""
    groups = accuracy_groups(results)
    lines: list[str] = []
    for fixed in groups:
        if "text_ffn_tap" not in fixed[0]["settings"]:
            continue
        same = _settings_but(fixed[0], "seed", "text_ffn_tap")
        old = [r for g in groups for r in g if "text_ffn_tap" not in g[0]["settings"]
               and g[0]["scale"] == fixed[0]["scale"] and _settings_but(g[0], "seed") == same]
        old_by_seed, fixed_by_seed = _scores_by_seed(old), _scores_by_seed(fixed)
        splits = list(fixed[0].get("chance", {}))
        tap = fixed[0]["settings"]["text_ffn_tap"]
        lines += [PROSE.tap_fix_caption(fixed[0]["scale"], PRE_FIX_TEXT_FFN_TAP, tap, " / ".join(splits),
                                        sorted({r["_file"] for r in fixed}),
                                        sorted({r["_file"] for r in old if GOAL_METHOD in r["methods"]})), "",
                  f"| seed | {LABELS[GOAL_METHOD]}, tap `{PRE_FIX_TEXT_FFN_TAP}` | {LABELS[GOAL_METHOD]}, tap `{tap}` "
                  f"| {LABELS['m2ist_paper']}, tap `{tap}` |", "| ---: | ---: | ---: | ---: |"]
        for seed in sorted(fixed_by_seed):
            entries = fixed_by_seed[seed]
            lines.append(f"| {seed} | {_splits_cell(old_by_seed.get(seed, {}), GOAL_METHOD, splits)} | "
                         f"{_splits_cell(entries, GOAL_METHOD, splits)} | {_splits_cell(entries, 'm2ist_paper', splits)} |")
        lines.append("")
        for label, before, method_before, method_after in (
                (f"fixed tap minus old tap, {LABELS[GOAL_METHOD]}", old_by_seed, GOAL_METHOD, GOAL_METHOD),
                (f"{LABELS['m2ist_paper']} minus {LABELS[GOAL_METHOD]}, both with the fixed tap", fixed_by_seed,
                 GOAL_METHOD, "m2ist_paper")):
            paired = _paired(before, fixed_by_seed, method_before, method_after, splits)
            lines.append(f"- {label}, paired: {paired or 'no seed ran both'}")
        lines.append("")
    return lines
