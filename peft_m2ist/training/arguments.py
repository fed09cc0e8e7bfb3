"""Flags of `examples/train_rec.py` as dataclasses, turned into an argument parser by `transformers.HfArgumentParser`.

One dataclass per group, in the order of `--help`: `TowersArguments`, the adapter's (`adapter_arguments`, made from
`M2ISTConfig`'s own fields so that their defaults, types, choices and help are never typed twice), `DataArguments`
(`data_arguments`), `OptimisationArguments` and `OutputArguments`. `build_parser` makes the parser (plus `--config`,
a YAML file of flag values: `config_file`); `check_args` does the checks that span several flags after parsing.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from transformers import HfArgumentParser

from peft_m2ist import pretrained
from peft_m2ist.towers.quantization import TOWER_DTYPE_CHOICES
from peft_m2ist.training.data_arguments import DataArguments, resolve_data_args
from peft_m2ist.training.divergence import ON_NONFINITE
from peft_m2ist.training.results import check_eval_only_output_dir
from peft_m2ist.training.schedule import check_schedule_args
from peft_m2ist.tuner.config import M2ISTConfig

CONFIG_FLAGS: tuple[str, ...] = (
    "num_tapped_layers", "bottleneck_dim", "expert_scale", "interaction", "mixture", "head_hidden_size",
    "head_num_hidden_layers", "head_num_attention_heads", "head_intermediate_size", "head_dropout",
    "head_attention_dropout", "box_head", "head_recompute_feed_forward", "head_gradient_checkpointing",
    "max_text_tokens", "tower_micro_batch_size", "preset",
)
"""The `M2ISTConfig` fields `examples/train_rec.py` takes as flags of the same name (the others are peft's or
measured from the towers)."""


def _flag(default: Any, help: str | None = None, **metadata: Any) -> Any:
    """A dataclass field with its flag's `help` (and `choices`, ...) in the metadata `HfArgumentParser` reads."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TowersArguments:
    """The frozen vision and text towers."""

    _argument_group_name: ClassVar[str] = "towers"

    vision_model: str = _flag(pretrained.DEFAULT_VISION_TOWER, "Hub id, local folder or offline:* name.")
    text_model: str = _flag(pretrained.DEFAULT_TEXT_TOWER, "Hub id, local folder or offline:* name.")
    tower_dtype: str = _flag("float32", "The frozen towers' dtype: bfloat16/float16 halve their weights and the "
                             "feature cache; int8 quantizes their weights (a quarter of float32's bytes), computing in "
                             "float32.", choices=list(TOWER_DTYPE_CHOICES))
    fold_frozen_batch_norms: bool = _flag(True, "Fold a DETR-family vision tower's frozen batch norms into its "
                                          "convolutions (same features).")


def adapter_arguments(names: typing.Sequence[str] = CONFIG_FLAGS, config_class: type = M2ISTConfig) -> type:
    """The `adapter` group: `--adapter` (a saved adapter to start from) and a flag per field `names` of
    `config_class`, with the field's own type, default and help (`%` escaped for argparse)."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    specs: list[tuple[str, Any, Any]] = [
        ("adapter", str | None, _flag(None, "Start from (or, with --eval_only, evaluate) a saved adapter."))]
    for name in names:
        help_text = fields[name].metadata.get("help")
        specs.append((name, hints[name], _flag(fields[name].default, help_text and help_text.replace("%", "%%"))))
    made = dataclasses.make_dataclass("AdapterArguments", specs)
    made._argument_group_name = "adapter"
    made.__doc__ = "M2ISTConfig's fields of the same names, with its defaults (docs/config.md)."
    return made


@dataclass
class OptimisationArguments:
    """The optimiser, its schedule and the run's length."""

    _argument_group_name: ClassVar[str] = "optimisation"

    seed: int = _flag(13)
    num_epochs: int = _flag(8)
    max_train_steps: int | None = _flag(None, "Stop after this many optimiser steps.")
    batch_size: int = _flag(32, "Per process.")
    gradient_accumulation_steps: int = _flag(1)
    lr_head: float = _flag(1e-4, "Projections, [REG], position embedding, head.")
    lr_adapter: float = _flag(1e-4, "The M3ISA experts.")
    weight_decay: float = _flag(1e-4)
    lr_scheduler: str = _flag("cosine", "Any transformers scheduler name, or 'step' (x0.1 at epoch --lr_drop_epoch, "
                              "the authors').")
    lr_drop_epoch: int | None = _flag(None, "--lr_scheduler step: the epoch of the drop.")
    warmup_ratio: float = _flag(0.05)
    max_grad_norm: float = _flag(1.0)
    on_nonfinite: str = _flag("stop", "A non-finite loss or gradient norm: 'stop' the run (default) or 'skip' that "
                              "step.", choices=ON_NONFINITE)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _flag(None, "Default: what `accelerate config` says.")


@dataclass
class OutputArguments:
    """The output folder, checkpoints, evaluation-only runs and where the results go."""

    _argument_group_name: ClassVar[str] = "output"

    output_dir: str = _flag("outputs/m2ist-shapes")
    checkpointing_steps: int = _flag(200, "accelerate save_state every N steps.")
    checkpoints_total_limit: int = _flag(2)
    resume_from_checkpoint: str | None = _flag(None, "A checkpoint folder, or 'latest' (the newest complete "
                                               "OUTPUT/checkpoints/step_N).")
    overwrite_output_dir: bool = _flag(False, "Delete the checkpoints, adapters, best.json and results.json an "
                                       "earlier run left in --output_dir before training (without it, such an "
                                       "--output_dir is refused unless resuming).")
    eval_only: bool = _flag(False, "Evaluate --adapter on every --eval_splits split, write results.json/.md and stop.")
    report_to: str = _flag("auto", "'auto' (tensorboard or trackio if installed), 'none', ...")
    push_to_hub: bool = _flag(False)
    hub_model_id: str | None = _flag(None)


class FlagParser(HfArgumentParser):
    """`HfArgumentParser`, with a boolean field as the flag pair `--NAME` / `--no-NAME` (argparse's
    `BooleanOptionalAction`; a default None stays None unless one of them is given)."""

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        if field.type is bool or field.type == bool | None:
            parser.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=field.default,
                                **field.metadata)
            return
        HfArgumentParser._parse_dataclass_field(parser, field)


def build_parser(description: str | None = None) -> FlagParser:
    """The parser of every group's flags, and `--config` (a YAML file of flag values, under the command line)."""
    parser = FlagParser([TowersArguments, adapter_arguments(), DataArguments, OptimisationArguments, OutputArguments],
                        description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=str, default=None, help="YAML file of flag values (flags on the CLI win).")
    descriptions = {dtype._argument_group_name: " ".join(dtype.__doc__.split("\n\n")[0].split())
                    for dtype in parser.dataclass_types}
    for group in parser._action_groups:  # each group's --help heading says what it holds: its dataclass's summary
        group.description = descriptions.get(group.title, group.description)
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks across flags, after parsing: a usage error (`parser.error`) for anything that does not fit.

    The schedule flags, `--push_to_hub` / `--hub_model_id`, `--eval_only` / `--adapter`, `--overwrite_output_dir` with
    `--resume_from_checkpoint latest`; the data flags against the files (filling their per-dataset defaults, before
    anything loads, towers included); `--cache_features` (default: on unless `--augment`).
    """
    check_schedule_args(parser, args)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    if args.eval_only and not args.adapter:
        parser.error("--eval_only needs --adapter")
    if args.overwrite_output_dir and args.resume_from_checkpoint == "latest":
        parser.error("--overwrite_output_dir would delete the checkpoints --resume_from_checkpoint latest resumes")
    try:
        resolve_data_args(args)
        if args.eval_only:  # it writes results.json/.md into --output_dir: not into a training run's
            check_eval_only_output_dir(args.output_dir)
    except ValueError as error:
        parser.error(str(error))
    if args.cache_features is None:  # auto: cache the towers' outputs unless augmentation changes the images
        args.cache_features = not args.augment
    elif args.augment and args.cache_features:
        parser.error("--augment changes the images every epoch, so their tower features cannot be cached: "
                     "drop --cache_features (or cache_features in the --config file), or pass --no-cache_features")
