"""The box loss: L1 on `cxcywh` + (1 - generalized IoU), both on boxes normalised to [0, 1]."""

from __future__ import annotations

import math

import torch
from transformers.loss.loss_for_object_detection import center_to_corners_format, generalized_box_iou


def box_losses(pred_boxes: torch.Tensor, target_boxes: torch.Tensor) -> dict[str, torch.Tensor]:
    """L1 (summed over the 4 coordinates) and 1 - GIoU, each averaged over the batch.

    Args:
        pred_boxes: `(batch, 4)` predicted `cxcywh`, normalised to [0, 1].
        target_boxes: `(batch, 4)` ground-truth `cxcywh`, normalised to [0, 1], with w, h > 0.

    A prediction with a non-finite coordinate (a diverged model) makes both losses NaN, for the training loop to
    detect, instead of the `ValueError` `generalized_box_iou` raises for boxes that are no corner boxes.
    """
    l1 = (pred_boxes - target_boxes).abs().sum(dim=-1).mean()
    if not bool(torch.isfinite(pred_boxes).all()):
        return {"loss_l1": l1 * math.nan, "loss_giou": pred_boxes.sum() * math.nan}
    giou = torch.diag(generalized_box_iou(center_to_corners_format(pred_boxes), center_to_corners_format(target_boxes)))
    return {"loss_l1": l1, "loss_giou": (1.0 - giou).mean()}
