"""The state-dict keys of an adapter's side network and head, and the all-or-nothing check of saved weights.

An adapter's tensors live on the tuner under `m2ist_side.<adapter>.<param>` and `m2ist_head.<adapter>.<param>`; a
saved adapter holds the same keys without the adapter name, so it loads under any name.
"""

from __future__ import annotations

import torch
from torch import nn

SIDE_KEY = "m2ist_side"
HEAD_KEY = "m2ist_head"


class AdapterWeightsError(ValueError):
    """The saved weights of an adapter do not match the side network and head its config builds."""


def adapter_name_position(key: str, adapter_name: str) -> int | None:
    """Where `adapter_name` sits in a key of its side network or head (`...m2ist_side.<adapter>.<param>`), as an
    index into `key.split(".")`; `None` for any other key."""
    parts = key.split(".")
    for i in range(len(parts) - 2):
        if parts[i] in (SIDE_KEY, HEAD_KEY) and parts[i + 1] == adapter_name:
            return i + 1
    return None


def remove_adapter_name(key: str, adapter_name: str) -> str:
    """`key` without `adapter_name` where it names the adapter's side network or head; any other key unchanged."""
    position = adapter_name_position(key, adapter_name)
    if position is None:
        return key
    parts = key.split(".")
    return ".".join(parts[:position] + parts[position + 1 :])


def remap_for_load(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint keys (no adapter name) -> the model's keys, built from the model's own side-network and head keys
    with `remove_adapter_name`, so that saving and loading are symmetric whatever the adapter's name (as peft's own
    remapping is); then `check_adapter_weights`."""
    checkpoint_to_model: dict[str, str] = {}
    peft_prefix = "base_model."
    for model_key in model.state_dict():
        if adapter_name_position(model_key, adapter_name) is None:
            continue
        checkpoint_key = remove_adapter_name(model_key, adapter_name)
        checkpoint_to_model[checkpoint_key] = model_key
        if not model_key.startswith(peft_prefix):  # the tuner itself, not wrapped in a PeftModel
            checkpoint_to_model[peft_prefix + checkpoint_key] = model_key
    remapped = {checkpoint_to_model.get(k, k): v for k, v in state_dict.items()}
    check_adapter_weights(model, adapter_name, remapped, checkpoint_to_model)
    return remapped


def _listed(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(item) for item in items[:limit])
    return f"[{shown}" + (f", ... and {len(items) - limit} more]" if len(items) > limit else "]")


def check_adapter_weights(model: nn.Module, adapter_name: str, remapped: dict[str, torch.Tensor],
                          checkpoint_to_model: dict[str, str]) -> None:
    """All or nothing: every tensor of the adapter's side network and head must be in `remapped`, with its shape, and
    nothing else; else `AdapterWeightsError`, raised before peft copies any weight into the model."""
    expected = {k: v.shape for k, v in model.state_dict().items() if adapter_name_position(k, adapter_name) is not None}
    model_to_checkpoint = {}
    for checkpoint_key, model_key in checkpoint_to_model.items():
        model_to_checkpoint.setdefault(model_key, checkpoint_key)
    missing = sorted(model_to_checkpoint.get(k, k) for k in expected if k not in remapped)
    unexpected = sorted(k for k in remapped if k not in expected)
    wrong_shape = [
        f"{model_to_checkpoint.get(k, k)}: {tuple(v.shape)} in the file, {tuple(expected[k])} in the model"
        for k, v in sorted(remapped.items()) if k in expected and tuple(v.shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or wrong_shape):
        return
    problems = []
    if missing:
        problems.append(f"missing keys {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listed(unexpected)}")
    if wrong_shape:
        problems.append(f"tensors of another shape [{'; '.join(wrong_shape[:8])}]")
    raise AdapterWeightsError(
        f"The saved weights do not match the side network and head of adapter '{adapter_name}' ("
        + ", ".join(problems) + "); nothing was loaded. The file is damaged or belongs to another adapter config."
    )
