"""The learning-curve section: val Acc@0.5 and training loss against step (`benchmarks/learning_curve.py`), its figure
`results/learning_curve.png`, and the table of the paper preset with one field changed at equal budget."""

from __future__ import annotations

from benchmarks.environment import RESULTS_DIR
from benchmarks.reporting.base import machine_line

FIGURE = RESULTS_DIR / "learning_curve.png"
FIELDS_FILE = "results/learning_curve_fields"  # files named so hold one-field-at-a-time runs: a table, not curves


def is_fields_file(result: dict) -> bool:
    return result["_file"].startswith(FIELDS_FILE)


def curve_results(results: list[dict]) -> list[dict]:
    """The `learning_curve` results drawn as curves (every file but the one-field search)."""
    return [r for r in results if r.get("kind") == "learning_curve" and not is_fields_file(r)]


def _label(spec: str, entry: dict) -> str:
    name = {"paper": 'preset="paper"', "default": "library default"}[entry["config"]]
    changes = ", ".join(f"{k}={v!r}" for k, v in entry.get("overrides", {}).items())
    return f"{name}{' + ' + changes if changes else ''}, {entry['recipe']} recipe"


def make_learning_curve_figure(results: list[dict]) -> str | None:
    """Two panels against the optimiser step: val Acc@0.5 (with the chance level) and the mean training loss
    between evaluations. Returns the figure's path relative to `benchmarks/`, or None without results."""
    runs = [(r, spec, e) for r in results if r.get("kind") == "learning_curve"
            for spec, e in r["runs"].items() if e["points"]]
    if not runs:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 5))
    styles = {"authors": "-", "benchmark": "--"}
    for i, (r, spec, e) in enumerate(runs):
        steps = [p["step"] for p in e["points"]]
        one_field = bool(e.get("overrides"))  # the one-field runs: thin lines
        kw = dict(linestyle=styles.get(e["recipe"], ":"), color=f"C{i % 10}", marker="o",
                  markersize=2 if one_field else 4, linewidth=0.8 if one_field else 2,
                  label=f"{_label(spec, e)} ({r['settings']['max_steps']:,}-step schedule)")
        acc_ax.plot(steps, [100 * p["val_accuracy"] for p in e["points"]], **kw)
        loss_ax.plot(steps, [p["train_loss"] for p in e["points"]], **kw)
    first = runs[0][0]
    chance = 100 * first["chance_val"]
    acc_ax.axhline(chance, color="grey", linestyle=":", linewidth=1)
    acc_ax.annotate("chance", (0, chance), xycoords=("axes fraction", "data"), fontsize=7, xytext=(4, 2),
                    textcoords="offset points", color="grey")
    acc_ax.set_ylim(0, 100)
    acc_ax.set_xlabel("optimiser step (batch 32)")
    acc_ax.set_ylabel(f"val Acc@0.5 (%), first {first['settings']['eval_samples']} rows")
    loss_ax.set_xlabel("optimiser step (batch 32)")
    loss_ax.set_ylabel("training loss (L1 + GIoU), mean since the previous point")
    loss_ax.legend(fontsize=6, loc="upper right")
    fig.suptitle("Learning curves on the built-in shapes benchmark (cached tower features)", fontsize=10)
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=110)
    plt.close(fig)
    return FIGURE.relative_to(RESULTS_DIR.parent).as_posix()


def _run_row(spec: str, e: dict, stop_at: float) -> str:
    best = max(e["points"], key=lambda p: p["val_accuracy"])
    last = e["points"][-1]
    reached = f"{stop_at:.0%} at step {e['reached_stop_at']}" if e.get("reached_stop_at") else "no"
    return (f"| `{spec}` | {e['steps_run']:,} | {100 * best['val_accuracy']:.1f} (step {best['step']:,}) | "
            f"{100 * last['val_accuracy']:.1f} | {last['val_mean_iou']:.3f} | {e['points'][0]['train_loss']:.3f} | "
            f"{last['train_loss']:.3f} | {e['seconds_per_step']:.2f} | {reached} |")


HEADER = ["| run | steps | best val Acc@0.5 % (at) | last val Acc@0.5 % | last val mean IoU | train loss, first point | "
          "train loss, last point | s/step (shared cores) | reached the stop |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]


def learning_curve_section(results: list[dict], figure: str | None) -> list[str]:
    """Markdown lines: how the curves were run, the figure, one row per run, then the one-field search if any."""
    curves = curve_results(results)
    fields = [r for r in results if r.get("kind") == "learning_curve" and is_fields_file(r)]
    if not curves and not fields:
        return ["Not run yet: `python benchmarks/learning_curve.py`.", ""]
    lines = []
    for r in curves + fields:
        s = r["settings"]
        earlier = "".join(f"`{c}`, then " for c in r.get("earlier_commands", []))
        lines.append(f"- `{r['_file']}` ({machine_line(r)}): {earlier}`{r['command']}`; up to {s['max_steps']:,} steps, "
                     f"evaluated every {s['eval_every']} steps on the first {s['eval_samples']} val rows (chance "
                     f"{100 * r['chance_val']:.1f}%), "
                     + (f"stop at {s['stop_at']:.0%}." if s["stop_at"] <= 1 else "no early stop."))
    recipes = (curves + fields)[0]["recipes"]
    lines += ["", "Recipes: " + "; ".join(
        f"`{name}`: AdamW, lr {v['lr_head']:g} (projections, head) / {v['lr_adapter']:g} (experts), weight decay "
        f"{v['weight_decay']:g}, {'clipping at ' + format(v['max_grad_norm'], 'g') if v['max_grad_norm'] else 'no clipping'}"
        f", {v['schedule']}" for name, v in recipes.items()) + ". Batch 32, head 2 layers x FFN 512, unaugmented, "
        "the towers' outputs computed once and cached (a step is the side network and the head).", ""]
    if figure:
        lines += [f"![learning curves]({figure})", ""]
    for group, title in ((curves, "Curves"), (fields, "The paper preset with one field changed, at equal budget")):
        if not group:
            continue
        lines += [f"{title}:", "", *HEADER]
        for r in group:
            lines += [_run_row(spec, e, r["settings"]["stop_at"]) for spec, e in r["runs"].items() if e["points"]]
        lines.append("")
    return lines
