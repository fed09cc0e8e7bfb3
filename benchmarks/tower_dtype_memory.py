"""The frozen towers' weight bytes and M2IST's exact training-memory account with the towers kept in float32, bfloat16
and int8 (`--tower_dtype`; `peft_m2ist.towers.quantization`), all in one process on the same towers.

    python benchmarks/tower_dtype_memory.py                     # paper scale: DETR-R50 encoder + BERT-base, 640 px
    python benchmarks/tower_dtype_memory.py --scale default     # MobileNetV2 (stride 16) + MiniLM-L6, 128 px

For each dtype: deep copies of the scale's towers (frozen batch norms folded first, as `examples/train_rec.py`
does), put in that dtype, then M2IST through `get_peft_model` with the library's default interaction and mixture; the
exact account of one training step (`benchmarks.measurement.exact_account`) at `--account-batches`, extrapolated to
`--extrapolate-to`. The side network and head stay float32 in every case; the int8 towers compute in float32.
Writes `benchmarks/results/tower_dtype_memory_<scale>_cpu.json` (or `--output`) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `benchmarks` and the library

import peft_m2ist
from benchmarks import baselines, environment, measurement, scales
from peft_m2ist.towers.quantization import (
    TOWER_DTYPE_CHOICES,
    quantized_modules,
    set_tower_dtype,
    tower_weight_bytes,
)

DEFAULT_METHOD = f"m2ist_{peft_m2ist.M2ISTConfig().interaction}_{peft_m2ist.M2ISTConfig().mixture}"
"""The M2IST variant measured: the library's default interaction and mixture."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=("paper", "default", "tiny"), default="paper")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "int8"], choices=TOWER_DTYPE_CHOICES)
    p.add_argument("--method", default=DEFAULT_METHOD, help=f"an M2IST method of benchmarks/baselines.py "
                                                           f"(default {DEFAULT_METHOD})")
    p.add_argument("--account-batches", type=int, nargs="+", default=[1, 2])
    p.add_argument("--extrapolate-to", type=int, default=64, help="batch the exact account is extrapolated to")
    p.add_argument("--bottleneck", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None)
    return p.parse_args(argv)


def run(args: argparse.Namespace, log=print) -> dict:
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.method.startswith("m2ist_"):
        raise SystemExit(f"--method must be an M2IST method (m2ist_*), got {args.method!r}")
    out_path = args.output or environment.RESULTS_DIR / f"tower_dtype_memory_{args.scale}_cpu.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"building the {args.scale} pair ...")
    scale = scales.build_scale(args.scale, args.seed)  # frozen batch norms folded, as train_rec does by default
    num_vision_tokens = baselines.count_vision_tokens(scale.vision, scale.image_size)
    result = {
        "kind": "tower_dtype_memory", "scale": args.scale, "scale_description": scale.description,
        "command": environment.command_line(), "machine": environment.machine_info(torch.device("cpu")),
        "settings": {"method": args.method, "account_batches": args.account_batches,
                     "extrapolate_to": args.extrapolate_to, "bottleneck": args.bottleneck,
                     "image_size": scale.image_size, "text_tokens": scale.text_tokens,
                     "vision_tokens": num_vision_tokens,
                     "optimizer": "AdamW(lr=1e-4, weight_decay=1e-4), fp32 adapter parameters",
                     "weights_note": "towers' weight bytes: every parameter and buffer of each tower, quantized "
                                     "weights at their stored size (int8 values, float32 scales, torchao's int8 zero "
                                     "points)"},
        "dtypes": {},
    }
    for dtype in args.dtypes:
        vision, text = copy.deepcopy(scale.vision), copy.deepcopy(scale.text)
        set_tower_dtype(vision, dtype), set_tower_dtype(text, dtype)
        entry = {"towers_weight_bytes": {"vision": tower_weight_bytes(vision), "text": tower_weight_bytes(text)},
                 "quantized_modules": {"vision": quantized_modules(vision), "text": quantized_modules(text)}}
        entry["towers_weight_bytes"]["total"] = sum(entry["towers_weight_bytes"].values())
        model = baselines.build_method(args.method, dataclasses.replace(scale, vision=vision, text=text), args.seed,
                                       args.bottleneck, num_vision_tokens=num_vision_tokens)
        optimizer = measurement.make_optimizer(model)
        entry["params"] = baselines.parameter_counts(model)
        accounts = {str(b): measurement.exact_account(model, optimizer, scales.make_batch(scale, b, "cpu", args.seed))
                    for b in args.account_batches}
        entry["account"] = accounts
        if len(args.account_batches) >= 2 and args.extrapolate_to not in args.account_batches:
            b0, b1 = args.account_batches[0], args.account_batches[-1]
            entry["account_extrapolated"] = measurement.extrapolate(accounts[str(b0)], accounts[str(b1)], b0, b1,
                                                                    args.extrapolate_to)
            entry["account_extrapolated"]["batch_size"] = args.extrapolate_to
        result["dtypes"][dtype] = entry
        log(f"  {dtype}: towers {environment.mib(entry['towers_weight_bytes']['total'])} MiB, "
            + ", ".join(f"b={b}: total {environment.mib(a['total'])} MiB (weights {environment.mib(a['weights'])})"
                        for b, a in accounts.items()))
        del model, optimizer, vision, text
        environment.free()
    baseline = result["dtypes"].get("float32")
    for entry in result["dtypes"].values():
        if baseline:
            entry["towers_ratio_to_float32"] = (entry["towers_weight_bytes"]["total"]
                                                / baseline["towers_weight_bytes"]["total"])
            for key in ("account_extrapolated",):
                if key in entry and key in baseline:
                    entry[key]["total_ratio_to_float32"] = entry[key]["total"] / baseline[key]["total"]
    result["elapsed_s"] = time.perf_counter() - start
    result["finished"] = True
    out_path.write_text(json.dumps(result, indent=2))
    print_table(result, log)
    log(f"wrote {out_path}")
    return result


def print_table(result: dict, log=print) -> None:
    log(f"\n{result['scale_description']}; {result['settings']['method']}")
    log(f"{'dtype':<10}{'towers MiB':>12}{'x float32':>11}{'step weights MiB':>18}{'total MiB (extrap.)':>22}")
    for dtype, entry in result["dtypes"].items():
        extrapolated = entry.get("account_extrapolated", {})
        last = entry["account"][str(result["settings"]["account_batches"][-1])]
        log(f"{dtype:<10}{environment.mib(entry['towers_weight_bytes']['total']):>12}"
            f"{entry.get('towers_ratio_to_float32', float('nan')):>11.3f}{environment.mib(last['weights']):>18}"
            f"{environment.mib(extrapolated.get('total')):>22}")


if __name__ == "__main__":
    run(parse_args())
