"""REC accuracy: Acc@0.5, mean IoU and accuracy per phrase type, as an ``evaluate`` metric.

Load it offline by path: ``evaluate.load("<...>/peft_m2ist/metrics/rec_accuracy")`` or with
``peft_m2ist.metrics.load_rec_metric()``.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import datasets
import evaluate
import torch
from transformers.image_transforms import center_to_corners_format

from .box_iou import paired_box_iou

_DESCRIPTION = """\
Referring expression comprehension accuracy. Every prediction and reference is one box in
`cxcywh` normalised to [0, 1] of the padded input canvas. The prediction is converted to corners
and clamped to [0, 1], the reference converted to corners; a prediction is correct when its IoU
with the reference is >= `iou_threshold` (0.5: Acc@0.5). Scored per expression.

References must be finite boxes inside the canvas with width and height > 0 (a `ValueError` says
which one is not: boxes in pixels, or in corner format, are caught this way). A prediction that
is not finite (a diverged model) counts as a miss with IoU 0, with a warning.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list` of 4 `float`): predicted boxes, `cxcywh` normalised to [0, 1].
    references (`list` of 4 `float`): ground-truth boxes, same format.
    phrase_types (`list` of `str`, optional): one type per expression (keyword of `compute`,
        not of `add_batch`); adds `accuracy_<type>` for every type present.
    iou_threshold (`float`, optional, default 0.5): IoU at or above which a prediction counts.
Returns:
    accuracy (`float`): share of predictions with IoU >= iou_threshold (Acc@0.5 by default).
    mean_iou (`float`): mean IoU.
    accuracy_<type> (`float`): accuracy over the expressions of that phrase type.
Examples:
    >>> metric = evaluate.load("peft_m2ist/metrics/rec_accuracy")
    >>> metric.compute(predictions=[[0.5, 0.5, 0.2, 0.2]], references=[[0.5, 0.5, 0.2, 0.2]])
    {'accuracy': 1.0, 'mean_iou': 1.0}
"""

_CITATION = """\
@article{liu2024m2ist,
  title={M2IST: Multi-Modal Interactive Side-Tuning for Efficient Referring Expression Comprehension},
  author={Liu, Xuyang and others},
  journal={arXiv preprint arXiv:2407.01131},
  year={2024}
}
"""


def rec_scores(
    predictions: torch.Tensor, references: torch.Tensor, iou_threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expression IoU and hit.

    Args:
        predictions: (N, 4) `cxcywh` in [0, 1]; converted to corners, then clamped to [0, 1].
        references: (N, 4) `cxcywh` in [0, 1]; converted to corners.
        iou_threshold: IoU at or above which an expression counts as found.

    Returns:
        ``(iou, hit)``: (N,) float IoU and (N,) bool ``iou >= iou_threshold``; a prediction with a non-finite
        coordinate gets IoU 0 (a miss).
    """
    predictions = predictions.to(torch.float64)
    predicted = center_to_corners_format(predictions).clamp(0.0, 1.0)
    reference = center_to_corners_format(references.to(torch.float64))
    iou = paired_box_iou(predicted, reference)
    iou = torch.where(torch.isfinite(predictions).all(dim=-1), iou, torch.zeros_like(iou))
    return iou, iou >= iou_threshold


_CANVAS_TOLERANCE = 1e-4  # float rounding of boxes normalised by the canvas side


def check_references(references: torch.Tensor) -> None:
    """Raise a `ValueError` naming the first reference that is not a finite `cxcywh` box inside [0, 1] with width and
    height > 0. `references`: (N, 4)."""
    corners = center_to_corners_format(references)
    bad = ~torch.isfinite(references).all(dim=-1)
    bad |= (references[:, 2:] <= 0).any(dim=-1)
    bad |= (corners < -_CANVAS_TOLERANCE).any(dim=-1) | (corners > 1 + _CANVAS_TOLERANCE).any(dim=-1)
    if bad.any():
        index = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"reference {index} is {references[index].tolist()}: references must be finite `cxcywh` boxes normalised "
            f"to [0, 1] of the canvas, inside it, with width and height > 0 ({int(bad.sum())} of {len(bad)} are not; "
            "boxes in pixels or in corner format fail here)."
        )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RecAccuracy(evaluate.Metric):
    """Acc@0.5 (per expression), mean IoU, and accuracy per phrase type."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64"), length=4),
                    "references": datasets.Sequence(datasets.Value("float64"), length=4),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2407.01131"],
        )

    def _compute(self, predictions, references, phrase_types=None, iou_threshold: float = 0.5) -> dict:
        if len(predictions) == 0:
            raise ValueError("rec_accuracy needs at least one prediction")
        if (isinstance(iou_threshold, bool) or not isinstance(iou_threshold, (int, float))
                or not 0 < iou_threshold <= 1):
            raise ValueError(f"`iou_threshold` must be a number in (0, 1] (0.5 for Acc@0.5), got {iou_threshold!r}.")
        predicted = torch.as_tensor(predictions, dtype=torch.float64).reshape(-1, 4)
        reference = torch.as_tensor(references, dtype=torch.float64).reshape(-1, 4)
        check_references(reference)
        not_finite = int((~torch.isfinite(predicted).all(dim=-1)).sum())
        if not_finite:
            warnings.warn(f"{not_finite} of {len(predicted)} predictions are not finite; they count as misses "
                          "with IoU 0.", stacklevel=2)
        iou, hit = rec_scores(predicted, reference, iou_threshold)
        result = {"accuracy": float(hit.double().mean()), "mean_iou": float(iou.mean())}
        if phrase_types is not None:
            if len(phrase_types) != len(predictions):
                raise ValueError(f"got {len(phrase_types)} phrase_types for {len(predictions)} predictions")
            by_type: dict[str, list[int]] = defaultdict(list)
            for index, phrase_type in enumerate(phrase_types):
                by_type[str(phrase_type)].append(index)
            for phrase_type in sorted(by_type):
                result[f"accuracy_{phrase_type}"] = float(hit[by_type[phrase_type]].double().mean())
        return result
