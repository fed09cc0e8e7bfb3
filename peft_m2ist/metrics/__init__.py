"""Evaluation for referring expression comprehension.

``load_rec_metric()`` loads the ``evaluate`` module in ``rec_accuracy/`` offline by path; its
IoU is the pure-torch ``box_iou`` / ``paired_box_iou`` (corner boxes ``[x0, y0, x1, y1]``).
"""

from __future__ import annotations

from pathlib import Path

from peft_m2ist.metrics.rec_accuracy.box_iou import box_iou, paired_box_iou

REC_METRIC_PATH = Path(__file__).parent / "rec_accuracy"
"""Folder of the ``evaluate`` metric script (``rec_accuracy.py``)."""

__all__ = ["REC_METRIC_PATH", "box_iou", "load_rec_metric", "paired_box_iou"]


def load_rec_metric(**kwargs):
    """The REC accuracy metric as an ``evaluate.EvaluationModule``, loaded from this package.

    ``kwargs`` go to ``evaluate.load`` (e.g. ``experiment_id``). Outputs ``accuracy``
    (Acc@0.5), ``mean_iou`` and, when ``phrase_types=`` is given to ``compute``,
    ``accuracy_<type>``.
    """
    import evaluate

    return evaluate.load(str(REC_METRIC_PATH), **kwargs)
