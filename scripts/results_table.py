"""Print the markdown table of docs/results.md from the `results.json` files that examples/train_rec.py writes.

    python scripts/results_table.py docs/training_runs/*.json

Each file is one run; its name (without `.json`) is the row label. Nothing is typed in by hand: every figure comes
from the files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TYPES = ("attribute", "relation", "position", "ordinal")


def row(path: Path) -> str:
    run = json.loads(path.read_text())
    best, args = run["best"] or {"accuracy": float("nan"), "mean_iou": float("nan")}, run["args"]  # None: diverged
    per_type = " | ".join(f"{100 * best.get(f'accuracy_{t}', float('nan')):.1f}" for t in TYPES)
    elapsed = f"{run['elapsed_s'] / 60:.1f}" if "elapsed_s" in run else "n/a"
    return (f"| {path.stem} | {run['control']} | {args['num_epochs']} ({run.get('steps', 'n/a')}) | "
            f"{100 * best['accuracy']:.1f} | {best['mean_iou']:.3f} | {per_type} | {100 * run['chance']:.1f} | "
            f"{best.get('epoch')} | {elapsed} |")


def main(paths: list[str]) -> None:
    print("| run | control | epochs (steps) | best val Acc@0.5 % | mean IoU | " + " | ".join(TYPES)
          + " | chance % | best epoch | train_rec.py wall min |")
    print("| --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in TYPES) + " | ---: | ---: | ---: |")
    for path in sorted(paths):
        print(row(Path(path)))


if __name__ == "__main__":
    main(sys.argv[1:])
