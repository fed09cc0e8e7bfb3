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
from peft_m2ist.data import RECCollator, apply_control, chance_level
from peft_m2ist.data.sources import DataSource, load_report
from peft_m2ist.towers.quantization import quantized_modules, set_tower_dtype

logger = get_logger(__name__)


# ----------------------------------------------------------------------------------------------------- arguments
def build_parser() -> training.FlagParser:
    """The flags, one dataclass per group (towers, adapter: M2ISTConfig's fields, data, optimisation, output: see
    `peft_m2ist.training.arguments`), through `transformers.HfArgumentParser`; and `--config`."""
    return training.build_parser(description=__doc__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv` over the values of the YAML `--config` (if any), then check the flags together and the data
    flags against the files (filling their per-dataset defaults); exits with a usage error on bad values."""
    parser = build_parser()
    args = training.parse_args_with_config(parser, argv)
    training.check_args(parser, args)
    return args


# ---------------------------------------------------------------------------------------------- towers + adapter
def build_model(args: argparse.Namespace):
    vision, image_processor = pretrained.load_vision_tower(args.vision_model)
    if args.fold_frozen_batch_norms and (folded := fold_frozen_batch_norms(vision)):
        logger.info(f"folded {folded} frozen batch norms of the vision tower into its convolutions")
    if any(isinstance(m, torch.nn.Conv2d) for m in vision.modules()):
        vision.to(memory_format=torch.channels_last)  # same values; ~4x faster convolutions on CPU
    text, tokenizer = pretrained.load_text_tower(args.text_model)
    # a float dtype: .to(dtype); int8: weight-only int8 after the folding above, computing in float32
    pair = VisionTextPair(set_tower_dtype(vision, args.tower_dtype), set_tower_dtype(text, args.tower_dtype))
    if args.tower_dtype == "int8":
        logger.info(f"int8 tower weights: vision {quantized_modules(vision)}, text {quantized_modules(text)}")
    if args.adapter:
        model = PeftModel.from_pretrained(pair, args.adapter, is_trainable=not args.eval_only)
        if args.tower_micro_batch_size is not None:  # a run-time setting: the flag wins over the saved config
            model.peft_config[model.active_adapter].tower_micro_batch_size = args.tower_micro_batch_size
        model.peft_config[model.active_adapter].base_towers = towers_of(args)  # the towers it now trains / runs on
        return model, image_processor, tokenizer
    config = M2ISTConfig(**{name: getattr(args, name) for name in training.CONFIG_FLAGS}, image_size=args.image_size)
    config.base_towers = towers_of(args)  # saved in adapter_config.json: the towers to load the adapter on again
    return get_peft_model(pair, config), image_processor, tokenizer


def towers_of(args: argparse.Namespace) -> dict[str, str]:
    """`M2ISTConfig.base_towers`: the towers as the flags name them, saved in every adapter's `adapter_config.json`
    (and so pushed with it), from which `peft_m2ist.loading.load_adapter_with_towers` loads them again."""
    return {"vision": args.vision_model, "text": args.text_model, "dtype": args.tower_dtype}


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
        training.save_best(accelerator.unwrap_model(model), args.output_dir, run.best)


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
            loss = out.loss.item()  # read once: the monitor, the progress bar and the trackers
            collapse.update(loss, out.pred_boxes)
            if not accelerator.sync_gradients:
                continue
            run.step, run.skipped_steps = run.step + 1, guard.skipped
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.3f}", l1=f"{out.loss_l1.item():.3f}")
            accelerator.log({"train/loss": loss, "train/loss_l1": out.loss_l1.item(),
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
        training.save_adapter(unwrapped, output_dir / training.FINAL_ADAPTER)
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
        training.save_adapter(unwrapped, output_dir / training.BEST_ADAPTER)  # the best weights again, with the card
        if args.push_to_hub:
            unwrapped.push_to_hub(args.hub_model_id)
    accelerator.end_training()
    stop.release(lock)  # the signal handlers as they were, and the output folder free for the next run
    return final


if __name__ == "__main__":
    main()
