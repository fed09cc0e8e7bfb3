"""Referring-expression evaluation across data-parallel processes: Acc@0.5, mean IoU and accuracy per phrase type,
of one split (`evaluate`) or of several (`evaluate_splits`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from peft_m2ist.metrics import load_rec_metric

DEGENERATE_SIZE = 1e-4
"""A predicted box (cxcywh, normalised) narrower or lower than this has no area: 1e-4 of a 640 px canvas is
0.06 px."""


def evaluate(model: Any, loader: Any, accelerator: Accelerator, desc: str = "eval") -> dict[str, float]:
    """Acc@0.5, mean IoU, per-phrase-type accuracy and the number of samples (`num_samples`) of `model` on a prepared
    `loader`, gathered across processes.

    Every process runs its share of `loader` (batches with `labels` and `phrase_type`); boxes and labels are
    gathered with `gather_for_metrics`, the phrase types as strings with `gather_for_metrics(...,
    use_gather_object=True)` (same order, same duplicates dropped), so each type stays with its own samples whatever
    order the processes see them in. Only the main process feeds and computes the metric, held in memory (no cache
    files); it returns the scores, the other processes `{}`. The scores include `non_finite`, the fraction of
    predictions with a non-finite coordinate (they count as misses), and `degenerate`, the fraction of finite
    predictions with no area (width or height under `DEGENERATE_SIZE`, what a diverged adapter's saturated boxes
    are); 1.0 for either: the adapter is broken, see `peft_m2ist.training.divergence.is_new_best`. The model is left
    in train mode.
    """
    model.eval()
    metric = load_rec_metric(keep_in_memory=True) if accelerator.is_main_process else None
    gathered_types: list[str] = []
    non_finite = degenerate = total = 0
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        types = [str(t) for t in batch.pop("phrase_type")]
        with torch.no_grad():
            boxes = model(**{k: v for k, v in batch.items() if k != "labels"}).pred_boxes
        boxes, labels = accelerator.gather_for_metrics((boxes, batch["labels"]))
        types = accelerator.gather_for_metrics(types, use_gather_object=True)
        if metric is not None:
            finite = torch.isfinite(boxes).all(dim=-1)
            non_finite += int((~finite).sum())
            degenerate += int((finite & (boxes[:, 2:].amin(dim=-1) < DEGENERATE_SIZE)).sum())
            total += len(boxes)
            metric.add_batch(predictions=boxes.float().cpu().tolist(), references=labels.float().cpu().tolist())
            gathered_types += types
    model.train()
    if metric is None:
        return {}
    return {**metric.compute(phrase_types=gathered_types), "num_samples": len(gathered_types),
            "non_finite": non_finite / max(total, 1), "degenerate": degenerate / max(total, 1)}


def evaluate_splits(model: Any, loaders: Mapping[str, Any], accelerator: Accelerator,
                    desc: str = "eval") -> dict[str, dict[str, float]]:
    """`evaluate` on each prepared loader of `loaders` (split name -> loader), in order: {split: scores} on the main
    process, `{}` on the others."""
    scores = {name: evaluate(model, loader, accelerator, desc=f"{desc} {name}") for name, loader in loaders.items()}
    return scores if accelerator.is_main_process else {}
