"""`M2ISTConfig.base_towers`: which frozen towers (and dtype) an adapter was built on, saved in its config.

An adapter holds only the side network and the grounding head; to use it, the same towers must be loaded again. The
record is ``{"vision": ..., "text": ..., "dtype": ...}``: the towers' names as ``peft_m2ist.pretrained``'s
``load_vision_tower`` / ``load_text_tower`` take them (a Hub id, a local folder or an ``offline:*`` name; ``None``
where a tower has no name, e.g. one built from a config) and their dtype (``"float32"``, ``"bfloat16"``, ...,
or ``"int8"``: float32 towers whose weights are then quantized, `peft_m2ist.towers.quantization`).

It is an ordinary config field, so ``save_pretrained`` and ``push_to_hub`` carry it in ``adapter_config.json``.
``get_peft_model`` fills the entries left ``None`` from a ``VisionTextPair``'s towers (their ``name_or_path`` and
parameter dtype, or ``"int8"`` for towers whose weights `peft_m2ist.towers.quantization` quantized); values set by
hand win. Other containers (a ``CLIPModel``, ...) are not rebuilt from two tower names,
so nothing is filled for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..towers.pair import VisionTextPair
from ..towers.quantization import QUANTIZED_TOWER_DTYPES, tower_is_quantized

BASE_TOWER_KEYS = ("vision", "text", "dtype")
"""The keys of `M2ISTConfig.base_towers`."""


def check_base_towers(value: Any) -> dict[str, str | None] | None:
    """`value` as `M2ISTConfig.base_towers` stores it: ``None``, or a dict with every key of `BASE_TOWER_KEYS`
    (missing keys become ``None``). Raises ``ValueError`` naming what is wrong."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"`base_towers` must be None or a mapping with the keys {list(BASE_TOWER_KEYS)}, got "
                         f"{type(value).__name__}.")
    unknown = sorted(set(value) - set(BASE_TOWER_KEYS))
    if unknown:
        raise ValueError(f"`base_towers` has unknown keys {unknown}; it takes {list(BASE_TOWER_KEYS)}.")
    record = {key: value.get(key) for key in BASE_TOWER_KEYS}
    for key, entry in record.items():
        if entry is not None and (not isinstance(entry, str) or not entry.strip()):
            raise ValueError(f"`base_towers['{key}']` must be None or a non-empty string, got {entry!r}.")
    if record["dtype"] is not None:
        try:
            dtype_name(record["dtype"])
        except ValueError:
            raise ValueError(f"`base_towers['dtype']` must name a torch floating-point dtype (e.g. 'float32', "
                             f"'bfloat16') or one of {list(QUANTIZED_TOWER_DTYPES)}, got {record['dtype']!r}.") from None
    return record


def dtype_name(dtype: str | torch.dtype) -> str:
    """``"float32"`` for ``torch.float32`` or ``"float32"``; ``"int8"`` (`QUANTIZED_TOWER_DTYPES`: weight-only
    quantized towers) as it is; ``ValueError`` for anything else."""
    name = str(dtype).removeprefix("torch.")
    if isinstance(dtype, str) and name in QUANTIZED_TOWER_DTYPES:
        return name
    if not (isinstance(getattr(torch, name, None), torch.dtype) and getattr(torch, name).is_floating_point):
        raise ValueError(f"tower dtype {dtype!r} is not a torch floating-point dtype (e.g. 'float32', 'bfloat16') "
                         f"nor one of {list(QUANTIZED_TOWER_DTYPES)}")
    return name


def tower_name_or_path(tower: nn.Module) -> str | None:
    """The name a tower was loaded from (its config's ``_name_or_path``), or ``None`` for one built from a config."""
    name = getattr(getattr(tower, "config", None), "_name_or_path", None)
    return str(name) if name else None


def tower_dtype_name(tower: nn.Module) -> str | None:
    """``"float32"``, ``"bfloat16"``, ...: the dtype of the tower's floating-point parameters (``None`` if mixed);
    ``"int8"`` for a tower whose weights were quantized."""
    if tower_is_quantized(tower):
        return "int8"
    dtypes = {p.dtype for p in tower.parameters() if p.is_floating_point()}
    return str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None


def towers_of_pair(pair: VisionTextPair) -> dict[str, str | None]:
    """The record of a pair's towers as they are now (their names, and their dtype where both agree)."""
    vision_dtype, text_dtype = tower_dtype_name(pair.vision_model), tower_dtype_name(pair.text_model)
    return {"vision": tower_name_or_path(pair.vision_model), "text": tower_name_or_path(pair.text_model),
            "dtype": vision_dtype if vision_dtype == text_dtype else None}


def record_base_towers(model: nn.Module, config: Any) -> None:
    """Fill the entries of `config.base_towers` that are unset from `model`'s towers (a `VisionTextPair` only);
    leaves `config` as it is when nothing is known."""
    if not isinstance(model, VisionTextPair):
        return
    found = towers_of_pair(model)
    record = dict(config.base_towers or dict.fromkeys(BASE_TOWER_KEYS))
    for key in BASE_TOWER_KEYS:
        if record.get(key) is None:
            record[key] = found[key]
    if any(record.values()):
        config.base_towers = record
