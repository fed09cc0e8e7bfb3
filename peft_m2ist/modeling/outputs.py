"""`ReferringExpressionOutput`: what an M2IST model's forward returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class ReferringExpressionOutput(ModelOutput):
    """Output of an M2IST referring-expression model.

    Attributes:
        loss: weighted L1 + GIoU loss, when `labels` were given.
        pred_boxes: `(batch, 4)` predicted boxes, `cxcywh` normalised to [0, 1] of the (padded) input image.
        loss_l1: the L1 part (summed over coordinates, averaged over the batch), when `labels` were given.
        loss_giou: the (1 - GIoU) part, averaged over the batch, when `labels` were given.
        vision_last_hidden_state: the vision tower's final tokens, only with adapters disabled.
        text_last_hidden_state: the text tower's final tokens, only with adapters disabled.
    """

    loss: torch.Tensor | None = None
    pred_boxes: torch.Tensor | None = None
    loss_l1: torch.Tensor | None = None
    loss_giou: torch.Tensor | None = None
    vision_last_hidden_state: torch.Tensor | None = None
    text_last_hidden_state: torch.Tensor | None = None
