"""The machinery behind `examples/train_rec.py`, one job per module.

- `atomic`: JSON files and folders replaced whole or not at all (`write_json`, `read_json`, `replace_dir`).
- `checkpoints`: `OUTPUT/checkpoints/step_N` written whole, the newest few kept, `latest` resolved.
- `run_state`: what a checkpoint records besides accelerate's state, and where a resumed run picks up.
- `outputs`: the output folder: adapters (their towers recorded in their config), `best.json`, the check of a used
  folder, the free-space check.
- `lock`: one run at a time per output folder (`OUTPUT/.lock`, naming the holder), and a writable folder first.
- `divergence`: a non-finite loss or gradient norm stops the run (or skips the step); no broken best adapter.
- `signals`: SIGTERM / SIGINT save a checkpoint at the next step boundary and end the run.
- `feature_cache`: the memory-mapped disk cache of the frozen towers' outputs (once per image / expression).
- `config_file`: flag values from a YAML `--config` file, parsed under the command line and checked like it.
- `evaluation`: Acc@0.5, mean IoU and per-phrase-type accuracy, gathered across processes, per split.
- `results`: the per-split results in the paper's layout (`results.json`'s `splits`, the table `results.md`).
- `arguments`: the flags as dataclasses (the adapter's made from `M2ISTConfig`'s fields) for
  `transformers.HfArgumentParser`, and the checks across flags after parsing.
- `data_arguments`: the data flags, their per-dataset defaults and their checks against the files.
- `tracking`: which experiment trackers `--report_to` means.
- `collapse`: the mean-box baseline loss and the per-epoch "stuck" warnings (a collapsed model).
"""

from .arguments import (
    CONFIG_FLAGS,
    FlagParser,
    OptimisationArguments,
    OutputArguments,
    TowersArguments,
    adapter_arguments,
    build_parser,
    check_args,
)
from .atomic import fresh_tmp_dir, read_json, replace_dir, write_json
from .checkpoints import (
    CHECKPOINTS_DIR,
    RUN_STATE_FILE,
    checkpoint_dirs,
    checkpoint_step,
    drop_checkpoints_after,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    trainable_names,
)
from .collapse import CollapseMonitor, mean_box_baseline, training_labels
from .config_file import config_arguments, parse_args_with_config
from .data_arguments import IMAGE_SIZES, DataArguments, resolve_data_args
from .divergence import ON_NONFINITE, NonFiniteGuard, TrainingDiverged, check_finite_weights, is_new_best
from .evaluation import evaluate, evaluate_splits
from .feature_cache import (
    CACHE_SCOPES,
    CachedTowerFeatures,
    build_feature_cache,
    cached_loaders,
    feature_cache_message,
    preprocessing_of,
)
from .lock import LOCK_FILE, OutputLock, OutputLockedError, check_writable, claim_output_dir
from .output_dir import (
    BEST_ADAPTER,
    BEST_FILE,
    FINAL_ADAPTER,
    RESULTS_FILE,
    RUN_OUTPUTS,
    check_free_space,
    earlier_outputs,
    estimated_sizes,
    open_output_dir,
    prepare_output_dir,
    restore_best_adapter,
    save_adapter,
    save_best,
)
from .results import (
    RESULTS_TABLE_FILE,
    check_eval_only_output_dir,
    model_card_info,
    report_results,
    results_markdown,
    results_table,
    split_results,
    write_results,
)
from .run_state import RunState, epoch_to_evaluate_first, resumed_batches
from .schedule import STEP_DECAY, build_scheduler, check_schedule_args
from .signals import StopSignals
from .tracking import trackers

__all__ = [
    "BEST_ADAPTER",
    "BEST_FILE",
    "CACHE_SCOPES",
    "CHECKPOINTS_DIR",
    "CONFIG_FLAGS",
    "FINAL_ADAPTER",
    "IMAGE_SIZES",
    "LOCK_FILE",
    "ON_NONFINITE",
    "RESULTS_FILE",
    "RESULTS_TABLE_FILE",
    "RUN_OUTPUTS",
    "RUN_STATE_FILE",
    "STEP_DECAY",
    "CachedTowerFeatures",
    "CollapseMonitor",
    "DataArguments",
    "FlagParser",
    "NonFiniteGuard",
    "OptimisationArguments",
    "OutputArguments",
    "OutputLock",
    "OutputLockedError",
    "RunState",
    "StopSignals",
    "TowersArguments",
    "TrainingDiverged",
    "adapter_arguments",
    "build_feature_cache",
    "build_parser",
    "build_scheduler",
    "cached_loaders",
    "check_args",
    "check_eval_only_output_dir",
    "check_finite_weights",
    "check_free_space",
    "check_schedule_args",
    "check_writable",
    "checkpoint_dirs",
    "checkpoint_step",
    "claim_output_dir",
    "config_arguments",
    "drop_checkpoints_after",
    "earlier_outputs",
    "epoch_to_evaluate_first",
    "estimated_sizes",
    "evaluate",
    "evaluate_splits",
    "feature_cache_message",
    "fresh_tmp_dir",
    "is_new_best",
    "load_checkpoint",
    "mean_box_baseline",
    "model_card_info",
    "open_output_dir",
    "parse_args_with_config",
    "prepare_output_dir",
    "preprocessing_of",
    "read_json",
    "replace_dir",
    "report_results",
    "resolve_checkpoint",
    "resolve_data_args",
    "restore_best_adapter",
    "results_markdown",
    "results_table",
    "resumed_batches",
    "save_adapter",
    "save_best",
    "save_checkpoint",
    "split_results",
    "trackers",
    "trainable_names",
    "training_labels",
    "write_json",
    "write_results",
]
