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
    overrides = entry.get("overrides", {})
    if len(overrides) > 2:  # the whole list is in the tables; a legend names how many
        changes = f"{len(overrides)} fields of the default"
    else:
        changes = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    refused = " (a combination refused today)" if refused_today(spec) else ""
    return f"{name}{' + ' + changes if changes else ''}{refused}, {entry['recipe']} recipe"


def make_learning_curve_figure(results: list[dict]) -> str | None:
    """Two panels against the optimiser step: val Acc@0.5 (with the chance level) and the mean training loss
    between evaluations, for the curve files (the one-field files are tables). Returns the figure's path relative
    to `benchmarks/`, or None without results."""
    runs = [(r, spec, e) for r in curve_results(results) for spec, e in r["runs"].items() if e["points"]]
    if not runs:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 6))
    styles = {"authors": "-", "benchmark": "--"}
    several_seeds = len({r["settings"].get("seed") for r, _, _ in runs}) > 1  # then the legend names each run's
    for i, (r, spec, e) in enumerate(runs):
        steps = [p["step"] for p in e["points"]]
        one_field = bool(e.get("overrides"))  # the one-field runs: thin lines
        kw = dict(linestyle=styles.get(e["recipe"], ":"), color=f"C{i % 10}", marker="o",
                  markersize=2 if one_field else 4, linewidth=0.8 if one_field else 2,
                  label=f"{_label(spec, e)} ({r['settings']['max_steps']:,}-step schedule"
                        + (f", seed {r['settings'].get('seed')})" if several_seeds else ")"))
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
    fig.legend(*acc_ax.get_legend_handles_labels(), fontsize=7, loc="lower center", ncol=2)
    fig.suptitle("Learning curves on the built-in shapes benchmark (cached tower features)", fontsize=10)
    fig.tight_layout(rect=(0, 0.04 * (len(runs) + 1) / 2 + 0.02, 1, 1))
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=110)
    plt.close(fig)
    return FIGURE.relative_to(RESULTS_DIR.parent).as_posix()


def refused_today(spec: str) -> bool:
    """Whether today's `M2ISTConfig` refuses the config of run `spec` (`CONFIG[+FIELD=VALUE...]:RECIPE`): a
    combination measured before it was found degenerate (docs/fidelity.md)."""
    from benchmarks.learning_curve import parse_run
    from peft_m2ist import M2ISTConfig
    from peft_m2ist.tuner.config import PAPER_PRESET

    config, overrides, _ = parse_run(spec)
    base = PAPER_PRESET if config == "paper" else {}
    try:
        M2ISTConfig(**{**base, **overrides})
    except ValueError:
        return True
    return False


REFUSED = " (a combination refused today: see docs/fidelity.md)"


def _run_row(spec: str, e: dict, stop_at: float) -> str:
    best = max(e["points"], key=lambda p: p["val_accuracy"])
    last = e["points"][-1]
    reached = f"{stop_at:.0%} at step {e['reached_stop_at']}" if e.get("reached_stop_at") else "no"
    label = f"`{spec}`" + (REFUSED if refused_today(spec) else "")
    return (f"| {label} | {e['steps_run']:,} | {100 * best['val_accuracy']:.1f} (step {best['step']:,}) | "
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
    fields_title = "The paper preset (or the library default) with one field changed, at equal budget"
    for group, title in ((curves, "Curves"), (fields, fields_title)):
        if not group:
            continue
        lines += [f"{title}:", "", *HEADER]
        for r in group:
            lines += [_run_row(spec, e, r["settings"]["stop_at"]) for spec, e in r["runs"].items() if e["points"]]
        lines.append("")
    return lines + head_inputs_table(results)


HEAD_INPUT_COLUMNS = {  # `benchmarks/head_inputs.py`'s statistics, in the table's order
    "vision_rms": "vision tokens RMS", "text_rms": "text tokens RMS",
    "vision_image_share": "share of the vision tokens that varies with the image", "reg_rms": "[REG] RMS",
    "position_rms": "positions RMS", "first_layer_input_rms": "first layer's queries/keys RMS",
    "reg_attention_entropy": "[REG] attention entropy (1 = uniform)",
    "gradient_norm": "first step's gradient norm", "gradient_share_head": "the head's share of it",
}


def head_inputs_table(results: list[dict]) -> list[str]:
    """Markdown lines: what the head sees at initialisation, one row per run (`results/head_inputs.json`)."""
    lines = []
    for r in results:
        if r.get("kind") != "head_inputs":
            continue
        lines += [f"What the grounding head sees at initialisation (`{r['_file']}`, {machine_line(r)}: "
                  f"`{r['command']}`; the untrained model in eval mode on the first {r['settings']['rows']} "
                  "training rows; the statistics are defined in `benchmarks/head_inputs.py`):", "",
                  "| run | " + " | ".join(HEAD_INPUT_COLUMNS.values()) + " |",
                  "| --- |" + " ---: |" * len(HEAD_INPUT_COLUMNS)]
        for spec, stats in r["runs"].items():
            cells = [f"{stats[k]:,.0f}" if stats[k] >= 100 else f"{stats[k]:.3f}" for k in HEAD_INPUT_COLUMNS]
            lines.append(f"| `{spec}`{REFUSED if refused_today(spec) else ''} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines
