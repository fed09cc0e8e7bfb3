"""The report's figure: accuracy against training memory (or, before any accuracy run, training memory alone)."""

from __future__ import annotations

from benchmarks.environment import RESULTS_DIR
from benchmarks.reporting.accuracy import accuracy_groups, mean_accuracy
from benchmarks.reporting.base import HERE, LABELS, ordered

FIGURE = RESULTS_DIR / "memory_accuracy.png"


def make_figure(results: list[dict]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = accuracy_groups(results)
    if groups:
        runs = groups[0]
        r = runs[0]
        split = "test" if "test" in r.get("chance", {}) else next(iter(r["chance"]))
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in ordered({m: None for run in runs for m in run["methods"]}):
            # memory from the newest run: the account of the current implementation (accuracy is the seeds' mean)
            e = max((run for run in runs if m in run["methods"]), key=lambda run: run["machine"].get("date", ""))[
                "methods"][m]
            x, y = e["account"]["total"] / 2**20, 100 * mean_accuracy(runs, m, split)
            color = "C3" if m.startswith("m2ist") else "C0"
            seeds = [100 * run["methods"][m]["scores"][split]["accuracy"] for run in runs if m in run["methods"]]
            if len(seeds) > 1:  # the range over seeds
                ax.errorbar(x, y, yerr=[[y - min(seeds)], [max(seeds) - y]], fmt="none", ecolor=color, alpha=0.5,
                            capsize=3, linewidth=1)
            ax.scatter(x, y, s=20 + e["params"]["trainable"] / 2e5, alpha=0.7, color=color)
            ax.annotate(LABELS.get(m, m), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.axhline(100 * r["chance"][split], color="grey", linestyle=":", linewidth=1)
        ax.annotate("chance", (0, 100 * r["chance"][split]), xycoords=("axes fraction", "data"), fontsize=7,
                    xytext=(4, 2), textcoords="offset points", color="grey")
        ax.set_xscale("log")
        ax.margins(x=0.35)  # room for the labels of the outermost points
        ax.set_xlabel(f"training memory, MiB (exact account of the newest run, batch {r['settings']['batch_size']}, "
                      "log scale)")
        ax.set_ylabel(f"Acc@0.5 on {split} (%), mean over seeds (bars: range)")
        ax.set_title(f"Accuracy vs training memory ({r['scale']} scale; marker size ~ trainable params)",
                     fontsize=10)
    else:
        mt = [r for r in results if r.get("kind") == "memory_time" and all(
            "account" in e for e in r["methods"].values()) and not r["machine"].get("gpu")]
        if not mt:
            return None
        fig, axes = plt.subplots(1, len(mt), figsize=(5.5 * len(mt), 4.2), squeeze=False, sharey=True)
        for ax, r in zip(axes[0], mt):
            ms = ordered(r["methods"])
            ext = all("account_extrapolated" in r["methods"][m] for m in ms)
            key_b = r["settings"]["extrapolate_to"] if ext else r["settings"]["account_batches"][-1]
            vals = [(r["methods"][m]["account_extrapolated"] if ext else
                     r["methods"][m]["account"][str(key_b)])["total"] / 2**30 for m in ms]
            ax.barh([LABELS.get(m, m) for m in ms], vals, color=["C0" if m.startswith("m2ist") else "C7" for m in ms])
            for i, v in enumerate(vals):
                ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(f"GiB, exact account, batch {key_b}" + (" (extrap.)" if ext else ""))
            ax.set_title(f"{r['scale']} scale, {r['settings']['image_size']} px, head dropout "
                         f"{r['settings'].get('head_dropout', 0.1)}", fontsize=10)
        fig.suptitle("Training memory per method (accuracy not measured yet: axis pending benchmarks/accuracy.py)")
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=120)
    plt.close(fig)
    return FIGURE.relative_to(HERE).as_posix()
