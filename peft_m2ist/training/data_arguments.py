"""The `data` flags of `examples/train_rec.py` (`DataArguments`) and their per-dataset defaults and checks.

`resolve_data_args` fills the defaults that depend on `--dataset` and checks the flags against the files (through
`peft_m2ist.data.sources`) before anything loads.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from peft_m2ist.data.controls import CONTROLS
from peft_m2ist.data.records import BOX_FORMATS
from peft_m2ist.data.sources import (
    DATASETS,
    HF_COLUMN_KEYS,
    DataSource,
    SourceError,
    parse_split_list,
)

from .feature_cache import CACHE_SCOPES

IMAGE_SIZES: dict[str, int] = {"shapes": 128, "refer": 640, "transvg": 640, "hf": 640}
"""Default `--image_size` of each `--dataset`: the benchmark's native 128 px, the paper's 640 px canvas for real data."""


def _flag(default, help: str, **metadata) -> field:
    """A dataclass field with its flag's `help` (and `choices`, ...) in the metadata `HfArgumentParser` reads."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class DataArguments:
    """The records (`--dataset` and its sources), the splits, how they load and look. See docs/real-data.md for
    each --dataset's files and standard splits.

    The per-dataset defaults (None here) are filled by `resolve_data_args`.
    """

    _argument_group_name: ClassVar[str] = "data"

    dataset: str = _flag("shapes", "shapes (built in), refer (refer API files), transvg (TransVG split files) or hf "
                         "(a Hugging Face dataset). See docs/real-data.md.", choices=DATASETS)
    data_root: str | None = _flag(None, "refer: the folder holding refcoco/, refcoco+/, refcocog/; transvg: the "
                                  "folder of the split files (TransVG's data/).")
    dataset_name: str | None = _flag(None, "refer: refcoco, refcoco+ or refcocog; transvg: unc, unc+, gref, "
                                     "gref_umd, referit, flickr.")
    split_by: str | None = _flag(None, "refer: unc or google (refcoco), unc (refcoco+), umd or google (refcocog); "
                                 "default the first.")
    image_dir: str | None = _flag(None, "The images (refer: default DATA_ROOT/images).")
    hf_path: str | None = _flag(None, "hf: a Hub dataset id, a save_to_disk or a parquet folder.")
    hf_name: str | None = _flag(None, "hf: the dataset's configuration name.")
    hf_columns: str | None = _flag(None, f"hf: KEY=COLUMN,... for the keys {', '.join(HF_COLUMN_KEYS)} (default "
                                   "image=image,bbox=bbox,sentences=sentences; phrase= is another name for "
                                   "sentences=).")
    hf_box_format: str | None = _flag(None, "hf: how the boxes are written, in pixels (default xywh, COCO's).",
                                      choices=BOX_FORMATS)
    hf_split_names: str | None = _flag(None, "hf: OURS=THEIRS,... e.g. val=validation,testA=test_a (unmapped names "
                                       "are used as they are).")
    train_split: str | None = _flag(None, "Default train.")
    eval_splits: str | None = _flag(None, "NAME,NAME,...; the best adapter is chosen on the first. Default: the "
                                    "dataset's standard splits (docs/real-data.md).")
    on_bad_record: Literal["raise", "skip"] = _flag("raise", "A malformed record stops the run (raise) or is skipped "
                                                    "and counted (skip).")
    num_workers: int = _flag(0, "DataLoader worker processes (decode the images).")
    data_seed: int = _flag(0, "Seed of the built-in shapes benchmark.")
    image_size: int | None = _flag(None, "Canvas side (default 128 for shapes, 640 real data).")
    train_samples: int | None = _flag(None, "Use only the first N training rows.")
    eval_samples: int | None = _flag(None, "Use only the first N rows of each eval split.")
    control: str = _flag("none", "Hide one modality in every split (the benchmark's controls).", choices=CONTROLS)
    augment: bool | None = _flag(None, "TransVG's training augmentation (random resize/crop, colour jitter, flip "
                                 "swapping left/right). Default: on for real data, off for shapes.")
    cache_dir: str | None = _flag(None, "Where the benchmark build is cached.")
    cache_features: bool | None = _flag(None, "Run the frozen towers once per sample and train on their cached "
                                        "outputs. Default: on without --augment, off with it (its images change "
                                        "every epoch: giving both is an error).")
    feature_cache_dir: str | None = _flag(None, "Where the tower-feature cache is written, memory-mapped by every "
                                          "process (default: OUTPUT/feature_cache); runs with the same towers and "
                                          "data reuse it.")
    feature_cache_scope: str = _flag("global", "global: one cache in a folder all machines share; node: one per "
                                     "machine, --feature_cache_dir on its own disk.", choices=CACHE_SCOPES)


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
