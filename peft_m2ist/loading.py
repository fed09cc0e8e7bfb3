"""One call from an adapter's name to a working model: the towers it records, built again, with the adapter on them.

    >>> from peft_m2ist.loading import load_adapter_with_towers
    >>> model, image_processor, tokenizer, towers = load_adapter_with_towers("me/m2ist-adapter")  # or a folder

Which towers: the ones passed (``vision_model``, ``text_model``, ``dtype``) win; the rest comes from the adapter's
record, ``M2ISTConfig.base_towers`` in its ``adapter_config.json`` (``peft_m2ist.tuner.tower_record``), or for an
adapter saved before that record existed, from the ``towers.json`` the training example wrote beside it. The default
towers are never guessed: an adapter that records no tower, with none given, is refused with a ``ValueError`` saying
which arguments to pass.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from peft import PeftModel

from .pretrained import load_text_tower, load_vision_tower
from .pretrained.towers_file import TOWERS_FILE, read_towers_file
from .towers.pair import VisionTextPair
from .towers.quantization import set_tower_dtype
from .tuner.config import M2ISTConfig
from .tuner.tower_record import BASE_TOWER_KEYS, dtype_name

ARGUMENTS = {"vision": "vision_model", "text": "text_model", "dtype": "dtype"}
"""Which argument of `load_adapter_with_towers` gives each entry of the record."""


class AdapterWithTowers(NamedTuple):
    """What `load_adapter_with_towers` returns.

    Attributes:
        model: the `PeftModelForReferringExpressionComprehension` (on the CPU; in eval mode unless trainable).
        image_processor: the vision tower's image processor.
        tokenizer: the text tower's tokenizer.
        towers: ``{"vision", "text", "dtype", "source"}``: the towers used and where they were read (see
            `resolve_towers`).
    """

    model: Any
    image_processor: Any
    tokenizer: Any
    towers: dict[str, str]


def check_adapter_location(adapter: str, hint: str = "pass the folder that save_pretrained wrote") -> None:
    """Raise ``ValueError`` for an adapter that reads as a local path but has no ``adapter_config.json`` there."""
    local = Path(adapter).expanduser()
    looks_local = local.exists() or adapter.startswith((".", "/", "~")) or adapter.count("/") > 1
    if looks_local and not (local / "adapter_config.json").is_file():
        raise ValueError(f"no adapter at {adapter!r} (no adapter_config.json there); {hint}")


def read_recorded_towers(adapter: str, **hub_kwargs: Any) -> tuple[dict[str, str], str]:
    """The towers ``adapter`` records (only the entries it knows) and where they were read.

    ``adapter_config.json``'s ``base_towers`` first; where it lacks an entry, the ``towers.json`` of older adapters.
    ``hub_kwargs`` (``revision``, ``token``, ``subfolder``, ...) go to the Hub client for a Hub id. Raises
    ``ValueError`` for an adapter whose config cannot be read or is not an M2IST config.
    """
    config = M2ISTConfig.from_pretrained(adapter, **hub_kwargs)
    if not isinstance(config, M2ISTConfig):
        raise ValueError(f"{adapter!r} is a {type(config).__name__} adapter, not an M2IST one")
    recorded = {key: value for key, value in (config.base_towers or {}).items() if value}
    source = "adapter_config.json (base_towers)" if recorded else ""
    if len(recorded) < len(BASE_TOWER_KEYS) and not hub_kwargs.get("subfolder"):
        found = read_towers_file(adapter)
        if found:
            legacy, path = found
            missing = {key: legacy[key] for key in BASE_TOWER_KEYS if key not in recorded and legacy.get(key)}
            recorded.update(missing)
            source = f"{source} and {path}" if source and missing else source or path
    return recorded, source


def resolve_towers(adapter: str | os.PathLike, vision_model: str | None = None, text_model: str | None = None,
                   dtype: str | torch.dtype | None = None, **hub_kwargs: Any) -> dict[str, str]:
    """``{"vision", "text", "dtype", "source"}``: the given values win, then what the adapter records
    (`read_recorded_towers`); a dtype recorded nowhere is ``"float32"``. ``source`` says where the record came from.

    Raises ``ValueError`` naming the arguments to pass when a tower is neither given nor recorded.
    """
    adapter = str(adapter)
    given = {key: value for key, value in (("vision", vision_model), ("text", text_model), ("dtype", dtype))
             if value is not None}
    recorded, source = ({}, "") if len(given) == len(BASE_TOWER_KEYS) else read_recorded_towers(adapter, **hub_kwargs)
    towers = {**recorded, **given}
    missing = [key for key in ("vision", "text") if key not in towers]
    if missing:
        needed = " and ".join(f"{ARGUMENTS[key]}=" for key in missing)
        raise ValueError(
            f"the adapter {adapter!r} does not record its {' and '.join(missing)} tower (no `base_towers` entry in "
            f"its adapter_config.json, no {TOWERS_FILE}): pass {needed} with the tower(s) it was trained on (a Hub "
            "id, a local folder or an offline:* name), and dtype= if they were not float32"
        )
    towers["dtype"] = dtype_name(towers.get("dtype", "float32"))
    towers["source"] = source or "given"
    return towers


def load_adapter_with_towers(adapter: str | os.PathLike, *, vision_model: str | None = None,
                             text_model: str | None = None, dtype: str | torch.dtype | None = None,
                             is_trainable: bool = False, **hub_kwargs: Any) -> AdapterWithTowers:
    """Build the towers ``adapter`` (a folder written by ``save_pretrained``, or a Hub id) records, in their
    recorded dtype, and load the adapter on them: the model, the image processor and the tokenizer. A recorded
    ``"int8"`` loads the towers in float32 and quantizes their weights again (`peft_m2ist.towers.quantization`).

    Args:
        adapter: the adapter folder or Hub id.
        vision_model, text_model: tower names (Hub ids, folders, ``offline:*``) to use instead of the recorded ones.
        dtype: the towers' dtype (``"float32"``, ``"bfloat16"``, ``torch.float16``, ``"int8"``, ...) instead of the
            recorded one.
        is_trainable: load the adapter for further training (else it is frozen, in eval mode).
        hub_kwargs: ``revision``, ``token``, ``subfolder``, ... for the Hub client.

    Raises:
        ValueError: a missing adapter folder, an adapter that records no towers when none are given, towers that
            cannot be loaded, or an adapter that does not fit them.
    """
    adapter = str(adapter)
    check_adapter_location(adapter)
    towers = resolve_towers(adapter, vision_model, text_model, dtype, **hub_kwargs)
    try:
        vision, image_processor = load_vision_tower(towers["vision"])
        text, tokenizer = load_text_tower(towers["text"])
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the towers {towers['vision']!r} + {towers['text']!r} for adapter "
                         f"{adapter!r}: {err}") from err
    pair = VisionTextPair(set_tower_dtype(vision, towers["dtype"]), set_tower_dtype(text, towers["dtype"]))
    try:
        model = PeftModel.from_pretrained(pair, adapter, is_trainable=is_trainable, **hub_kwargs)
    except ValueError as err:
        raise ValueError(f"{err}\nThe adapter {adapter!r} was tried on the towers {towers['vision']!r} + "
                         f"{towers['text']!r}; pass the towers it was trained on (vision_model=, text_model=, "
                         "dtype=).") from err
    # the record names the towers the adapter now runs on, so that saving it again keeps them
    model.peft_config[model.active_adapter].base_towers = {key: towers[key] for key in BASE_TOWER_KEYS}
    return AdapterWithTowers(model, image_processor, tokenizer, towers)
