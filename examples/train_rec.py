"""Train an M2IST adapter for referring expression comprehension with 🤗 Accelerate.

    accelerate launch examples/train_rec.py                              # offline default towers + shapes benchmark
    accelerate launch examples/train_rec.py --config examples/configs/default.yaml --num_epochs 3
    accelerate launch --multi_gpu --num_processes 2 examples/train_rec.py ...               # data-parallel on GPUs
    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 examples/train_rec.py ...  # ... or on CPU

Reads top to bottom: arguments -> towers + adapter -> data -> optimiser -> (resume) -> train/evaluate loop with
checkpoints -> best adapter -> report (+ push to the Hub). Every flag can also be set in a YAML file (`--config`);
flags given on the command line win.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path

import psutil
import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_scheduler

from peft_m2ist import M2ISTConfig, VisionTextPair, fold_frozen_batch_norms
from peft_m2ist.config import BOX_HEADS, INTERACTION_MODES, MIXTURE_MODES
from peft_m2ist.data import CONTROLS, RECCollator, apply_control, chance_level, load_shapes_benchmark
from peft_m2ist.metrics import load_rec_metric
from peft_m2ist.pretrained import (
    DEFAULT_TEXT_TOWER,
    DEFAULT_VISION_TOWER,
    TOWER_DTYPES,
    load_text_tower,
    load_vision_tower,
)

logger = get_logger(__name__)


# ----------------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=str, default=None, help="YAML file of flag values (flags on the CLI win).")
    g = p.add_argument_group("towers and adapter")
    g.add_argument("--vision_model", default=DEFAULT_VISION_TOWER, help="Hub id, local folder or offline:* name.")
    g.add_argument("--text_model", default=DEFAULT_TEXT_TOWER, help="Hub id, local folder or offline:* name.")
    g.add_argument("--adapter", default=None, help="Start from (or, with --eval_only, evaluate) a saved adapter.")
    g.add_argument("--num_tapped_layers", type=int, default=6)
    g.add_argument("--bottleneck_dim", type=int, default=128)
    g.add_argument("--expert_scale", type=float, default=0.1, help="Fixed scale of every expert's output.")
    g.add_argument("--interaction", choices=INTERACTION_MODES, default="shared")
    g.add_argument("--mixture", choices=MIXTURE_MODES, default="sum")
    g.add_argument("--head_hidden_size", type=int, default=256)
    g.add_argument("--head_num_hidden_layers", type=int, default=6)
    g.add_argument("--head_num_attention_heads", type=int, default=8)
    g.add_argument("--head_intermediate_size", type=int, default=2048)
    g.add_argument("--head_dropout", type=float, default=0.1)
    g.add_argument("--head_attention_dropout", type=float, default=0.0)
    g.add_argument("--box_head", choices=BOX_HEADS, default="pointer",
                   help="'pointer': [REG] points at vision tokens (default); 'mlp': TransVG's regression MLP.")
    g.add_argument("--head_recompute_feed_forward", action=argparse.BooleanOptionalAction, default=True,
                   help="Recompute the head's feed-forward hidden tensors in backward instead of storing them "
                   "(--no-head_recompute_feed_forward stores them).")
    g.add_argument("--head_gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="Recompute the head's layers in backward instead of storing their activations.")
    g.add_argument("--max_text_tokens", type=int, default=20)
    g.add_argument("--tower_dtype", choices=sorted(TOWER_DTYPES), default="float32",
                   help="Keep the frozen towers in this dtype: bfloat16/float16 halve their weights (and the feature "
                   "cache); the side network and head stay float32.")
    g.add_argument("--fold_frozen_batch_norms", action=argparse.BooleanOptionalAction, default=True,
                   help="Fold the vision tower's frozen batch norms (DETR-family ResNets) into the convolutions before "
                   "them (peft_m2ist.fold_frozen_batch_norms): same features, less time and memory in its forward.")
    g.add_argument("--tower_micro_batch_size", type=int, default=None,
                   help="Run the frozen towers on at most this many samples at a time (same features, lower peak).")
    g = p.add_argument_group("data")
    g.add_argument("--data_seed", type=int, default=0, help="Seed of the built-in shapes benchmark.")
    g.add_argument("--image_size", type=int, default=128, help="Canvas side S the images are resized/padded to.")
    g.add_argument("--train_samples", type=int, default=None, help="Use only the first N training rows.")
    g.add_argument("--eval_samples", type=int, default=None, help="Use only the first N validation rows.")
    g.add_argument("--control", choices=CONTROLS, default="none",
                   help="Hide one modality in every split (the benchmark's controls).")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                   help="Training augmentation (random resize/crop, colour jitter, flip swapping left/right).")
    g.add_argument("--cache_dir", default=None, help="Where the benchmark build is cached.")
    g.add_argument("--cache_features", action=argparse.BooleanOptionalAction, default=None,
                   help="Run the frozen towers once per sample and train the side network on the cached outputs. "
                   "Default: on without --augment, off with it (its images change every epoch, so giving both "
                   "is an error).")
    g = p.add_argument_group("optimisation")
    g.add_argument("--seed", type=int, default=13)
    g.add_argument("--num_epochs", type=int, default=8)
    g.add_argument("--max_train_steps", type=int, default=None, help="Stop after this many optimiser steps.")
    g.add_argument("--batch_size", type=int, default=32, help="Per process.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--lr_head", type=float, default=1e-4, help="Projections, [REG], position embedding, head.")
    g.add_argument("--lr_adapter", type=float, default=1e-4, help="The M3ISA experts.")
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g.add_argument("--lr_scheduler", default="cosine", help="Any transformers scheduler name.")
    g.add_argument("--warmup_ratio", type=float, default=0.05)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="Default: what `accelerate config` says.")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="outputs/m2ist-shapes")
    g.add_argument("--checkpointing_steps", type=int, default=200, help="accelerate save_state every N steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=2)
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="A checkpoint folder, or 'latest' (the newest complete OUTPUT/checkpoints/step_N).")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Delete the checkpoints, adapters, best.json and results.json an earlier run left in "
                   "--output_dir before training (without it, such an --output_dir is refused unless resuming).")
    g.add_argument("--eval_only", action="store_true", help="Evaluate --adapter on the validation split and stop.")
    g.add_argument("--report_to", default="auto", help="'auto' (tensorboard or trackio if installed), 'none', ...")
    g.add_argument("--crash_after_steps", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a kill
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv` over the values of the YAML `--config` (if any); exits with a usage error on bad values."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**config_values(parser, known.config))
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    if args.eval_only and not args.adapter:
        parser.error("--eval_only needs --adapter")
    if args.overwrite_output_dir and args.resume_from_checkpoint == "latest":
        parser.error("--overwrite_output_dir would delete the checkpoints --resume_from_checkpoint latest resumes")
    if args.cache_features is None:  # auto: cache the towers' outputs unless augmentation changes the images
        args.cache_features = not args.augment
    elif args.augment and args.cache_features:
        parser.error("--augment changes the images every epoch, so their tower features cannot be cached: "
                     "drop --cache_features (or cache_features in the --config file), or pass --no-cache_features")
    return args


def config_values(parser: argparse.ArgumentParser, path: str) -> dict:
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


def feature_cache_message(args: argparse.Namespace) -> str:
    """One line for the log: whether the towers' outputs are cached, and why."""
    if args.cache_features:
        return "tower-feature cache on (--cache_features, the default without --augment)"
    if args.augment:
        return "tower-feature cache off: --augment changes the images every epoch (the towers run at every step)"
    return "tower-feature cache off (--no-cache_features): the towers run at every step"


# ----------------------------------------------------------------------------------------------- model and data
def build_model(args: argparse.Namespace):
    vision, image_processor = load_vision_tower(args.vision_model)
    if args.fold_frozen_batch_norms and (folded := fold_frozen_batch_norms(vision)):
        logger.info(f"folded {folded} frozen batch norms of the vision tower into its convolutions")
    if any(isinstance(m, torch.nn.Conv2d) for m in vision.modules()):
        vision.to(memory_format=torch.channels_last)  # same values; ~4x faster convolutions on CPU
    text, tokenizer = load_text_tower(args.text_model)
    vision.to(TOWER_DTYPES[args.tower_dtype])
    text.to(TOWER_DTYPES[args.tower_dtype])
    pair = VisionTextPair(vision, text)
    if args.adapter:
        model = PeftModel.from_pretrained(pair, args.adapter, is_trainable=not args.eval_only)
        if args.tower_micro_batch_size is not None:  # a run-time setting: the flag wins over the saved config
            model.peft_config[model.active_adapter].tower_micro_batch_size = args.tower_micro_batch_size
    else:
        config = M2ISTConfig(
            num_tapped_layers=args.num_tapped_layers, bottleneck_dim=args.bottleneck_dim, expert_scale=args.expert_scale,
            interaction=args.interaction, mixture=args.mixture, head_hidden_size=args.head_hidden_size, head_num_hidden_layers=args.head_num_hidden_layers,
            head_num_attention_heads=args.head_num_attention_heads, head_intermediate_size=args.head_intermediate_size, head_dropout=args.head_dropout,
            head_attention_dropout=args.head_attention_dropout, box_head=args.box_head,
            head_recompute_feed_forward=args.head_recompute_feed_forward,
            head_gradient_checkpointing=args.head_gradient_checkpointing,
            tower_micro_batch_size=args.tower_micro_batch_size, max_text_tokens=args.max_text_tokens, image_size=args.image_size,
        )
        model = get_peft_model(pair, config)
    return model, image_processor, tokenizer


def build_data(args: argparse.Namespace, image_processor, tokenizer):
    data = load_shapes_benchmark(seed=args.data_seed, cache_dir=args.cache_dir)
    data = apply_control(data, args.control)
    train, val = data["train"], data["val"]
    if args.train_samples:
        train = train.select(range(min(args.train_samples, len(train))))
    if args.eval_samples:
        val = val.select(range(min(args.eval_samples, len(val))))
    common = dict(image_size=args.image_size, max_text_tokens=args.max_text_tokens)
    train_collator = RECCollator.from_image_processor(tokenizer, image_processor, train=args.augment, **common)
    eval_collator = RECCollator.from_image_processor(tokenizer, image_processor, train=False, **common)
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=train_collator)
    val_loader = DataLoader(val, batch_size=args.batch_size, shuffle=False, collate_fn=eval_collator)
    return train_loader, val_loader, chance_level(val)


def parameter_groups(model, args: argparse.Namespace) -> list[dict]:
    """Experts (`...m2ist_side.<adapter>.blocks.*`) at `lr_adapter`; projections and head at `lr_head`."""
    experts, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (experts if ".blocks." in name else rest).append(param)
    return [{"params": experts, "lr": args.lr_adapter}, {"params": rest, "lr": args.lr_head}]


# ---------------------------------------------------------------------------------------------- feature cache
class CachedTowerFeatures(Dataset):
    """Per-sample frozen-tower outputs (`encode_towers`), labels and phrase types, for training on the side only."""

    def __init__(self, features: dict[str, torch.Tensor], labels: torch.Tensor, phrase_types: list[str]) -> None:
        self.features, self.labels, self.phrase_types = features, labels, phrase_types

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"tower_features": {k: v[index] for k, v in self.features.items()}, "labels": self.labels[index],
                "phrase_type": self.phrase_types[index]}


CACHE_MEMORY_FRACTION = 0.8
"""The most of the machine's available RAM that the feature caches of its processes may take together."""


def allocate_feature_cache(first: dict[str, torch.Tensor], num_samples: int, processes_here: int, desc: str,
                           available: int | None = None) -> dict[str, torch.Tensor]:
    """Empty whole-split CPU tensors for `num_samples` samples shaped like the batch `first`, if they fit in RAM.

    Raises `MemoryError` before allocating when the caches of the `processes_here` processes on this machine would
    take more than `CACHE_MEMORY_FRACTION` of the available RAM (`available` bytes, default: psutil's figure).
    """
    per_sample = sum(v[0].numel() * v.element_size() for v in first.values())
    needed = per_sample * num_samples * processes_here
    available = psutil.virtual_memory().available if available is None else available
    if needed > CACHE_MEMORY_FRACTION * available:
        raise MemoryError(
            f"{desc}: the tower-feature cache needs {needed / 2**30:.1f} GiB ({per_sample / 2**20:.2f} MiB per sample "
            f"x {num_samples} samples x {processes_here} process(es) on this machine), but {available / 2**30:.1f} "
            "GiB of RAM is available. Train with --no-cache_features (the towers then run at every step), with "
            "--tower_dtype bfloat16 (half the size), on fewer samples (--train_samples) or with fewer tapped layers "
            "(--num_tapped_layers)."
        )
    return {k: v.new_empty((num_samples, *v.shape[1:]), device="cpu") for k, v in first.items()}


def cache_tower_features(model, loader: DataLoader, accelerator: Accelerator, desc: str) -> CachedTowerFeatures:
    """Run the towers once over `loader` (every process caches the whole split; the loader is sharded later).

    The outputs go straight into whole-split tensors, allocated after the first batch once `allocate_feature_cache`
    has checked that they fit in RAM.
    """
    features: dict[str, torch.Tensor] = {}
    labels, phrase_types = [], []
    filled = 0
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process):
        phrase_types += batch.pop("phrase_type")
        labels.append(batch.pop("labels"))
        inputs = {k: v.to(accelerator.device) for k, v in batch.items()}
        outputs = model.encode_towers(**inputs)
        if not features:
            features = allocate_feature_cache(outputs, len(loader.dataset), processes_here, desc)
            cache_bytes = sum(v.numel() * v.element_size() for v in features.values())
            logger.info(f"{desc}: {cache_bytes / 2**30:.2f} GiB for {len(loader.dataset)} samples",
                        main_process_only=True)
        batch_size = len(labels[-1])
        for key, value in outputs.items():
            features[key][filled : filled + batch_size] = value
        filled += batch_size
    return CachedTowerFeatures({k: v[:filled] for k, v in features.items()}, torch.cat(labels), phrase_types)


def cached_loaders(model, train_loader, val_loader, accelerator, args):
    model.to(accelerator.device)
    train = cache_tower_features(model, train_loader, accelerator, "caching tower features (train)")
    val = cache_tower_features(model, val_loader, accelerator, "caching tower features (val)")
    return (DataLoader(train, batch_size=args.batch_size, shuffle=True),
            DataLoader(val, batch_size=args.batch_size, shuffle=False))


# ------------------------------------------------------------------------------------------------- evaluation
def evaluate(model, loader, accelerator: Accelerator, desc: str = "eval") -> dict[str, float]:
    """Acc@0.5, mean IoU and per-phrase-type accuracy, gathered across processes (duplicates dropped).

    Every process runs its share of `loader`; boxes and labels are gathered with `gather_for_metrics`, the phrase
    types as strings with `gather_for_metrics(..., use_gather_object=True)` (same order, same duplicates dropped), so
    each type stays with its own samples whatever order the processes see them in. Only the main process feeds and
    computes the metric, held in memory (no cache files); it returns the scores, the other processes `{}`.
    """
    model.eval()
    metric = load_rec_metric(keep_in_memory=True) if accelerator.is_main_process else None
    gathered_types: list[str] = []
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        types = [str(t) for t in batch.pop("phrase_type")]
        with torch.no_grad():
            boxes = model(**{k: v for k, v in batch.items() if k != "labels"}).pred_boxes
        boxes, labels = accelerator.gather_for_metrics((boxes, batch["labels"]))
        types = accelerator.gather_for_metrics(types, use_gather_object=True)
        if metric is not None:
            metric.add_batch(predictions=boxes.float().cpu().tolist(), references=labels.float().cpu().tolist())
            gathered_types += types
    model.train()
    return metric.compute(phrase_types=gathered_types) if metric is not None else {}


# ----------------------------------------------------------------------------------------------- checkpoints
TOWERS_FILE = "towers.json"
"""Written next to each saved adapter: the towers it was trained on, which `predict.py` reloads by default."""
RUN_STATE_FILE = "run_state.json"
"""Written last into each checkpoint folder: step, history, best score, last evaluated epoch and elapsed time."""
BEST_FILE = "best.json"
"""`OUTPUT/best.json`: the score, epoch and step of the adapter in `OUTPUT/best_adapter/`."""
RESULTS_FILE = "results.json"
RUN_OUTPUTS = ("checkpoints", "best_adapter", "final_adapter", BEST_FILE, RESULTS_FILE)
"""What a training run writes into --output_dir (besides tracker logs); see `prepare_output_dir`."""
CHECKPOINT_NAME = re.compile(r"^step_(\d+)$")
"""Checkpoint folders are `OUTPUT/checkpoints/step_N`; nothing else there counts as one."""


def write_json(path: Path, data: object) -> None:
    """Write `data` as JSON to `path` atomically: a temporary sibling, flushed to disk, then `os.replace`d.

    A crash leaves either the old file or the new one, never a truncated one.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict:
    """The JSON object in `path`; a file that is not valid JSON raises a `ValueError` naming it."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the file is damaged: resume from another "
                         "checkpoint (--resume_from_checkpoint PATH) or start over") from error


def replace_dir(tmp: Path, folder: Path) -> None:
    """Move the complete folder `tmp` to `folder`, replacing what is there.

    Each rename is atomic: `folder` is always either absent, the old folder or the new one, never half written.
    """
    old = folder.with_name(f"{folder.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


def fresh_tmp_dir(folder: Path) -> Path:
    """`folder`'s temporary sibling `<name>.tmp`, emptied of what an interrupted save left there."""
    tmp = folder.with_name(f"{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def save_adapter(model, folder: Path, args: argparse.Namespace) -> None:
    """`save_pretrained` plus `towers.json`, written into `<folder>.tmp` and then moved to `folder`."""
    tmp = fresh_tmp_dir(folder)
    model.save_pretrained(tmp)
    towers = {"vision": args.vision_model, "text": args.text_model, "dtype": args.tower_dtype}
    write_json(tmp / TOWERS_FILE, towers)
    replace_dir(tmp, folder)


def checkpoint_step(folder: Path) -> int | None:
    """N for a folder named exactly `step_N`, else None."""
    match = CHECKPOINT_NAME.match(folder.name)
    return int(match.group(1)) if match else None


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """The complete checkpoints in `output_dir/checkpoints`, oldest step first.

    Complete: a folder named `step_N` holding `run_state.json` (written last, see `save_checkpoint`).
    """
    root = output_dir / "checkpoints"
    folders = [d for d in root.iterdir() if d.is_dir() and checkpoint_step(d) is not None
               and (d / RUN_STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(folders, key=checkpoint_step)


def resolve_checkpoint(arg: str | None, output_dir: Path) -> Path | None:
    """The checkpoint folder `--resume_from_checkpoint arg` names: 'latest' is the newest complete one (or None)."""
    if not arg:
        return None
    if arg == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(arg)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {arg}: no such folder")
    if not (path / RUN_STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {arg}: no {RUN_STATE_FILE} in it, so it is no complete "
                                "checkpoint of this script (its save was interrupted, or an older version wrote it)")
    return path


def prepare_output_dir(output_dir: Path, checkpoint: Path | None, resumed_step: int, overwrite: bool,
                       accelerator: Accelerator) -> None:
    """Check `output_dir` before a run writes into it.

    Resuming from one of its own checkpoints (at step `resumed_step`) continues that run: the checkpoints after it
    belong to the abandoned continuation and are deleted, with the leftovers of interrupted saves, so that `latest`
    and the clean-up pick the new ones. Otherwise, outputs of an earlier run (`RUN_OUTPUTS`) raise
    `FileExistsError`, or with `overwrite` are deleted first.
    """
    own = checkpoint is not None and checkpoint.resolve().parent == (output_dir / "checkpoints").resolve()
    if own:
        if overwrite:
            raise ValueError(f"--overwrite_output_dir would delete {checkpoint}, the checkpoint to resume from")
        if accelerator.is_main_process:
            for folder in (output_dir / "checkpoints").iterdir():
                step = checkpoint_step(folder)
                if folder.name.endswith((".tmp", ".old")) or (step is not None and step > resumed_step):
                    logger.info(f"deleting {folder}: written after the checkpoint resumed from")
                    shutil.rmtree(folder)
        accelerator.wait_for_everyone()
        return
    found = [name for name in RUN_OUTPUTS if (output_dir / name).exists()
             and not ((output_dir / name).is_dir() and not any((output_dir / name).iterdir()))]
    if found and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds the outputs of an earlier run ({', '.join(found)}) and no complete "
            "checkpoint of it is being resumed: pass --resume_from_checkpoint latest to continue it (if it saved "
            "a checkpoint), --overwrite_output_dir to delete them, or choose another --output_dir"
        )
    accelerator.wait_for_everyone()  # every process has looked before the main one deletes
    if found and accelerator.is_main_process:
        for name in found:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        logger.info(f"--overwrite_output_dir: deleted {', '.join(found)} in {output_dir}", main_process_only=True)
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, limit: int, state: dict) -> None:
    """`accelerator.save_state` into `step_N.tmp`, then the best adapter and `run_state.json`, then rename.

    The folder is named `step_N` only once complete, so `latest` never picks a half-written one. The clean-up keeps
    the newest `limit` complete checkpoints (by step number).
    """
    folder = output_dir / "checkpoints" / f"step_{step}"
    tmp = folder.with_name(f"{folder.name}.tmp")
    if accelerator.is_main_process:
        fresh_tmp_dir(folder)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its RNG states
    if accelerator.is_main_process:
        best_adapter = output_dir / "best_adapter"
        if best_adapter.is_dir():  # as of this step: resuming restores it with the best score of `state`
            shutil.copytree(best_adapter, tmp / "best_adapter")
        write_json(tmp / RUN_STATE_FILE, state)
        replace_dir(tmp, folder)
        if limit:
            for old in checkpoint_dirs(output_dir)[:-limit]:
                shutil.rmtree(old)


def restore_best_adapter(checkpoint: Path, output_dir: Path, best: dict) -> None:
    """Put `output_dir/best_adapter` and `best.json` back as they were when `checkpoint` was saved."""
    saved = checkpoint / "best_adapter"
    if saved.is_dir():
        tmp = fresh_tmp_dir(output_dir / "best_adapter")
        shutil.copytree(saved, tmp)
        replace_dir(tmp, output_dir / "best_adapter")
        write_json(output_dir / BEST_FILE, best)
    else:  # no epoch evaluated yet at that step: what is there came after it
        shutil.rmtree(output_dir / "best_adapter", ignore_errors=True)
        (output_dir / BEST_FILE).unlink(missing_ok=True)


def epoch_to_evaluate_first(step: int, steps_per_epoch: int, total_steps: int, evaluated_epoch: int) -> int | None:
    """The epoch whose training a checkpoint at `step` completed but whose evaluation it predates, if any.

    A checkpoint saved on an epoch's last step (or the run's last step) is written before that epoch's evaluation;
    resuming from it must evaluate that epoch before training on.
    """
    if step == 0 or (step % steps_per_epoch and step < total_steps):
        return None
    epoch = (step - 1) // steps_per_epoch
    return epoch if epoch > evaluated_epoch else None


def trackers(report_to: str) -> list[str] | None:
    if report_to == "none":
        return None
    if report_to != "auto":
        return report_to.split(",")
    found = [name for name in ("tensorboard", "trackio") if importlib.util.find_spec(name)]
    return found[:1] or None


class RunState:
    """What a checkpoint records besides accelerate's state (its `run_state.json`); complete on the main process.

    (A plain class: `dataclass` needs the module in `sys.modules`, which loading the script by path skips.)
    """

    def __init__(self, step: int = 0, evaluated_epoch: int = -1, history: list[dict] | None = None,
                 best: dict | None = None, elapsed_s: float = 0.0, started: float | None = None) -> None:
        self.step = step
        self.evaluated_epoch = evaluated_epoch
        """The last epoch evaluated (-1: none yet)."""
        self.history = history if history is not None else []
        self.best = best if best is not None else {"accuracy": -1}
        self.elapsed_s = elapsed_s
        """Run time of the earlier sessions, up to the checkpoint this one resumed from."""
        self.started = time.monotonic() if started is None else started
        """When this session started (`time.monotonic`)."""

    def elapsed(self) -> float:
        """Seconds of run time so far, the earlier sessions' included."""
        return self.elapsed_s + time.monotonic() - self.started

    def to_json(self) -> dict:
        return {"step": self.step, "evaluated_epoch": self.evaluated_epoch, "history": self.history,
                "best": self.best, "elapsed_s": round(self.elapsed(), 1)}

    @classmethod
    def from_checkpoint(cls, checkpoint: Path, started: float) -> RunState:
        """The state saved in `checkpoint/run_state.json`, for a session that started at `started`."""
        path = checkpoint / RUN_STATE_FILE
        data = read_json(path)
        try:
            return cls(step=int(data["step"]), evaluated_epoch=int(data["evaluated_epoch"]),
                       history=list(data["history"]), best=dict(data["best"]), elapsed_s=float(data["elapsed_s"]),
                       started=started)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: not a run state of this script ({type(error).__name__}: {error})") from error


def evaluate_epoch(model, val_loader, accelerator: Accelerator, run: RunState, epoch: int, chance: float,
                   output_dir: Path, args: argparse.Namespace) -> None:
    """Evaluate after `epoch`; the main process records the scores in `run` and saves a new best adapter."""
    scores = evaluate(model, val_loader, accelerator, desc=f"eval epoch {epoch}")
    run.evaluated_epoch = epoch
    if not accelerator.is_main_process:
        return
    run.history.append({"epoch": epoch, "step": run.step, **scores})
    accelerator.print(f"epoch {epoch}: val Acc@0.5 = {100 * scores['accuracy']:.2f}% "
                      f"(mean IoU {scores['mean_iou']:.3f}, chance {100 * chance:.1f}%)")
    accelerator.log({f"val/{k}": v for k, v in scores.items()}, step=run.step)
    if scores["accuracy"] > run.best["accuracy"]:
        run.best = {"epoch": epoch, "step": run.step, **scores}
        save_adapter(accelerator.unwrap_model(model), output_dir / "best_adapter", args)
        write_json(output_dir / BEST_FILE, run.best)


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    started = time.monotonic()
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=trackers(args.report_to),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    set_seed(args.seed)

    checkpoint, run = None, RunState(started=started)
    if not args.eval_only:  # before anything loads: a damaged checkpoint or a used --output_dir ends the run here
        checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
        if checkpoint is not None:
            run = RunState.from_checkpoint(checkpoint, started)
        prepare_output_dir(output_dir, checkpoint, run.step, args.overwrite_output_dir, accelerator)

    model, image_processor, tokenizer = build_model(args)
    with accelerator.main_process_first():  # the first process builds and caches the benchmark
        train_loader, val_loader, chance = build_data(args, image_processor, tokenizer)

    if args.eval_only:
        # a frozen model: no DistributedDataParallel wrapper (it refuses a module without trainable parameters)
        model = accelerator.prepare_model(model, evaluation_mode=True)
        val_loader = accelerator.prepare(val_loader)
        scores = evaluate(model, val_loader, accelerator)
        if accelerator.is_main_process:
            report = {"val": scores, "chance": chance, "processes": accelerator.num_processes}
            print(json.dumps(report, sort_keys=True))
        return scores

    if accelerator.is_main_process:
        model.print_trainable_parameters()
        model.print_parameter_counts()
    logger.info(feature_cache_message(args))
    if args.cache_features:
        train_loader, val_loader = cached_loaders(model, train_loader, val_loader, accelerator, args)
    optimizer = torch.optim.AdamW(parameter_groups(model, args), weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / args.gradient_accumulation_steps)
    total_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=int(args.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler
    )
    if accelerator.trackers:
        accelerator.init_trackers("m2ist", config={k: v for k, v in vars(args).items() if v is not None})

    # ---- resume: restore weights, optimiser, scheduler, RNG states and the sampler (accelerate), the history, best
    # score and adapter, and elapsed time (run_state.json); skip the batches already seen
    start_epoch, skip_batches = 0, 0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        if accelerator.is_main_process:
            restore_best_adapter(checkpoint, output_dir, run.best)
        start_epoch, done = divmod(run.step, steps_per_epoch)
        skip_batches = done * args.gradient_accumulation_steps
        accelerator.print(f"Resumed from {checkpoint} (step {run.step}, epoch {start_epoch}).")
        # saved on an epoch's (or the run's) last step, before that epoch was evaluated: evaluate it now, as the
        # uninterrupted run did right after saving
        unevaluated = epoch_to_evaluate_first(run.step, steps_per_epoch, total_steps, run.evaluated_epoch)
        if unevaluated is not None:
            evaluate_epoch(model, val_loader, accelerator, run, unevaluated, chance, output_dir, args)

    progress = tqdm(total=total_steps, initial=run.step, desc="train", disable=not accelerator.is_local_main_process)
    model.train()
    for epoch in range(start_epoch, num_epochs):
        if run.step >= total_steps:
            break
        train_loader.set_epoch(epoch)
        if skip_batches:
            # Starting an iterator draws from torch's global RNG. The uninterrupted run drew it before the
            # checkpoint was taken, so keep the restored RNG state untouched by this draw.
            rng_state = torch.get_rng_state()
            batches = iter(accelerator.skip_first_batches(train_loader, skip_batches))
            first = next(batches, None)  # the draw happens when the first batch is fetched
            torch.set_rng_state(rng_state)
            batches = itertools.chain([first] if first is not None else [], batches)
            skip_batches = 0
        else:
            batches = iter(train_loader)
        for batch in batches:
            batch.pop("phrase_type")
            with accelerator.accumulate(model):
                out = model(**batch)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            run.step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{out.loss.item():.3f}", l1=f"{out.loss_l1.item():.3f}")
            accelerator.log({"train/loss": out.loss.item(), "train/loss_l1": out.loss_l1.item(),
                             "train/loss_giou": out.loss_giou.item(), "lr": scheduler.get_last_lr()[-1]},
                            step=run.step)
            if args.checkpointing_steps and run.step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, run.step, args.checkpoints_total_limit, run.to_json())
            if args.crash_after_steps and run.step >= args.crash_after_steps:
                os._exit(3)  # no clean-up, like a killed process
            if run.step >= total_steps:
                break
        evaluate_epoch(model, val_loader, accelerator, run, epoch, chance, output_dir, args)
    progress.close()

    final = {}
    if accelerator.is_main_process:
        best = run.best
        unwrapped = accelerator.unwrap_model(model)
        save_adapter(unwrapped, output_dir / "final_adapter", args)
        final = {"best": best, "history": run.history, "chance": chance, "control": args.control,
                 "towers": {"vision": args.vision_model, "text": args.text_model},
                 "data": f"shapes benchmark (seed {args.data_seed}, {args.image_size}px)",
                 "elapsed_s": round(run.elapsed(), 1), "steps": run.step,
                 "args": {k: v for k, v in vars(args).items() if k != "config"}}
        write_json(output_dir / RESULTS_FILE, final)
        accelerator.print(f"best val Acc@0.5 = {100 * best['accuracy']:.2f}% (epoch {best.get('epoch')}); "
                          f"chance = {100 * chance:.1f}%; adapter in {output_dir / 'best_adapter'}")
        if args.push_to_hub:  # the best weights, with a model card recording towers, data and score
            set_peft_model_state_dict(unwrapped, load_file(output_dir / "best_adapter" / "adapter_model.safetensors"))
            unwrapped.card_results = (
                f"- Data: {final['data']}\n- Validation Acc@0.5: {100 * best['accuracy']:.2f}% "
                f"(mean IoU {best['mean_iou']:.3f}; chance {100 * chance:.1f}%)\n"
            )
            unwrapped.push_to_hub(args.hub_model_id)
    accelerator.end_training()
    return final


if __name__ == "__main__":
    main()
