"""Flag values from a YAML file (`--config`), merged under the command line and checked as argparse checks it."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


def config_values(parser: argparse.ArgumentParser, path: str | os.PathLike) -> dict[str, Any]:
    """The flag values of the YAML file `path`, checked as argparse checks the command line.

    `parser.set_defaults` applies no check, so keys that are no flag, and values outside a flag's `choices`, end the
    run here with `parser.error` (a value `null` is allowed where the flag's own default is None).
    """
    values = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(values, dict):
        parser.error(f"{path}: expected a mapping of flag names to values, got {type(values).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        parser.error(f"unknown keys in {path}: {unknown}")
    for key, value in values.items():
        action = actions[key]
        if action.choices is None or value in action.choices or (value is None and action.default is None):
            continue
        hint = " (YAML reads unquoted yes/no/on/off as booleans: quote the value)" if isinstance(value, bool) else ""
        allowed = ", ".join(repr(choice) for choice in action.choices)
        parser.error(f"{path}: invalid value for {key}: {value!r} (choose from {allowed}){hint}")
    return values


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args(argv)` over the values of the YAML file its `--config` flag names, if any.

    The parser must have a `--config` flag; the file's values become defaults, so flags given in `argv` win.
    """
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**config_values(parser, known.config))
    return parser.parse_args(argv)
