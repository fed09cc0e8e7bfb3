"""Flags of `examples/train_rec.py` defined from one source each: the adapter's from `M2ISTConfig`, the data's here.

`add_config_arguments` makes a flag of each named `M2ISTConfig` field, with the field's own default, choices (a
`Literal`), type and help, so the script's defaults are the config's and are never typed twice.
`add_data_arguments` adds the real-data flags; `resolve_data_args` fills their per-dataset defaults and checks them
against the files (`peft_m2ist.data.sources`) before anything loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence

from peft_m2ist.data.records import BOX_FORMATS
from peft_m2ist.data.sources import (
    DATASETS,
    HF_COLUMN_KEYS,
    DataSource,
    SourceError,
    parse_split_list,
)
from peft_m2ist.tuner.config import M2ISTConfig

CONFIG_FLAGS: tuple[str, ...] = (
    "num_tapped_layers", "bottleneck_dim", "expert_scale", "interaction", "mixture", "head_hidden_size",
    "head_num_hidden_layers", "head_num_attention_heads", "head_intermediate_size", "head_dropout",
    "head_attention_dropout", "box_head", "head_recompute_feed_forward", "head_gradient_checkpointing",
    "max_text_tokens", "tower_micro_batch_size", "preset",
)
"""The `M2ISTConfig` fields `examples/train_rec.py` takes as flags of the same name."""

IMAGE_SIZES: dict[str, int] = {"shapes": 128, "refer": 640, "transvg": 640, "hf": 640}
"""Default `--image_size` of each `--dataset`: the benchmark's native 128 px, the paper's 640 px canvas for real data."""


def add_config_arguments(group: argparse._ActionsContainer, names: Sequence[str] = CONFIG_FLAGS,
                         config_class: type = M2ISTConfig) -> None:
    """A `--NAME` flag for each field `NAME` of `config_class`, its default, type, choices and help the field's."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    for name in names:
        field, hint = fields[name], hints[name]
        kwargs: dict = {"default": field.default, "help": field.metadata.get("help")}
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `int | None`: an int, default None
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        if typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = typing.get_args(hint)
        elif hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = hint
        group.add_argument(f"--{name}", **kwargs)


def add_data_arguments(group: argparse._ActionsContainer) -> None:
    """The flags that pick the records (`--dataset` and its sources) and the splits, and how they load."""
    group.add_argument("--dataset", choices=DATASETS, default="shapes",
                       help="shapes (built in), refer (refer API files), transvg (TransVG split files) or hf (a "
                       "Hugging Face dataset). See docs/real-data.md.")
    group.add_argument("--data_root", default=None, help="refer: the folder holding refcoco/, refcoco+/, refcocog/; "
                       "transvg: the folder of the split files (TransVG's data/).")
    group.add_argument("--dataset_name", default=None,
                       help="refer: refcoco, refcoco+ or refcocog; transvg: unc, unc+, gref, gref_umd, referit, flickr.")
    group.add_argument("--split_by", default=None, help="refer: unc or google (refcoco), unc (refcoco+), umd or "
                       "google (refcocog); default the first.")
    group.add_argument("--image_dir", default=None, help="The images (refer: default DATA_ROOT/images).")
    group.add_argument("--hf_path", default=None, help="hf: a Hub dataset id, a save_to_disk or a parquet folder.")
    group.add_argument("--hf_name", default=None, help="hf: the dataset's configuration name.")
    group.add_argument("--hf_columns", default=None, help=f"hf: KEY=COLUMN,... for the keys {', '.join(HF_COLUMN_KEYS)}"
                       " (default image=image,bbox=bbox,sentences=sentences).")
    group.add_argument("--hf_box_format", choices=BOX_FORMATS, default=None,
                       help="hf: how the boxes are written, in pixels (default xywh, COCO's).")
    group.add_argument("--hf_split_names", default=None,
                       help="hf: OURS=THEIRS,... e.g. val=validation,testA=test_a (unmapped names are used as they are).")
    group.add_argument("--train_split", default=None, help="Default train.")
    group.add_argument("--eval_splits", default=None, help="NAME,NAME,...; the best adapter is chosen on the first. "
                       "Default: the dataset's standard splits (docs/real-data.md).")
    group.add_argument("--on_bad_record", choices=("raise", "skip"), default="raise",
                       help="A malformed record stops the run (raise) or is skipped and counted (skip).")
    group.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes (decode the images).")


def resolve_data_args(args: argparse.Namespace) -> DataSource:
    """Fill the per-dataset defaults of `args` in place and check the data flags against the files.

    `--augment` defaults to on for real data (the TransVG augmentation), off for the shapes benchmark; `--image_size`
    to `IMAGE_SIZES`; the splits to the dataset's standard ones. Raises `SourceError` (its message starts with the
    flag) for anything that does not fit, before any image, tower or weight is loaded.
    """
    source = DataSource.from_flags(vars(args))
    if args.augment is None:
        args.augment = source.dataset != "shapes"
    if args.image_size is None:
        args.image_size = IMAGE_SIZES[source.dataset]
    if args.num_workers < 0:
        raise SourceError(f"--num_workers {args.num_workers}: must be 0 (load in the main process) or more")
    train, evals = source.standard_splits()
    args.train_split = args.train_split or train
    args.eval_splits = parse_split_list(args.eval_splits, "--eval_splits") if args.eval_splits else list(evals)
    if source.dataset == "refer":
        args.split_by = source.split_by
    if source.dataset == "hf":
        args.hf_box_format = source.hf_box_format
    needed = {"--eval_splits": args.eval_splits}
    if not args.eval_only:
        needed = {"--train_split": [args.train_split], **needed}
    source.check(needed)
    return source
