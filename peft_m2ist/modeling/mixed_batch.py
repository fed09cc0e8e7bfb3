"""Several adapters in one batch: the rows of each adapter gathered from the towers' features, run through that
adapter's side network and head as one sub-batch, and the boxes scattered back in row order.

The towers ran once for the whole batch, recording the union of the adapters' taps (`TowerFeatures`); this module
only splits their features by row. The tuner checks the names and runs the towers (`peft_m2ist.tuner.mixed_batch`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch

from ..towers.features import TowerFeatures
from ..towers.validation import validate_labels
from .grounding import ground
from .head import GroundingHead
from .outputs import ReferringExpressionOutput
from .settings import LossSettings
from .side_network import M2ISTSideNetwork

LOSS_FIELDS = ("loss", "loss_l1", "loss_giou")


class RowAdapter(NamedTuple):
    """What one adapter of a mixed batch runs on its rows: its config (the loss weights), side network and head."""

    config: LossSettings
    side: M2ISTSideNetwork
    head: GroundingHead


def row_groups(adapter_names: Sequence[str]) -> dict[str, list[int]]:
    """Adapter name -> the rows that use it, in the order each name first appears (`["b", "a", "b"]` ->
    `{"b": [0, 2], "a": [1]}`)."""
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(adapter_names):
        groups.setdefault(name, []).append(row)
    return groups


def select_rows(features: TowerFeatures, rows: torch.Tensor, taps: Iterable[str]) -> TowerFeatures:
    """The features of `rows` only (a `(k,)` long tensor of row indices), with the taps named in `taps`: every
    tensor `(batch, ...)` -> `(k, ...)`."""
    def pick(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.index_select(0, rows.to(tensor.device))

    return TowerFeatures(
        vision=pick(features.vision),
        text=pick(features.text),
        text_mask=pick(features.text_mask),
        vision_mask=None if features.vision_mask is None else pick(features.vision_mask),
        taps={name: pick(features.taps[name]) for name in taps},
    )


def ground_mixed(
    adapters: Mapping[str, RowAdapter],
    adapter_names: Sequence[str],
    features: TowerFeatures,
    labels: torch.Tensor | None = None,
) -> ReferringExpressionOutput:
    """One box per row, each from the adapter `adapter_names[row]` names, and the loss when `labels` are given.

    Args:
        adapters: name -> `RowAdapter`, for every name in `adapter_names`.
        adapter_names: one adapter name per row of `features`.
        features: the towers' outputs for the whole batch, holding every tap that any of the adapters reads.
        labels: `(batch, 4)` target boxes, `cxcywh` normalised to [0, 1].

    Returns:
        `ReferringExpressionOutput` with `pred_boxes` `(batch, 4)`, `cxcywh` normalised to [0, 1], in row order. With
        `labels`, `loss`, `loss_l1` and `loss_giou` are each adapter's own (over its rows, with its own loss weights)
        averaged with weights `rows of the adapter / batch`: with equal loss weights, the loss of the whole batch.
    """
    batch = features.batch_size
    validate_labels(labels, batch)
    groups = row_groups(adapter_names)
    if len(groups) == 1:  # one adapter for every row: the batch as it is
        (name,) = groups
        return ground(*adapters[name], features, labels)
    pred_boxes: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = {}
    for name, row_list in groups.items():
        adapter = adapters[name]
        rows = torch.tensor(row_list, dtype=torch.long, device=features.vision.device)
        sub = select_rows(features, rows, adapter.side.tap_names())
        out = ground(*adapter, sub, None if labels is None else labels.index_select(0, rows.to(labels.device)))
        if pred_boxes is None:
            pred_boxes = out.pred_boxes.new_empty((batch, *out.pred_boxes.shape[1:]))
        pred_boxes.index_copy_(0, rows.to(pred_boxes.device), out.pred_boxes.to(pred_boxes.dtype))
        if labels is not None:
            share = len(row_list) / batch
            for key in LOSS_FIELDS:
                losses[key] = losses[key] + share * out[key] if key in losses else share * out[key]
    return ReferringExpressionOutput(pred_boxes=pred_boxes, **losses)
