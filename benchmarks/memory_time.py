"""Training memory (exact account, and the CUDA peak on a GPU), training-step time and inference latency of every
tuning method on one backbone pair, all measured in one process.

    python benchmarks/memory_time.py --scale paper      # DETR-R50 encoder + BERT-base, 640 px, batch 2 on CPU
    python benchmarks/memory_time.py --scale default    # MobileNetV2 + MiniLM-L6, 128 px

Writes `benchmarks/results/memory_time_<scale>_<device>.json` (or `--output`) and prints the tables.
`python benchmarks/report.py` turns the JSON files into `benchmarks/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `benchmarks` and the library

import peft_m2ist
from benchmarks import baselines, environment, measurement, scales, timing


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=("paper", "default"), default="paper")
    p.add_argument("--methods", nargs="+", default=list(baselines.ALL_METHODS), choices=baselines.ALL_METHODS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="timing batch (default: 2 on CPU, 64 on a GPU)")
    p.add_argument("--account-batches", type=int, nargs="+", default=None,
                   help="batches of the exact account (default: 1 and --batch-size on CPU, --batch-size on a GPU)")
    p.add_argument("--extrapolate-to", type=int, default=64, help="batch the exact account is extrapolated to")
    p.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds of training steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before them")
    p.add_argument("--inference-repeats", type=int, default=5)
    p.add_argument("--bottleneck", type=int, default=128)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--head-dropout", type=float, default=0.1,
                   help="dropout of every method's grounding head (0.1: TransVG / the paper; 0 lets the attention "
                        "use a fused kernel that keeps no attention probabilities on CPU)")
    p.add_argument("--head-checkpointing", action="store_true",
                   help="gradient checkpointing in every method's grounding head (M2ISTConfig."
                        "head_gradient_checkpointing; the baselines' heads alike)")
    p.add_argument("--store-head-feed-forward", action="store_true",
                   help="every method's grounding head stores its feed-forward hidden tensors for backward instead of "
                        "recomputing them (M2ISTConfig.head_recompute_feed_forward=False; the baselines' heads alike)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for forward (on the run's device)")
    p.add_argument("--tf32", action="store_true",
                   help="TF32 for float32 matmuls too (`torch.set_float32_matmul_precision('high')`; CUDA only): by "
                        "default torch runs float32 convolutions on TF32 tensor cores but matmuls in full float32")
    p.add_argument("--channels-last", action="store_true",
                   help="the vision tower's weights in channels-last memory format, so its convolutions run "
                        "channels-last (every method alike; what examples/train_rec.py does for convolutional towers)")
    p.add_argument("--cached-features", action=argparse.BooleanOptionalAction, default=True,
                   help="also time each M2IST step from precomputed tower features (`forward(tower_features=...)`, "
                        "what train_rec's feature cache does after its first pass; reported apart, not like for like)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; timing rounds stop when the budget is spent (the JSON is written after each phase)")
    p.add_argument("--skip", nargs="*", default=[], choices=("account", "live_peak", "cuda_peak", "time", "inference"))
    norms = p.add_mutually_exclusive_group()
    norms.add_argument("--stock-batch-norm", action="store_true",
                       help="keep the vision tower's frozen batch norms as they are (two ops each) instead of folding "
                            "them into the convolutions before them (`peft_m2ist.fold_frozen_batch_norms`, the "
                            "default, for every method alike)")
    norms.add_argument("--unfolded-batch-norm", action="store_true",
                       help="fuse the vision tower's frozen batch norms into one op each "
                            "(`peft_m2ist.fuse_frozen_batch_norms`) but do not fold them into the convolutions")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None)
    return p.parse_args(argv)


def run(args: argparse.Namespace, log=print) -> dict:
    start = time.perf_counter()
    # The global budget: training-step rounds stop at 65% of it, inference rounds at 100% (model building included).
    deadline = start + args.time_budget if args.time_budget else None
    time_deadline = start + 0.65 * args.time_budget if args.time_budget else None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch_size = args.batch_size or (64 if cuda else 2)
    account_batches = args.account_batches or ([batch_size] if cuda else sorted({1, batch_size}))
    autocast = None
    if args.bf16:
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)

    if args.tf32:
        if not cuda:
            raise SystemExit("--tf32 is for CUDA runs")
        torch.set_float32_matmul_precision("high")

    suffix = "" if args.head_dropout == 0.1 else f"_headdrop{args.head_dropout:g}"
    suffix += "_bf16" if args.bf16 else ""
    suffix += "_headckpt" if args.head_checkpointing else ""
    suffix += "_storedffn" if args.store_head_feed_forward else ""
    suffix += "_stockbn" if args.stock_batch_norm else ""
    suffix += "_unfoldedbn" if args.unfolded_batch_norm else ""
    suffix += "_channelslast" if args.channels_last else ""
    out_path = args.output or environment.RESULTS_DIR / f"memory_time_{args.scale}_{device.type}{suffix}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)

    log(f"building the {args.scale} pair ...")
    norms = "stock" if args.stock_batch_norm else "fused" if args.unfolded_batch_norm else "folded"
    scale = scales.build_scale(args.scale, args.seed, frozen_batch_norm=norms)
    if args.channels_last:
        scale.vision.to(memory_format=torch.channels_last)
    folded = sum(isinstance(m, peft_m2ist.FrozenBatchNormFoldedConv2d) for m in scale.vision.modules())
    fused = sum(type(m) is peft_m2ist.FusedFrozenBatchNorm2d for m in scale.vision.modules())
    num_vision_tokens = baselines.count_vision_tokens(scale.vision, scale.image_size)
    result = {
        "kind": "memory_time",
        "scale": args.scale,
        "scale_description": scale.description,
        "command": environment.command_line(),
        "machine": environment.machine_info(device),
        "settings": {
            "batch_size": batch_size, "account_batches": account_batches, "extrapolate_to": args.extrapolate_to,
            "repeats": args.repeats, "warmup": args.warmup, "inference_repeats": args.inference_repeats,
            "bottleneck": args.bottleneck, "lora_rank": args.lora_rank, "bf16": args.bf16, "tf32": args.tf32,
            "channels_last": args.channels_last,
            "time_budget_s": args.time_budget, "head_dropout": args.head_dropout,
            "head_checkpointing": args.head_checkpointing,
            "frozen_batch_norm": (f"folded into the convolutions before them ({folded} modules)" if folded
                                  else f"fused ({fused} modules)" if fused else "stock"),
            "head_feed_forward": ("hidden stored" if args.store_head_feed_forward else "hidden recomputed")
            + " (peft_m2ist.modeling.feed_forward.LeanFeedForwardEncoderLayer)",
            "image_size": scale.image_size, "text_tokens": scale.text_tokens, "vision_tokens": num_vision_tokens,
            "optimizer": "AdamW(lr=1e-4, weight_decay=1e-4), fp32 parameters",
            "activations_note": "storages packed by saved_tensors_hooks during forward, each counted once; storages "
                                "of parameters and buffers excluded (they are in `weights`, counted once)",
        },
        "methods": {},
    }

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - start
        out_path.write_text(json.dumps(result, indent=2))

    models, optims = {}, {}
    for name in args.methods:
        model = baselines.build_method(name, scale, args.seed, args.bottleneck, args.lora_rank, num_vision_tokens,
                               args.head_dropout,
                               head_gradient_checkpointing=args.head_checkpointing,
                               head_recompute_feed_forward=not args.store_head_feed_forward).to(device)
        models[name], optims[name] = model, measurement.make_optimizer(model)
        result["methods"][name] = {"note": model.method_note, "params": baselines.parameter_counts(model)}
        log(f"  {name}: {result['methods'][name]['params']['trainable']:,} trainable parameters")
    save()

    # -- 1. exact account -------------------------------------------------------------------------------------------
    if "account" not in args.skip:
        log("exact account ...")
        for name in args.methods:
            accounts = {}
            for b in account_batches:
                batch = scales.make_batch(scale, b, device, args.seed)
                accounts[str(b)] = measurement.exact_account(models[name], optims[name], batch, autocast)
            entry = result["methods"][name]
            entry["account"] = accounts
            if len(account_batches) >= 2 and args.extrapolate_to not in account_batches:
                b0, b1 = account_batches[0], account_batches[-1]
                entry["account_extrapolated"] = measurement.extrapolate(accounts[str(b0)], accounts[str(b1)], b0, b1,
                                                              args.extrapolate_to)
            log(f"  {name}: " + ", ".join(f"b={b}: total {environment.mib(a['total'])} MiB "
                                          f"(activations {environment.mib(a['activations'])})" for b, a in accounts.items()))
        _ratios(result, account_batches, args.extrapolate_to)
        save()

    # -- 2. peaks: of live tensors (any device), and the CUDA allocator's -------------------------------------------
    peak_batch = account_batches[-1] if not cuda else batch_size
    micro = max(1, peak_batch // 4)  # M2IST's frozen towers in 4 micro-batches (M2ISTConfig.tower_micro_batch_size)
    for key, measure, wanted in (("live_peak", measurement.live_peak, "live_peak" not in args.skip),
                                 ("cuda_peak", measurement.cuda_peak, cuda and "cuda_peak" not in args.skip)):
        if not wanted:
            continue
        log(f"{key} (batch {peak_batch}; M2IST also with tower micro-batches of {micro}) ...")
        batch = scales.make_batch(scale, peak_batch, device, args.seed)
        for name in args.methods:
            runs = [(key, None)] + ([(key + "_tower_micro_batches", micro)] if name.startswith("m2ist_") else [])
            for entry_key, size in runs:
                with measurement.tower_micro_batches(models[name], size) if size else nullcontext():
                    peak = _guarded_peak(measure, models[name], optims[name], batch, autocast)
                peak["batch_size"] = peak_batch
                if size:
                    peak["tower_micro_batch_size"] = size
                result["methods"][name][entry_key] = peak
                log(f"  {name}{f' (micro-batches of {size})' if size else ''}: "
                    + (f"training memory {environment.mib(peak.get('training_memory'))} MiB, peak at {peak.get('peak_op')}"
                       if "error" not in peak else peak["error"]))
        full = result["methods"].get("full", {}).get(key, {}).get("training_memory")
        lora = result["methods"].get("lora", {}).get(key, {}).get("training_memory")
        for entry in result["methods"].values():
            for entry_key in (key, key + "_tower_micro_batches"):
                mem = entry.get(entry_key, {}).get("training_memory")
                if mem is not None:
                    entry[entry_key]["ratio_to_full"] = mem / full if full else None
                    entry[entry_key]["ratio_to_lora"] = mem / lora if lora else None
        save()

    # -- 3. training-step time ----------------------------------------------------------------------------------------
    if "time" not in args.skip:
        log(f"training-step time (batch {batch_size}, {args.warmup} warm-up + {args.repeats} interleaved rounds) ...")
        batch = scales.make_batch(scale, batch_size, device, args.seed)
        tasks = {name: (lambda m=models[name], o=optims[name]: measurement.train_step(m, o, batch, autocast))
                 for name in args.methods}
        if args.cached_features:
            tasks.update(_cached_feature_tasks(models, optims, batch, autocast))
        cpu_times: dict[str, list[float]] = {}
        times = timing.interleaved_times(tasks, args.repeats, args.warmup, device, time_deadline, log, cpu_times)
        full = timing.median(times.get("full", []))
        full_cpu = timing.median(cpu_times.get("full", []))
        for task, values in times.items():
            key = "step_time_cached_features" if task.endswith(CACHED) else "step_time"
            med = timing.median(values)
            med_cpu = timing.median(cpu_times.get(task, []))
            result["methods"][task.removesuffix(CACHED)][key] = {
                "batch_size": batch_size, "times_s": values, "median_s": med,
                "ratio_to_full": med / full if (med is not None and full) else None,
                "cpu_times_s": cpu_times.get(task, []), "median_cpu_s": med_cpu,
                "cpu_ratio_to_full": med_cpu / full_cpu if (med_cpu is not None and full_cpu) else None,
            }
        for o in optims.values():
            o.zero_grad(set_to_none=True)
        save()

    # -- 4. inference latency -----------------------------------------------------------------------------------------
    if "inference" not in args.skip:
        log(f"inference latency (batch {batch_size}) ...")
        batch = scales.make_batch(scale, batch_size, device, args.seed)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        towers = (scale.vision.to(device), scale.text.to(device))

        def towers_only():
            baselines.run_towers(*towers, inputs)

        def predict(model):
            model.eval()
            with torch.no_grad(), (autocast() if autocast else nullcontext()):
                return model(**inputs).pred_boxes

        tasks = {"towers_only": towers_only}
        tasks.update({name: (lambda m=models[name]: predict(m)) for name in args.methods
                      if name == "head_only" or name.startswith("m2ist_")})
        cpu_times = {}
        times = timing.interleaved_times(tasks, args.inference_repeats, args.warmup, device, deadline, log, cpu_times)
        base = timing.median(times["towers_only"])
        base_cpu = timing.median(cpu_times.get("towers_only", []))
        result["inference"] = {
            name: {"times_s": values, "median_s": timing.median(values),
                   "ratio_to_towers": timing.median(values) / base if (values and base) else None,
                   "cpu_times_s": cpu_times.get(name, []),
                   "cpu_ratio_to_towers": (timing.median(cpu_times[name]) / base_cpu
                                           if (cpu_times.get(name) and base_cpu) else None)}
            for name, values in times.items()
        }
        result["inference_batch_size"] = batch_size
        save()

    result["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
    result["finished"] = True
    save()
    log(format_tables(result))
    log(f"wrote {out_path}")
    return result


def _guarded_peak(measure, model, optimizer, batch, autocast) -> dict:
    """`measure(...)`, or `{"error": ...}` when the card runs out of memory (the run goes on with the next method)."""
    try:
        return measure(model, optimizer, batch, autocast)
    except torch.OutOfMemoryError as err:
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return {"error": f"out of memory: {err}".splitlines()[0]}


CACHED = "+cached"  # suffix of the timing task that trains an M2IST model from precomputed tower features


def _cached_feature_tasks(models: dict, optims: dict, batch: dict, autocast) -> dict:
    """One timing task per M2IST model: a training step from its tower features, computed once beforehand.

    This is the step train_rec runs after its first pass when `--cache_features` is on (the default without
    augmentation): the frozen towers' forward is skipped, which full fine-tuning, LoRA and in-tower adapters cannot do.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    tasks = {}
    for name, model in models.items():
        if not name.startswith("m2ist_"):
            continue
        with autocast() if autocast is not None else nullcontext():
            features = model.encode_towers(**inputs)
        cached_batch = {"tower_features": features, "labels": batch["labels"]}
        tasks[name + CACHED] = lambda m=model, o=optims[name], b=cached_batch: measurement.train_step(m, o, b, autocast)
    return tasks


def _ratios(result: dict, account_batches: list[int], extrapolate_to: int) -> None:
    methods = result["methods"]
    b = str(account_batches[-1])
    for key, get in (("ratio_to_full", lambda e: e["account"][b]["total"]),
                     ("activations_ratio_to_full", lambda e: e["account"][b]["activations"])):
        full = get(methods["full"]) if "full" in methods else None
        lora = get(methods["lora"]) if "lora" in methods else None
        for entry in methods.values():
            entry["account"][b][key] = get(entry) / full if full else None
            entry["account"][b][key.replace("full", "lora")] = get(entry) / lora if lora else None
    if all("account_extrapolated" in e for e in methods.values()):
        full = methods.get("full", {}).get("account_extrapolated", {}).get("total")
        lora = methods.get("lora", {}).get("account_extrapolated", {}).get("total")
        for entry in methods.values():
            ext = entry["account_extrapolated"]
            ext["batch_size"] = extrapolate_to
            ext["ratio_to_full"] = ext["total"] / full if full else None
            ext["ratio_to_lora"] = ext["total"] / lora if lora else None


def _fmt(x, spec=".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def format_tables(result: dict) -> str:
    """Plain-text tables of one result file (the same numbers `report.py` renders as Markdown)."""
    lines = [f"== {result['scale']}: {result['scale_description']} ({result['machine']['device']}) =="]
    methods = result["methods"]
    b = str(result["settings"]["account_batches"][-1])
    if any("account" in e for e in methods.values()):
        lines.append(f"{'method':<28}{'trainable':>12}{'adapter':>11}{'weights':>10}{'grad+opt':>10}"
                     f"{'acts@' + b:>10}{'total@' + b:>10}{'x full':>8}{'total@64':>11}{'x full':>8}{'x LoRA':>8}"
                     "  (MiB)")
        for name, e in methods.items():
            a, x = e["account"][b], e.get("account_extrapolated", {})
            lines.append(
                f"{name:<28}{e['params']['trainable']:>12,}{e['params'].get('adapter_only', 0):>11,}"
                f"{environment.mib(a['weights']):>10}{environment.mib(a['grads'] + a['optimizer']):>10}{environment.mib(a['activations']):>10}"
                f"{environment.mib(a['total']):>10}{_fmt(a.get('ratio_to_full')):>8}{environment.mib(x.get('total')):>11}"
                f"{_fmt(x.get('ratio_to_full')):>8}{_fmt(x.get('ratio_to_lora')):>8}")
    if any("step_time" in e for e in methods.values()):
        lines.append(f"{'method':<28}{'median step (s)':>16}{'x full':>8}")
        for name, e in methods.items():
            t = e.get("step_time", {})
            lines.append(f"{name:<28}{_fmt(t.get('median_s')):>16}{_fmt(t.get('ratio_to_full')):>8}")
        for name, e in methods.items():
            if "step_time_cached_features" in e:
                t = e["step_time_cached_features"]
                lines.append(f"{name + CACHED:<28}{_fmt(t.get('median_s')):>16}{_fmt(t.get('ratio_to_full')):>8}")
    if "inference" in result:
        lines.append(f"{'inference':<28}{'median (s)':>16}{'x towers':>9}")
        for name, e in result["inference"].items():
            lines.append(f"{name:<28}{_fmt(e['median_s'], '.4f'):>16}{_fmt(e['ratio_to_towers']):>9}")
    return "\n".join(lines)


if __name__ == "__main__":
    run(parse_args())
