"""The referring-expression forward from the towers' features: side network -> grounding head -> box loss."""

from __future__ import annotations

import torch

from ..towers.features import TowerFeatures
from ..towers.validation import validate_labels
from .head import GroundingHead
from .loss import box_losses
from .outputs import ReferringExpressionOutput
from .settings import LossSettings
from .side_network import M2ISTSideNetwork

IGNORED_FORWARD_KWARGS = frozenset({"phrase_type", "num_items_in_batch"})
"""Keyword arguments the REC forward accepts and ignores: the collator's per-phrase metadata, and the token count
that transformers' `Trainer` passes to models whose forward takes `**kwargs`."""


def check_forward_kwargs(kwargs: dict[str, object]) -> None:
    """A `TypeError` for any extra keyword argument of the forward but `IGNORED_FORWARD_KWARGS` (a misspelt `labels`
    would otherwise give no loss)."""
    unknown = sorted(set(kwargs) - IGNORED_FORWARD_KWARGS)
    if unknown:
        raise TypeError(
            f"M2IST forward got unexpected keyword argument(s) {unknown}; it takes pixel_values, input_ids, "
            f"attention_mask, pixel_mask, labels, tower_features and adapter_names (and ignores "
            f"{sorted(IGNORED_FORWARD_KWARGS)})."
        )


def ground(
    config: LossSettings,
    side: M2ISTSideNetwork,
    head: GroundingHead,
    features: TowerFeatures,
    labels: torch.Tensor | None = None,
) -> ReferringExpressionOutput:
    """One box per sample from the frozen towers' `features`, and the loss when `labels` are given.

    Args:
        config: the adapter's config; the loss is `config.l1_weight * loss_l1 + config.giou_weight * loss_giou`.
        side: the adapter's side network, which turns the taps and final tokens into head-width tokens.
        head: the adapter's grounding head.
        features: the towers' outputs for the batch (`TowerFeatures`).
        labels: `(batch, 4)` target boxes, `cxcywh` normalised to [0, 1].

    Returns:
        `ReferringExpressionOutput` with `pred_boxes` `(batch, 4)`, `cxcywh` normalised to [0, 1] (and `loss`,
        `loss_l1`, `loss_giou` with `labels`).
    """
    validate_labels(labels, features.batch_size)
    vision_tokens, text_tokens = side(features.taps, features.vision, features.text, features.vision_mask,
                                      features.text_mask)
    pred_boxes = head(text_tokens, features.text_mask, vision_tokens, features.vision_mask)
    if labels is None:
        return ReferringExpressionOutput(pred_boxes=pred_boxes)
    parts = box_losses(pred_boxes.float(), labels.float())
    loss = config.l1_weight * parts["loss_l1"] + config.giou_weight * parts["loss_giou"]
    return ReferringExpressionOutput(loss=loss, pred_boxes=pred_boxes, **parts)


def towers_alone(features: TowerFeatures, labels: torch.Tensor | None = None) -> ReferringExpressionOutput:
    """The towers' own final tokens, with the side network and head switched off (`disable_adapter()`): no box, so
    `labels` are refused."""
    if labels is not None:
        raise ValueError(
            "`labels` were given inside `disable_adapter()`: the towers run alone there, with no grounding "
            "head, so there are no boxes to score. Call without `labels` to get the towers' own outputs."
        )
    return ReferringExpressionOutput(vision_last_hidden_state=features.vision, text_last_hidden_state=features.text)
