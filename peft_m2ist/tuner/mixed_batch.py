"""`forward(..., adapter_names=[...])`: several adapters in one batch, one name per row (peft's convention for LoRA's
mixed batches), with the frozen towers run once.

The towers record the union of the named adapters' taps; each row then goes through its own adapter's side network
and head (`peft_m2ist.modeling.mixed_batch.ground_mixed`). Eval mode only, as for LoRA: a training step on a mixed
batch is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..modeling.mixed_batch import RowAdapter, ground_mixed
from ..modeling.outputs import ReferringExpressionOutput
from ..towers.encoder import TowerEncoder
from ..towers.features import TowerFeatures
from ..towers.layouts import get_tower

if TYPE_CHECKING:
    from .model import M2ISTModel

SHARED_FIELDS = ("vision_tower", "text_tower", "image_size")
"""What the adapters of one mixed batch must share: the towers run once, on one batch of images."""


def check_adapter_names(tuner: M2ISTModel, adapter_names: object, batch: int | None = None, *,
                        predicting: bool = True) -> list[str]:
    """`adapter_names` as a list, after the checks: known names that share their towers and image size and, for a
    prediction (`predicting`), eval mode, adapters enabled and one name per row (`batch`, when known). A `ValueError`
    (a `TypeError` for a value that is no list of strings) says what is wrong and what is allowed."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not all(
            isinstance(name, str) for name in adapter_names):
        raise TypeError(f"`adapter_names` must be a list of adapter names, one per row of the batch; got "
                        f"{adapter_names!r}.")
    names = list(adapter_names)
    if predicting and tuner.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode: a mixed batch is for "
                         "predictions (call `model.eval()` first). To train an adapter, select it with "
                         "`set_adapter(name)`.")
    if predicting and tuner._m2ist_disabled:
        raise ValueError("`adapter_names` was given inside `disable_adapter()`: the towers run alone there, with no "
                         "adapter to choose.")
    unknown = sorted(set(names) - set(tuner.peft_config))
    if unknown:
        base = (" ('__base__', LoRA's row without adapter, has no box in M2IST: the towers alone do not ground a "
                "phrase)" if "__base__" in unknown else "")
        raise ValueError(f"Unknown adapter name(s) {unknown} in `adapter_names`{base}; loaded adapters: "
                         f"{sorted(tuner.peft_config)}.")
    if not names:
        raise ValueError("`adapter_names` is empty: name one adapter per row of the batch.")
    if predicting and batch is not None and len(names) != batch:
        raise ValueError(f"`adapter_names` must name one adapter per row: got {len(names)} name(s) for a batch of "
                         f"{batch} row(s).")
    first = tuner.peft_config[names[0]]
    for name in dict.fromkeys(names):
        config = tuner.peft_config[name]
        differ = [f"{field}={getattr(config, field)!r} (not {getattr(first, field)!r})" for field in SHARED_FIELDS
                  if getattr(config, field) != getattr(first, field)]
        if differ:
            raise ValueError(f"The adapters of one mixed batch must read the same towers at the same image size, as "
                             f"the towers run once for the whole batch; adapter {name!r} has {', '.join(differ)} "
                             f"where {names[0]!r} has the other.")
    return names


def union_tower_encoder(tuner: M2ISTModel, adapter_names: Sequence[str]) -> TowerEncoder:
    """The frozen towers as the named adapters read them together: the union of their taps records (unless adapters
    are disabled), texts up to the shortest `max_text_tokens` of them, the smallest `tower_micro_batch_size` set."""
    names = list(dict.fromkeys(adapter_names))
    configs = [tuner.peft_config[name] for name in names]
    sides = [tuner.m2ist_side[name] for name in names]
    micro = [config.tower_micro_batch_size for config in configs if config.tower_micro_batch_size]
    return TowerEncoder(
        get_tower(tuner.model, configs[0].vision_tower, "vision_tower"),
        get_tower(tuner.model, configs[0].text_tower, "text_tower"),
        tuner._m2ist_recorder,
        list(dict.fromkeys(tap for side in sides for tap in side.vision_taps.all())),
        list(dict.fromkeys(tap for side in sides for tap in side.text_taps.all())),
        image_size=configs[0].image_size, max_text_tokens=min(config.max_text_tokens for config in configs),
        tower_micro_batch_size=min(micro) if micro else None, record_taps=not tuner._m2ist_disabled,
    )


def _check_cached_taps(tuner: M2ISTModel, names: Sequence[str], features: TowerFeatures) -> None:
    """Cached `tower_features` must hold every tap each named adapter reads."""
    for name in dict.fromkeys(names):
        missing = [tap for tap in tuner.m2ist_side[name].tap_names() if tap not in features.taps]
        if missing:
            raise ValueError(
                f"`tower_features` lack taps that adapter {name!r} reads: {missing}. For a mixed batch, encode the "
                "towers with the union of the adapters' taps: `encode_towers(..., adapter_names=[...])` with the "
                "same names (or every adapter that will read them)."
            )


def mixed_batch_forward(
    tuner: M2ISTModel,
    adapter_names: Sequence[str],
    pixel_values: torch.Tensor | None,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    pixel_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    tower_features: TowerFeatures | dict[str, torch.Tensor] | None,
) -> ReferringExpressionOutput:
    """The towers once for the whole batch (or the cached `tower_features`), then each row through the side network
    and head of `adapter_names[row]`. Shapes and formats as `M2ISTModel.forward`."""
    if tower_features is not None:
        features = TowerFeatures.coerce(tower_features)
        names = check_adapter_names(tuner, adapter_names, features.batch_size)
        _check_cached_taps(tuner, names, features)
    else:
        rows = pixel_values.shape[0] if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() else None
        names = check_adapter_names(tuner, adapter_names, rows)
        features = union_tower_encoder(tuner, names).encode(pixel_values, input_ids, attention_mask, pixel_mask)
        check_adapter_names(tuner, names, features.batch_size)
    adapters = {}
    for name in dict.fromkeys(names):
        tuner._m2ist_awaiting_weights.discard(name)  # in use: a later failed load must not remove it
        adapters[name] = RowAdapter(tuner.peft_config[name], tuner.m2ist_side[name], tuner.m2ist_head[name])
    return ground_mixed(adapters, names, features, labels)
