"""Per-split results in the paper's layout: `OUTPUT/results.json`'s `splits` and the table `OUTPUT/results.md`.

Papers report Acc@0.5 per split (RefCOCO val / testA / testB, ...) in percent with two decimals; the table has a
row per split with that, the mean IoU and the number of samples, and, for data with phrase types (the shapes
benchmark), Acc@0.5 per type. Real formats' phrase type `unknown` gets no column.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomic import write_json
from .output_dir import RESULTS_FILE, earlier_outputs

RESULTS_TABLE_FILE = "results.md"
"""The Markdown table of the per-split results, next to `results.json`."""

_TYPE_PREFIX = "accuracy_"
_HIDDEN_TYPES = {"unknown"}


def split_results(scores: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """`evaluate_splits`' scores as results.json's `splits`: per split `accuracy`, `mean_iou`, `num_samples` and
    `accuracy_<type>` for each phrase type other than `unknown`."""
    out = {}
    for split, values in scores.items():
        kept = {key: values[key] for key in ("accuracy", "mean_iou", "num_samples")}
        kept.update({key: value for key, value in values.items()
                     if key.startswith(_TYPE_PREFIX) and key[len(_TYPE_PREFIX):] not in _HIDDEN_TYPES})
        out[split] = kept
    return out


def results_table(splits: Mapping[str, Mapping[str, float]]) -> str:
    """One Markdown table, a row per split: Acc@0.5 (%) with two decimals, mean IoU, samples, Acc@0.5 per type."""
    types = sorted({key[len(_TYPE_PREFIX):] for values in splits.values() for key in values
                    if key.startswith(_TYPE_PREFIX) and key[len(_TYPE_PREFIX):] not in _HIDDEN_TYPES})
    header = ["split", "Acc@0.5 (%)", "mean IoU", "samples", *(f"{t} Acc@0.5 (%)" for t in types)]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for split, values in splits.items():
        cells = [split, f"{100 * values['accuracy']:.2f}", f"{values['mean_iou']:.4f}", str(values["num_samples"])]
        cells += [f"{100 * values[_TYPE_PREFIX + t]:.2f}" if _TYPE_PREFIX + t in values else "" for t in types]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_markdown(results: Mapping[str, Any], caption: str) -> str:
    """`caption`, the table of `results["splits"]`, and a line per split whose loader skipped records."""
    text = f"{caption}\n\n{results_table(results['splits'])}"
    skipped = {split: report for split, report in results.get("load_reports", {}).items() if report["num_skipped"]}
    if skipped:
        text += "\nSkipped records (--on_bad_record skip): " + "; ".join(
            f"{split}: {report['num_skipped']} {report['skipped']}" for split, report in skipped.items()) + "\n"
    return text


def write_results(output_dir: str | os.PathLike, results: Mapping[str, Any], caption: str) -> str:
    """Write `results` as `OUTPUT/results.json` and its table as `OUTPUT/results.md` (each replaced whole); returns
    the Markdown."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / RESULTS_FILE, results, default=str)
    text = results_markdown(results, caption)
    tmp = output_dir / f".{RESULTS_TABLE_FILE}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, output_dir / RESULTS_TABLE_FILE)
    return text


def check_eval_only_output_dir(output_dir: str | os.PathLike) -> None:
    """`ValueError` if `output_dir` holds a training run's outputs (besides `results.json`), which an evaluation's
    `results.json` and `results.md` would mix with."""
    used = [name for name in earlier_outputs(output_dir) if name != RESULTS_FILE]
    if used:
        raise ValueError(f"--output_dir {output_dir} holds a training run's {used}: --eval_only writes its "
                         "results.json and results.md there, so give it another --output_dir")


def model_card_info(data: str, splits: Mapping[str, Mapping[str, float]], argv: Sequence[str] | None = None) -> dict:
    """What the best adapter's model card says about its training (`peft_m2ist.model_card`): the data, the command
    that trained it (`accelerate launch` + this process's arguments), and Acc@0.5 / mean IoU per eval split."""
    command = "accelerate launch " + " ".join(shlex.quote(arg) for arg in (sys.argv if argv is None else argv))
    evaluation = {split: {key: values[key] for key in ("accuracy", "mean_iou", "num_samples")}
                  for split, values in splits.items()}
    return {"training_data": data, "training_command": command, "evaluation": evaluation}


PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "numpy", "pillow", "safetensors")
"""The packages whose versions a results.json records: the same command can score otherwise under other versions."""


def package_versions() -> dict[str, str | None]:
    """`{"python": ..., "torch": ..., ...}`: the versions this process runs with (`None` for one not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def report_results(accelerator: Any, args: argparse.Namespace, results: dict, caption: str) -> dict:
    """The main process writes OUTPUT/results.json (with the towers, the arguments and the package versions) and the
    table OUTPUT/results.md, and prints the table; returns what it wrote (`{}` on the other processes)."""
    if not accelerator.is_main_process:
        return {}
    results = {**results, "towers": {"vision": args.vision_model, "text": args.text_model},
               "args": {k: v for k, v in vars(args).items() if k != "config"}, "versions": package_versions()}
    accelerator.print(write_results(args.output_dir, results, caption))
    return results
