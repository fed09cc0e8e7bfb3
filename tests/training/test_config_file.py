"""peft_m2ist.training.config_file: YAML values under the command line, checked like it."""

from __future__ import annotations

import argparse

import pytest

from peft_m2ist.training.config_file import config_values, parse_args_with_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=None)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--precision", choices=["no", "bf16"], default=None)
    return parser


def test_the_command_line_wins_over_the_file(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("lr: 0.0003\ndtype: bfloat16\n")
    assert vars(parse_args_with_config(_parser(), ["--config", str(config)])) == {
        "config": str(config), "lr": 0.0003, "dtype": "bfloat16", "precision": None}
    args = parse_args_with_config(_parser(), ["--config", str(config), "--dtype", "float32"])
    assert (args.lr, args.dtype) == (0.0003, "float32")
    assert parse_args_with_config(_parser(), []).lr == 1e-4


@pytest.mark.parametrize(("text", "message"), [
    ("dtype: fp16\n", "invalid value for dtype: 'fp16' (choose from 'float32', 'bfloat16')"),
    ("precision: no\n", "invalid value for precision: False"),  # YAML's `no` is a boolean
    ("learning_rate: 1\n", "unknown keys in"),
    ("- lr\n", "expected a mapping of flag names to values, got list"),
])
def test_bad_files_end_with_a_usage_error(tmp_path, capsys, text, message):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as stopped:
        config_values(_parser(), config)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_null_is_allowed_where_the_flags_default_is_none(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("precision: null\n")
    assert config_values(_parser(), config) == {"precision": None}
    config.write_text("")
    assert config_values(_parser(), config) == {}
