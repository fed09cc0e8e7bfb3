"""peft_m2ist.training.config_file: YAML values under the command line, checked like it."""

from __future__ import annotations

import argparse

import pytest

from peft_m2ist.training.config_file import config_arguments, parse_args_with_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=None)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--precision", choices=["no", "bf16"], default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--splits", default=None)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    return parser


def test_the_command_line_wins_over_the_file(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("lr: 0.0003\ndtype: bfloat16\n")
    assert vars(parse_args_with_config(_parser(), ["--config", str(config)])) == {
        "config": str(config), "lr": 0.0003, "dtype": "bfloat16", "precision": None, "steps": 10, "splits": None,
        "augment": None}
    args = parse_args_with_config(_parser(), ["--config", str(config), "--dtype", "float32"])
    assert (args.lr, args.dtype) == (0.0003, "float32")
    assert parse_args_with_config(_parser(), []).lr == 1e-4


@pytest.mark.parametrize(("text", "message"), [
    ("dtype: fp16\n", "invalid value for dtype: 'fp16' (choose from 'float32', 'bfloat16')"),
    ("precision: no\n", "invalid value for precision: False"),  # YAML's `no` is a boolean
    ("learning_rate: 1\n", "unknown keys in"),
    ("- lr\n", "expected a mapping of flag names to values, got list"),
    ("steps: 2.5\n", "invalid value for steps: 2.5 (not of type int)"),  # argparse's own type check, naming the key
    ("lr: fast\n", "invalid value for lr: 'fast' (not of type float)"),
    ("augment: yes please\n", "invalid value for augment: 'yes please' (true or false)"),
    ("steps: null\n", "invalid value for steps: None (its default is 10: drop the key to keep it)"),
    ("splits: true\n", "invalid value for splits: True (a boolean where the flag takes a value)"),
])
def test_bad_files_end_with_a_usage_error(tmp_path, capsys, text, message):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as stopped:
        config_arguments(_parser(), config)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_null_is_allowed_where_the_flags_default_is_none(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("precision: null\n")
    assert config_arguments(_parser(), config) == []
    assert parse_args_with_config(_parser(), ["--config", str(config)]).precision is None
    config.write_text("")
    assert config_arguments(_parser(), config) == []


def test_values_become_the_words_of_the_command_line(tmp_path):
    """Booleans as `--x` / `--no-x`, lists as `a,b`, mappings as `k=v,...`: parsed as typed on the command line."""
    config = tmp_path / "config.yaml"
    config.write_text("augment: false\nsplits: [val, testA]\nsteps: 3\nlr: 0.0003\n")
    assert config_arguments(_parser(), config) == ["--no-augment", "--splits", "val,testA", "--steps", "3", "--lr",
                                                   "0.0003"]
    args = parse_args_with_config(_parser(), ["--config", str(config), "--augment"])
    assert (args.augment, args.splits, args.steps, args.lr) == (True, "val,testA", 3, 0.0003)
    config.write_text("splits: {val: validation, testA: test_a}\n")
    assert parse_args_with_config(_parser(), ["--config", str(config)]).splits == "val=validation,testA=test_a"
