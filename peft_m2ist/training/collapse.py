"""Training that says when it is stuck: the mean-box baseline and the per-epoch collapse checks.

A box regressor that has collapsed predicts (nearly) the same box for every input, the one that minimises its loss
on average: about the training set's mean box. Its loss is then the *mean-box loss*, the plateau such a model sits
on. `mean_box_baseline` computes it once, before training, from the training labels (`cxcywh`, normalised to
[0, 1]) with the adapter's own loss (`l1_weight` x L1 + `giou_weight` x (1 - GIoU), `peft_m2ist.modeling.loss`).

`CollapseMonitor` then watches the training batches and, after each epoch, warns by name when

- `loss_at_mean_box`: the epoch's mean training loss is still within `LOSS_MARGIN` (5%) of the mean-box loss, or
  above it; or
- `boxes_collapsed`: the predicted boxes barely vary across a batch: the spread of a batch (the standard deviation
  of each `cxcywh` coordinate across the batch, averaged over the 4 coordinates) is below `SPREAD_THRESHOLD`
  (0.01 of the image side) in the median batch of the epoch. The targets of real data spread about 20x more.

Both warnings start with "stuck:". Nothing here draws random numbers, so training numbers are unchanged.
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from ..modeling.loss import box_losses
from .feature_cache import CachedTowerFeatures

LOSS_MARGIN = 0.05
"""An epoch whose mean training loss is above `(1 - LOSS_MARGIN)` x the mean-box loss is stuck."""
SPREAD_THRESHOLD = 0.01
"""A median batch spread (mean over `cxcywh` of the std across the batch, image sides) below this is collapsed."""
RECORDS_SAMPLE = 10_000
"""Without a feature cache, the baseline reads the first this many training records (their boxes and image sizes)."""
CHUNK = 1024
"""Records per chunk of the baseline's loss (`generalized_box_iou` builds a chunk x chunk matrix)."""


def mean_box_baseline(labels: torch.Tensor | np.ndarray, l1_weight: float = 1.0,
                      giou_weight: float = 1.0) -> dict[str, Any]:
    """The loss of always predicting the mean of `labels` `(num_records, 4)` (`cxcywh`, normalised to [0, 1]).

    Returns `{"box": [cx, cy, w, h], "loss": ..., "loss_l1": ..., "loss_giou": ..., "num_records": n}`, the losses
    averaged over the records as the model's loss averages them over a batch. Draws no random numbers.
    """
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.float64).reshape(-1, 4)
    if len(labels) == 0:
        raise ValueError("mean_box_baseline needs at least one training label")
    mean = labels.mean(dim=0)
    l1 = giou = 0.0
    for chunk in labels.split(CHUNK):
        parts = box_losses(mean.expand_as(chunk), chunk)
        l1 += float(parts["loss_l1"]) * len(chunk)
        giou += float(parts["loss_giou"]) * len(chunk)
    l1, giou = l1 / len(labels), giou / len(labels)
    return {"box": [round(float(v), 6) for v in mean], "loss": l1_weight * l1 + giou_weight * giou,
            "loss_l1": l1, "loss_giou": giou, "num_records": len(labels)}


def canvas_labels(records: Iterable[Mapping[str, Any]]) -> np.ndarray:
    """`(num_records, 4)` `cxcywh` labels of records (`bbox` `[x0, y0, x1, y1]` pixels, `image` a PIL image or its
    `(width, height)`) placed on the canvas without augmentation (long side to the canvas side, top-left corner, as
    `peft_m2ist.data.transforms.resize_and_pad`): `bbox / max(width, height)`, whatever the canvas side."""
    rows = []
    for record in records:
        image = record["image"]
        width, height = image if isinstance(image, tuple) else image.size
        x0, y0, x1, y1 = (float(v) / max(width, height) for v in record["bbox"])
        rows.append(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0))
    return np.clip(np.asarray(rows, dtype=np.float64).reshape(-1, 4), 0.0, 1.0)


def _image_size(image: Any) -> tuple[int, int]:
    """`(width, height)` of a PIL image or of an undecoded `datasets` image (`{"path", "bytes"}`: its header only)."""
    if isinstance(image, Mapping):
        source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
        with Image.open(source) as opened:
            return opened.size
    return image.size


def training_labels(dataset: Any, limit: int | None = RECORDS_SAMPLE) -> np.ndarray:
    """`(num_records, 4)` `cxcywh` training labels of `dataset`: all of a `CachedTowerFeatures`' stored labels, or
    the un-augmented canvas labels of the first `limit` records of a records dataset (`canvas_labels`; a
    `datasets.Dataset`'s images are not decoded: their sizes come from the file headers). Draws no random numbers."""
    if isinstance(dataset, CachedTowerFeatures):
        return np.asarray(dataset.arrays()["labels"], dtype=np.float64)
    if limit is not None and len(dataset) > limit:
        dataset = dataset.select(range(limit)) if hasattr(dataset, "select") else [dataset[i] for i in range(limit)]
    if isinstance(getattr(dataset, "features", {}).get("image"), datasets.Image):
        dataset = dataset.select_columns(["image", "bbox"]).cast_column("image", datasets.Image(decode=False))
    return canvas_labels({"bbox": record["bbox"], "image": _image_size(record["image"])} for record in dataset)


def batch_spread(pred_boxes: torch.Tensor) -> float:
    """How much `pred_boxes` `(batch, 4)` (`cxcywh`, [0, 1]) vary across the batch: the std of each coordinate
    across the batch, averaged over the 4 coordinates (0 for a batch of one)."""
    boxes = pred_boxes.detach().float()
    if len(boxes) < 2:
        return 0.0
    return float(boxes.std(dim=0).mean())


@dataclass
class CollapseMonitor:
    """Collects each training batch's loss and prediction spread; `end_epoch` checks the epoch and starts afresh.

    `baseline` is `mean_box_baseline`'s result. `epochs` holds one entry per checked epoch: `epoch`, `train_loss`
    (mean over the epoch's batches), `mean_box_loss`, `median_batch_spread` and `warnings` (name -> message).
    """

    baseline: Mapping[str, Any]
    loss_margin: float = LOSS_MARGIN
    spread_threshold: float = SPREAD_THRESHOLD
    epochs: list[dict[str, Any]] = field(default_factory=list)
    _losses: list[float] = field(default_factory=list, repr=False)
    _spreads: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def for_training(cls, dataset: Any, config: Any) -> CollapseMonitor:
        """A monitor whose baseline is the mean-box loss of `dataset`'s labels (`training_labels`) with the loss
        weights of `config` (an `M2ISTConfig`)."""
        return cls(mean_box_baseline(training_labels(dataset), config.l1_weight, config.giou_weight))

    def baseline_message(self) -> str:
        """One line for the log: the mean box and its loss, the plateau a collapsed model sits on."""
        b = self.baseline
        return (f"mean-box loss {b['loss']:.4f} (L1 {b['loss_l1']:.4f}, 1 - GIoU {b['loss_giou']:.4f}): always "
                f"predicting the training set's mean box {b['box']} (cxcywh, {b['num_records']} records); a "
                "training loss that stays near it is a collapsed model")

    def update(self, loss: torch.Tensor | float, pred_boxes: torch.Tensor) -> None:
        """One training batch: its loss and its predicted boxes `(batch, 4)`. Non-finite losses are not counted."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if np.isfinite(value):
            self._losses.append(value)
        if len(pred_boxes) > 1:
            self._spreads.append(batch_spread(pred_boxes))

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Check the batches seen since the last call; returns (and keeps in `epochs`) the epoch's entry."""
        entry: dict[str, Any] = {"epoch": epoch, "train_loss": None, "mean_box_loss": self.baseline["loss"],
                                 "median_batch_spread": None, "warnings": {}}
        if self._losses:
            loss = entry["train_loss"] = statistics.fmean(self._losses)
            if loss > (1.0 - self.loss_margin) * self.baseline["loss"]:
                entry["warnings"]["loss_at_mean_box"] = (
                    f"stuck: epoch {epoch}'s mean training loss {loss:.4f} is within {100 * self.loss_margin:.0f}% "
                    f"of (or above) the mean-box loss {self.baseline['loss']:.4f}, the loss of always predicting "
                    "the training set's mean box: the model has learnt no more than that box yet")
        if self._spreads:
            spread = entry["median_batch_spread"] = statistics.median(self._spreads)
            if spread < self.spread_threshold:
                entry["warnings"]["boxes_collapsed"] = (
                    f"stuck: epoch {epoch}'s predicted boxes barely vary across a batch (median spread {spread:.4f} "
                    f"< {self.spread_threshold} of the image side): the model predicts about one box for every "
                    "input")
        self._losses, self._spreads = [], []
        self.epochs.append(entry)
        return entry
