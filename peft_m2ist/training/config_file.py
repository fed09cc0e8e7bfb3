"""Flag values from a YAML file (`--config`), parsed under the command line and checked as the command line is.

The file's values become command-line words put before the real ones (`--key value`; `--key` / `--no-key` for a
boolean; a list as `a,b`, a mapping as `k=v,...`), so argparse converts and checks them as it does the command line,
and a flag given on the command line, coming later, wins. Each value is checked first, so that an error names the
file and the key.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml


def _fail(parser: argparse.ArgumentParser, path: str | os.PathLike, key: str, value: Any, why: str) -> None:
    parser.error(f"{path}: invalid value for {key}: {value!r} ({why})")


def _words(parser: argparse.ArgumentParser, path: str | os.PathLike, key: str, value: Any,
           action: argparse.Action) -> list[str]:
    """The command-line words of `key: value`, after checking `value` as argparse checks a flag's."""
    option = action.option_strings[0]
    if value is None:  # YAML null: the flag's default, where that is None
        if action.default is not None:
            _fail(parser, path, key, value, f"its default is {action.default!r}: drop the key to keep it")
        return []
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            _fail(parser, path, key, value, "true or false")
        return [option if value else f"--no-{option[2:]}"]
    if action.nargs == 0:  # a flag without value (store_true and the like)
        if value is not True:
            _fail(parser, path, key, value, "true (or leave it out)")
        return [option]
    if action.choices is not None:
        if value not in action.choices:
            hint = " (YAML reads unquoted yes/no/on/off as booleans: quote the value)" if isinstance(value, bool) else ""
            allowed = ", ".join(repr(choice) for choice in action.choices)
            parser.error(f"{path}: invalid value for {key}: {value!r} (choose from {allowed}){hint}")
        return [option, str(value)]
    if isinstance(value, Mapping):
        text = ",".join(f"{k}={v}" for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        text = ",".join(map(str, value))
    elif isinstance(value, bool):
        _fail(parser, path, key, value, "a boolean where the flag takes a value")
    else:
        text = str(value)
    if action.type is not None and action.type is not str:
        try:
            action.type(text)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            _fail(parser, path, key, value, f"not of type {getattr(action.type, '__name__', action.type)}")
    return [option, text]


def config_arguments(parser: argparse.ArgumentParser, path: str | os.PathLike) -> list[str]:
    """The flag values of the YAML file `path` as command-line words, each checked as argparse checks the command line.

    Keys that are no flag, values outside a flag's `choices` or of the wrong type end the run here with
    `parser.error`, naming the file and the key (a value `null` is allowed where the flag's own default is None).
    """
    values = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(values, dict):
        parser.error(f"{path}: expected a mapping of flag names to values, got {type(values).__name__}")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        parser.error(f"unknown keys in {path}: {unknown}")
    return [word for key, value in values.items() for word in _words(parser, path, key, value, actions[key])]


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args(argv)` over the values of the YAML file its `--config` flag names, if any.

    The parser must have a `--config` flag; the file's values are parsed first, so flags given in `argv` win.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    known, _ = parser.parse_known_args(argv)
    if not known.config:
        return parser.parse_args(argv)
    return parser.parse_args([*config_arguments(parser, known.config), *argv])
