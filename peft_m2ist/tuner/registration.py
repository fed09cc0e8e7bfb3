"""The M2IST peft type and the referring-expression task type, registered with peft at import.

peft 0.21 keeps `PeftType` and `TaskType` as closed enums and has no plugin discovery, so this module adds one member
to each and fills peft's mappings. `import peft_m2ist` must therefore happen before `PeftModel.from_pretrained` or
`PeftConfig.from_pretrained` reads an M2IST adapter.
"""

from __future__ import annotations

import enum
import functools
import json

from peft.utils.peft_types import PeftType, TaskType

PEFT_TYPE_NAME = "M2IST"
TASK_TYPE_NAME = "REFERRING_EXPRESSION_COMPREHENSION"


def _add_enum_member(enum_cls: type[enum.Enum], name: str) -> enum.Enum:
    """Add the str member `name` (value == name) to a closed str Enum, once."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)
    return member


M2IST_PEFT_TYPE = _add_enum_member(PeftType, PEFT_TYPE_NAME)
REC_TASK_TYPE = _add_enum_member(TaskType, TASK_TYPE_NAME)


def _wrap_config_file_errors() -> None:
    """peft reads `adapter_config.json` with a bare `json.load` (`PeftConfigMixin.from_json_file`, also from
    `PeftModel.from_pretrained` before any M2IST code runs), so a damaged file raises a `JSONDecodeError` without its
    path. Wrap it once: a file that is not JSON, not UTF-8 or not a JSON object raises a `ValueError` naming the file.
    Every other behaviour (and every readable file) is unchanged."""
    from peft.config import PeftConfigMixin

    original = PeftConfigMixin.__dict__["from_json_file"].__func__
    if getattr(original, "_m2ist_wrapped", False):
        return

    @functools.wraps(original)
    def from_json_file(cls, path_json_file, **kwargs):
        try:
            with open(path_json_file, encoding="utf-8") as file:
                content = json.load(file)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"The adapter config file {path_json_file} is not valid JSON ({err}); it is damaged "
                             "or not an adapter config: save the adapter again.") from err
        if not isinstance(content, dict):
            raise ValueError(f"The adapter config file {path_json_file} must hold a JSON object, got "
                             f"{type(content).__name__}; it is damaged or not an adapter config.")
        return original(cls, path_json_file, **kwargs)

    from_json_file._m2ist_wrapped = True
    PeftConfigMixin.from_json_file = classmethod(from_json_file)


def register() -> None:
    """Register `M2ISTConfig`, `M2ISTModel` and the REC `PeftModel` subclass with peft (idempotent)."""
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    from .config import M2ISTConfig
    from .model import M2ISTModel
    from .peft_model import PeftModelForReferringExpressionComprehension

    if M2IST_PEFT_TYPE not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=M2ISTConfig, model_cls=M2ISTModel,
                             prefix=M2ISTModel.prefix)
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING[REC_TASK_TYPE] = PeftModelForReferringExpressionComprehension
    _wrap_config_file_errors()
