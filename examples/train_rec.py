"""Train an M2IST adapter for referring expression comprehension with 🤗 Accelerate.

    accelerate launch examples/train_rec.py                              # offline default towers + shapes benchmark
    accelerate launch examples/train_rec.py --config examples/configs/default.yaml --num_epochs 3
    accelerate launch examples/train_rec.py --dataset refer --data_root data/refer --dataset_name refcoco ...
    accelerate launch --multi_gpu --num_processes 2 examples/train_rec.py ...               # data-parallel on GPUs
    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 examples/train_rec.py ...  # ... or on CPU

Reads top to bottom, one phase a screen: arguments (every flag can also be set in a YAML file, `--config`; flags
given on the command line win) -> towers + adapter -> data -> evaluation -> main: accelerator and output folder,
optimiser, resume, the train/evaluate loop with checkpoints, and the report (+ push to the Hub). Data: the shapes
benchmark or real data (docs/real-data.md); every --eval_splits split is evaluated after each epoch, the best adapter
chosen on the first and re-evaluated on all at the end (OUTPUT/results.json's "splits", OUTPUT/results.md).

The machinery (checkpoints, resume, the output folder and its lock, divergence and SIGTERM handling, the feature
cache, evaluation, results, the flags) lives in `peft_m2ist.training`: docs/training.md, docs/reliability.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, broadcast_object_list, set_seed
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from peft_m2ist import M2ISTConfig, VisionTextPair, fold_frozen_batch_norms, pretrained, training
from peft_m2ist.data import CONTROLS, RECCollator, apply_control, chance_level
from peft_m2ist.data.sources import DataSource, load_report
from peft_m2ist.pretrained.towers_file import towers_record

logger = get_logger(__name__)


# ----------------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=str, default=None, help="YAML file of flag values (flags on the CLI win).")
    on_off = argparse.BooleanOptionalAction
    g = p.add_argument_group("towers")
    towers = "Hub id, local folder or offline:* name."
    g.add_argument("--vision_model", default=pretrained.DEFAULT_VISION_TOWER, help=towers)
    g.add_argument("--text_model", default=pretrained.DEFAULT_TEXT_TOWER, help=towers)
    g.add_argument("--tower_dtype", choices=sorted(pretrained.TOWER_DTYPES), default="float32",
                   help="The frozen towers' dtype: bfloat16/float16 halve their weights and the feature cache.")
    g.add_argument("--fold_frozen_batch_norms", action=on_off, default=True,
                   help="Fold a DETR-family vision tower's frozen batch norms into its convolutions (same features).")
    g = p.add_argument_group("adapter", "M2ISTConfig's fields of the same names, with its defaults (docs/config.md).")
    g.add_argument("--adapter", default=None, help="Start from (or, with --eval_only, evaluate) a saved adapter.")
    training.add_config_arguments(g)  # training.CONFIG_FLAGS: default, type, choices and help from M2ISTConfig
    g = p.add_argument_group("data", "See docs/real-data.md for each --dataset's files and standard splits.")
    training.add_data_arguments(g)  # --dataset, its sources, --train_split, --eval_splits, --on_bad_record, ...
    g.add_argument("--data_seed", type=int, default=0, help="Seed of the built-in shapes benchmark.")
    g.add_argument("--image_size", type=int, default=None, help="Canvas side (default 128 for shapes, 640 real data).")
    g.add_argument("--train_samples", type=int, default=None, help="Use only the first N training rows.")
    g.add_argument("--eval_samples", type=int, default=None, help="Use only the first N rows of each eval split.")
    g.add_argument("--control", choices=CONTROLS, default="none",
                   help="Hide one modality in every split (the benchmark's controls).")
    g.add_argument("--augment", action=on_off, default=None, help="TransVG's training augmentation (random resize/"
                   "crop, colour jitter, flip swapping left/right). Default: on for real data, off for shapes.")
    g.add_argument("--cache_dir", default=None, help="Where the benchmark build is cached.")
    g.add_argument("--cache_features", action=on_off, default=None,
                   help="Run the frozen towers once per sample and train on their cached outputs. Default: on "
                   "without --augment, off with it (its images change every epoch: giving both is an error).")
    g.add_argument("--feature_cache_dir", default=None, help="Where the tower-feature cache is written, memory-mapped "
                   "by every process (default: OUTPUT/feature_cache); runs with the same towers and data reuse it.")
    g.add_argument("--feature_cache_scope", choices=training.CACHE_SCOPES, default="global", help="global: one cache "
                   "in a folder all machines share; node: one per machine, --feature_cache_dir on its own disk.")
    g = p.add_argument_group("optimisation")
    g.add_argument("--seed", type=int, default=13)
    g.add_argument("--num_epochs", type=int, default=8)
    g.add_argument("--max_train_steps", type=int, default=None, help="Stop after this many optimiser steps.")
    g.add_argument("--batch_size", type=int, default=32, help="Per process.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--lr_head", type=float, default=1e-4, help="Projections, [REG], position embedding, head.")
    g.add_argument("--lr_adapter", type=float, default=1e-4, help="The M3ISA experts.")
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g.add_argument("--lr_scheduler", default="cosine", help="Any transformers scheduler name, or 'step' (x0.1 at "
                   "epoch --lr_drop_epoch, the authors').")
    g.add_argument("--lr_drop_epoch", type=int, default=None, help="--lr_scheduler step: the epoch of the drop.")
    g.add_argument("--warmup_ratio", type=float, default=0.05)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--on_nonfinite", choices=training.ON_NONFINITE, default="stop",
                   help="A non-finite loss or gradient norm: 'stop' the run (default) or 'skip' that step.")
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
    g.add_argument("--eval_only", action="store_true",
                   help="Evaluate --adapter on every --eval_splits split, write results.json/.md and stop.")
    g.add_argument("--report_to", default="auto", help="'auto' (tensorboard or trackio if installed), 'none', ...")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv` over the values of the YAML `--config` (if any); exits with a usage error on bad values."""
    parser = build_parser()
    args = training.parse_args_with_config(parser, argv)
    training.check_schedule_args(parser, args)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    if args.eval_only and not args.adapter:
        parser.error("--eval_only needs --adapter")
    if args.overwrite_output_dir and args.resume_from_checkpoint == "latest":
        parser.error("--overwrite_output_dir would delete the checkpoints --resume_from_checkpoint latest resumes")
    try:  # the data flags against the files, before anything loads (towers included); fills per-dataset defaults
        training.resolve_data_args(args)
        if args.eval_only:  # it writes results.json/.md into --output_dir: not into a training run's
            training.check_eval_only_output_dir(args.output_dir)
    except ValueError as error:
        parser.error(str(error))
    if args.cache_features is None:  # auto: cache the towers' outputs unless augmentation changes the images
        args.cache_features = not args.augment
    elif args.augment and args.cache_features:
        parser.error("--augment changes the images every epoch, so their tower features cannot be cached: "
                     "drop --cache_features (or cache_features in the --config file), or pass --no-cache_features")
    return args


# ---------------------------------------------------------------------------------------------- towers + adapter
def build_model(args: argparse.Namespace):
    vision, image_processor = pretrained.load_vision_tower(args.vision_model)
    if args.fold_frozen_batch_norms and (folded := fold_frozen_batch_norms(vision)):
        logger.info(f"folded {folded} frozen batch norms of the vision tower into its convolutions")
    if any(isinstance(m, torch.nn.Conv2d) for m in vision.modules()):
        vision.to(memory_format=torch.channels_last)  # same values; ~4x faster convolutions on CPU
    text, tokenizer = pretrained.load_text_tower(args.text_model)
    vision.to(pretrained.TOWER_DTYPES[args.tower_dtype])
    text.to(pretrained.TOWER_DTYPES[args.tower_dtype])
    pair = VisionTextPair(vision, text)
    if args.adapter:
        model = PeftModel.from_pretrained(pair, args.adapter, is_trainable=not args.eval_only)
        if args.tower_micro_batch_size is not None:  # a run-time setting: the flag wins over the saved config
            model.peft_config[model.active_adapter].tower_micro_batch_size = args.tower_micro_batch_size
        return model, image_processor, tokenizer
    config = M2ISTConfig(**{name: getattr(args, name) for name in training.CONFIG_FLAGS}, image_size=args.image_size)
    return get_peft_model(pair, config), image_processor, tokenizer


def parameter_groups(model, args: argparse.Namespace) -> list[dict]:
    """Experts (`...m2ist_side.<adapter>.blocks.*`) at `lr_adapter`; projections and head at `lr_head`."""
    experts, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (experts if ".blocks." in name else rest).append(param)
    return [{"params": experts, "lr": args.lr_adapter}, {"params": rest, "lr": args.lr_head}]


# ---------------------------------------------------------------------------------------------------------- data
def build_data(args: argparse.Namespace, image_processor, tokenizer):
    """The training loader (None with --eval_only), a loader per --eval_splits split, and what was read (`info`:
    the data, each split's reader report, the chance level of the shapes benchmark)."""
    source = DataSource.from_flags(vars(args))  # checked by parse_args
    names = ([] if args.eval_only else [args.train_split]) + args.eval_splits
    loaded = {name: source.load(name) for name in dict.fromkeys(names)}  # each reader logs what it kept and skipped

    def loader(split: str, limit: int | None, train: bool) -> DataLoader:
        data = loaded[split].dataset
        data = apply_control(data.select(range(min(limit, len(data)))) if limit else data, args.control)
        collator = RECCollator.from_image_processor(tokenizer, image_processor, train=train and args.augment,
                                                    image_size=args.image_size, max_text_tokens=args.max_text_tokens)
        return DataLoader(data, batch_size=args.batch_size, shuffle=train, collate_fn=collator,
                          num_workers=args.num_workers)

    train = None if args.eval_only else loader(args.train_split, args.train_samples, True)
    evals = {split: loader(split, args.eval_samples, False) for split in args.eval_splits}
    info = {"data": f"{source.describe()}, {args.image_size}px",
            "load_reports": {name: load_report(result.report) for name, result in loaded.items()}}
    if source.dataset == "shapes":
        info["chance"] = chance_level(evals[args.eval_splits[0]].dataset)
    return train, evals, info


# ---------------------------------------------------------------------------------------------------- evaluation
def evaluate_epoch(model, eval_loaders: dict, accelerator: Accelerator, run: training.RunState, epoch: int,
                   info: dict, args: argparse.Namespace) -> None:
    """Evaluate every eval split after `epoch`; the main process records the scores in `run` and saves a new best
    adapter, chosen on the first split."""
    scores = training.evaluate_splits(model, eval_loaders, accelerator, desc=f"eval epoch {epoch}")
    run.evaluated_epoch = epoch
    if not accelerator.is_main_process:
        return
    first = args.eval_splits[0]
    run.history.append({"epoch": epoch, "step": run.step, **scores[first], "split": first, "splits": scores})
    chance = f", chance {100 * info['chance']:.1f}%" if "chance" in info else ""
    accelerator.print(f"epoch {epoch}: " + ", ".join(f"{name} Acc@0.5 = {100 * s['accuracy']:.2f}%"
                                                      for name, s in scores.items())
                      + f" (mean IoU {scores[first]['mean_iou']:.3f} on {first}{chance})")
    accelerator.log({f"{name}/{k}": v for name, s in scores.items() for k, v in s.items()}, step=run.step)
    if training.is_new_best(scores[first], run.best):  # a real evaluation, better than the best so far
        run.best = {"epoch": epoch, "step": run.step, "split": first, **scores[first]}
        training.save_best(accelerator.unwrap_model(model), args.output_dir, run.best, towers_of(args))


def towers_of(args: argparse.Namespace) -> dict[str, str]:
    """What `towers.json` records next to each adapter (and the inference API reloads)."""
    return towers_record(args.vision_model, args.text_model, args.tower_dtype)


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    started = time.monotonic()
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=training.trackers(args.report_to),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    set_seed(args.seed)

    lock, checkpoint, run = None, None, training.RunState(started=started)
    if not args.eval_only:  # before anything loads: OUTPUT checked and locked (.lock) until the run ends
        lock, checkpoint, run = training.open_output_dir(output_dir, args.resume_from_checkpoint,
                                                         args.overwrite_output_dir, accelerator, started)

    model, image_processor, tokenizer = build_model(args)
    with accelerator.main_process_first():  # the first process builds and caches the benchmark
        train_loader, eval_loaders, info = build_data(args, image_processor, tokenizer)

    if args.eval_only:  # every eval split, written as results.json / results.md like a training run's
        # a frozen model: no DistributedDataParallel wrapper (it refuses a module without trainable parameters)
        model = accelerator.prepare_model(model, evaluation_mode=True)
        loaders = {name: accelerator.prepare(loader) for name, loader in eval_loaders.items()}
        splits = training.split_results(training.evaluate_splits(model, loaders, accelerator))
        final = training.report_results(accelerator, args, {"adapter": args.adapter, "splits": splits, **info,
                                           "processes": accelerator.num_processes}, f"{args.adapter} on {info['data']}")
        accelerator.end_training()  # the process group destroyed before exit, as after training
        return final

    # ---- optimiser: two learning rates, a scheduler over the whole run, everything handed to accelerate
    if accelerator.is_main_process:
        model.print_trainable_parameters()
        model.print_parameter_counts()
    logger.info(training.feature_cache_message(args.cache_features, args.augment))
    if args.cache_features:  # run the frozen towers once; train the side network on their cached outputs
        train_loader, eval_loaders = training.cached_loaders(
            model, train_loader, eval_loaders, accelerator, args.batch_size,
            args.feature_cache_dir or output_dir / "feature_cache", training.preprocessing_of(vars(args)),
            args.feature_cache_scope)
    # the loss of always predicting the training set's mean box: the plateau a collapsed model sits on
    collapse = training.CollapseMonitor.for_training(train_loader.dataset, model.peft_config[model.active_adapter])
    logger.info(collapse.baseline_message())
    optimizer = torch.optim.AdamW(parameter_groups(model, args), weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / args.gradient_accumulation_steps)
    total_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = training.build_scheduler(args, optimizer, total_steps, steps_per_epoch)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    eval_loaders = {name: accelerator.prepare(loader) for name, loader in eval_loaders.items()}
    training.check_free_space(output_dir, model, accelerator, keep=args.checkpoints_total_limit,
                              every=args.checkpointing_steps, steps=total_steps)
    guard = training.NonFiniteGuard(args.on_nonfinite, accelerator, optimizer, skipped=run.skipped_steps)
    stop = training.StopSignals().install()  # SIGTERM / SIGINT: a checkpoint at the next step boundary, then exit
    if accelerator.trackers:
        accelerator.init_trackers("m2ist", config={k: v for k, v in vars(args).items() if v is not None})

    # ---- resume: trainable weights, optimiser, scheduler, RNG states, sampler; then run_state.json and best adapter
    start_epoch, skip_batches = 0, 0
    if checkpoint is not None:
        training.load_checkpoint(accelerator, checkpoint)  # the frozen towers are those build_model loaded
        if accelerator.is_main_process:
            training.restore_best_adapter(checkpoint, output_dir, run.best)
        start_epoch, skip_batches = run.position(steps_per_epoch, args.gradient_accumulation_steps)
        accelerator.print(f"Resumed from {checkpoint} (step {run.step}, epoch {start_epoch}).")
        unevaluated = training.epoch_to_evaluate_first(run.step, steps_per_epoch, total_steps, run.evaluated_epoch)
        if unevaluated is not None:
            evaluate_epoch(model, eval_loaders, accelerator, run, unevaluated, info, args)

    # ---- train and evaluate, a checkpoint every --checkpointing_steps optimiser steps
    progress = tqdm(total=total_steps, initial=run.step, desc="train", disable=not accelerator.is_local_main_process)
    model.train()
    for epoch in range(start_epoch, num_epochs):
        if run.step >= total_steps:
            break
        train_loader.set_epoch(epoch)
        for batch in training.resumed_batches(accelerator, train_loader, skip_batches):
            batch.pop("phrase_type")
            with accelerator.accumulate(model):
                out = model(**batch)
                accelerator.backward(out.loss)
                if guard.check(out.loss, model.parameters(), args.max_grad_norm, run.step + 1):  # clips, or stops
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            collapse.update(out.loss, out.pred_boxes)
            if not accelerator.sync_gradients:
                continue
            run.step, run.skipped_steps = run.step + 1, guard.skipped
            progress.update(1)
            progress.set_postfix(loss=f"{out.loss.item():.3f}", l1=f"{out.loss_l1.item():.3f}")
            accelerator.log({"train/loss": out.loss.item(), "train/loss_l1": out.loss_l1.item(),
                             "train/loss_giou": out.loss_giou.item(), "lr": scheduler.get_last_lr()[-1]},
                            step=run.step)
            if stop.requested(accelerator) or (args.checkpointing_steps and run.step % args.checkpointing_steps == 0):
                saved = training.save_checkpoint(accelerator, output_dir, run.step, args.checkpoints_total_limit,
                                                 run.to_json(), copy_in=[output_dir / training.BEST_ADAPTER])
                stop.exit_if_requested(accelerator, saved, lock)  # SIGTERM / SIGINT: saved, exit code 143 / 130
            if run.step >= total_steps:
                break
        skip_batches = 0
        for warning in collapse.end_epoch(epoch)["warnings"].values():  # "stuck: ..." (training.collapse)
            logger.warning(warning)
        evaluate_epoch(model, eval_loaders, accelerator, run, epoch, info, args)
    progress.close()

    # ---- save and report: the final adapter; the best adapter re-evaluated on every eval split (results.json,
    # results.md); the best adapter to the Hub
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        training.save_adapter(unwrapped, output_dir / training.FINAL_ADAPTER, towers_of(args))
    accelerator.wait_for_everyone()
    # the main process chose the best adapter; every process takes part in re-evaluating it
    best, first, splits = broadcast_object_list([run.best])[0], args.eval_splits[0], {}
    if best:  # the best adapter, re-evaluated on every eval split
        set_peft_model_state_dict(unwrapped, load_file(output_dir / training.BEST_ADAPTER / "adapter_model.safetensors"))
        splits = training.split_results(training.evaluate_splits(model, eval_loaders, accelerator, desc="best adapter"))
    final = training.report_results(accelerator, args, {"best": best, "splits": splits, "history": run.history, **info,
                                       "control": args.control, "elapsed_s": round(run.elapsed(), 1), "steps": run.step,
                                       "mean_box_baseline": collapse.baseline, "collapse_checks": collapse.epochs},
                   f"Best adapter (epoch {best['epoch']}, chosen on {first}) on {info['data']}" if best else
                   "no best adapter: every evaluation found no box (diverged? lower the learning rate)")
    if accelerator.is_main_process and best:
        accelerator.print(f"best {first} Acc@0.5 = {100 * best['accuracy']:.2f}% (epoch {best.get('epoch')}); "
                          f"adapter in {output_dir / training.BEST_ADAPTER}")
        unwrapped.model_card_info = training.model_card_info(info["data"], splits)  # the card: data, command, scores
        training.save_adapter(unwrapped, output_dir / training.BEST_ADAPTER, towers_of(args))  # the best weights again
        if args.push_to_hub:
            unwrapped.push_to_hub(args.hub_model_id)
    accelerator.end_training()
    stop.release(lock)  # the signal handlers as they were, and the output folder free for the next run
    return final


if __name__ == "__main__":
    main()
