"""Pure-torch box IoU, shared by the REC metric and the benchmark's chance level.

This file sits beside ``rec_accuracy.py`` so that ``evaluate.load`` copies it with the metric
script (relative import) and the metric stays loadable offline by path.
"""

from __future__ import annotations

import torch


def _area(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) corner boxes -> (...) areas; inverted boxes have area 0."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _ratio(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """inter / union, with 0 where the union is empty (two empty boxes), never NaN."""
    safe = union.clamp(min=torch.finfo(union.dtype).tiny)
    return torch.where(union > 0, inter / safe, torch.zeros_like(inter))


def _check(boxes: torch.Tensor, name: str) -> None:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must be (N, 4) [x0, y0, x1, y1] boxes, got shape {tuple(boxes.shape)}")


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of corner boxes.

    Args:
        boxes1: (N, 4) ``[x0, y0, x1, y1]``.
        boxes2: (M, 4) ``[x0, y0, x1, y1]`` in the same units.

    Returns:
        (N, M) IoU in [0, 1]. Boxes with ``x1 <= x0`` or ``y1 <= y0`` are empty (area 0); an
        empty box has IoU 0 with everything, itself included.
    """
    _check(boxes1, "boxes1")
    _check(boxes2, "boxes2")
    top_left = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = _area(boxes1)[:, None] + _area(boxes2)[None, :] - inter
    return _ratio(inter, union)


def paired_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows: (N, 4) and (N, 4) corner boxes -> (N,), same rules as ``box_iou``."""
    _check(boxes1, "boxes1")
    _check(boxes2, "boxes2")
    if boxes1.shape != boxes2.shape:
        raise ValueError(f"need as many predictions as references: {tuple(boxes1.shape)} vs {tuple(boxes2.shape)}")
    wh = (torch.minimum(boxes1[:, 2:], boxes2[:, 2:]) - torch.maximum(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = _area(boxes1) + _area(boxes2) - inter
    return _ratio(inter, union)
