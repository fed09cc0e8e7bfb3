"""Accuracy at equal budget on the built-in shapes benchmark: every tuning method trained for the same number of
optimiser steps, batch size, schedule and data order, then scored (Acc@0.5) on val, test and test_heldout.

    python benchmarks/accuracy.py                          # default pair (MobileNetV2 + MiniLM-L6), 128 px
    python benchmarks/accuracy.py --methods full m2ist_shared_sum --steps 1316 --seed 14
    python benchmarks/accuracy.py --steps 2 --eval-samples 16 --output acc_smoke.json   # smoke test

The training memory of each method (exact account, `benchmarks/measurement.py::exact_account`) is measured on its first
optimiser step at the training batch, so `report.py` can plot accuracy against training memory.
Writes `benchmarks/results/accuracy_<scale>.json` after each method; `--resume` keeps the methods already there when
the settings match.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `benchmarks` and the library

from benchmarks import baselines, environment, measurement, scales
from peft_m2ist.towers.layouts import TOWER_LAYOUTS, tower_model_type


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=("default", "paper"), default="default")
    p.add_argument("--methods", nargs="+", default=list(baselines.ALL_METHODS), choices=baselines.ALL_METHODS)
    p.add_argument("--steps", type=int, default=1316,
                   help="optimiser steps, the same for every method (default: the training example's 7 epochs of "
                        "188 steps)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--head-layers", type=int, default=2, help="grounding-head layers (the training example's 2)")
    p.add_argument("--head-ffn-dim", type=int, default=512, help="grounding-head FFN width (the training example's)")
    p.add_argument("--lr-head", type=float, default=3e-4, help="projections, [REG], position embedding, head")
    p.add_argument("--lr-adapter", type=float, default=3e-4, help="M2IST experts, LoRA, bottleneck adapters")
    p.add_argument("--lr-tower", type=float, default=1e-5, help="tower weights (full fine-tuning)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--eval-samples", type=int, default=None, help="score only the first N rows of each split")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--bottleneck", type=int, default=128)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", action="store_true", help="keep methods already in --output with the same settings")
    p.add_argument("--output", type=Path, default=None)
    return p.parse_args(argv)


def parameter_groups(model: torch.nn.Module, args: argparse.Namespace) -> list[dict]:
    """Three groups: tower weights (`lr_tower`), adapters of any kind (`lr_adapter`), projections + head (`lr_head`)."""
    groups = {"tower": [], "adapter": [], "head": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if (".blocks." in name and "m2ist_side" in name) or "lora_" in name or name.startswith("adapters."):
            groups["adapter"].append(param)
        elif name.startswith("pair.") or name.startswith("base_model.model."):
            groups["tower"].append(param)
        else:
            groups["head"].append(param)
    lrs = {"tower": args.lr_tower, "adapter": args.lr_adapter, "head": args.lr_head}
    return [{"params": ps, "lr": lrs[g], "name": g} for g, ps in groups.items() if ps]


def load_data(scale: scales.Scale, args: argparse.Namespace):
    from peft_m2ist.data import RECCollator, chance_level, load_shapes_benchmark
    from peft_m2ist.pretrained import load_text_tower, load_vision_tower

    _, processor = load_vision_tower()
    _, tokenizer = load_text_tower()  # BERT uncased vocabulary: also the tokenizer of the random BERT-base
    data = load_shapes_benchmark(seed=args.data_seed, image_size=scale.image_size) if scale.name == "default" \
        else load_shapes_benchmark(seed=args.data_seed)
    common = dict(image_size=scale.image_size, max_text_tokens=scale.text_tokens)
    train_collator = RECCollator.from_image_processor(tokenizer, processor, train=args.augment, seed=args.seed,
                                                      **common)
    eval_collator = RECCollator.from_image_processor(tokenizer, processor, train=False, **common)
    evals = {}
    for split in ("val", "test", "test_heldout"):
        if split in data:
            ds = data[split]
            if args.eval_samples:
                ds = ds.select(range(min(args.eval_samples, len(ds))))
            evals[split] = ds
    chance = {split: chance_level(ds) for split, ds in evals.items()}
    return data["train"], train_collator, evals, eval_collator, chance


def evaluate(model, dataset, collator, batch_size: int, device) -> dict:
    """Acc@0.5, mean IoU and Acc@0.5 per phrase type on `dataset`, by the library's REC metric (`load_rec_metric`)."""
    from peft_m2ist.metrics import load_rec_metric

    metric = load_rec_metric()
    model.eval()
    types = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            types += batch.pop("phrase_type")
            labels = batch.pop("labels")
            inputs = {k: v.to(device) for k, v in batch.items()}
            boxes = model(**inputs).pred_boxes.float().cpu()
            metric.add_batch(predictions=boxes.tolist(), references=labels.tolist())
    model.train()
    scores = metric.compute(phrase_types=types)
    return {"accuracy": scores.pop("accuracy"), "mean_iou": scores.pop("mean_iou"), "n": len(types), **scores}


def lr_scheduler(optimizer: torch.optim.Optimizer, steps: int, warmup: int):
    """Linear warm-up, then cosine decay to 0: at optimiser step `s` (from 0) the learning rate is
    `lr * (s + 1) / warmup` while `s < warmup`, then `lr * (1 + cos(pi * (s - warmup) / (steps - warmup))) / 2`.

    transformers' "warmup_stable_decay" schedule with one stable step, entered at its step 1 (`last_epoch=0`): its
    step 0 has a learning rate of 0, while here the first step already trains, and the last warm-up step and the
    first decay step both run at the full rate.
    """
    from transformers import get_scheduler

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])  # what a scheduler that does not start at step 0 scales
    return get_scheduler("warmup_stable_decay", optimizer, num_warmup_steps=warmup,
                         scheduler_specific_kwargs={"num_stable_steps": 1, "num_decay_steps": steps - warmup,
                                                    "last_epoch": 0})


def train_one(name: str, scale: scales.Scale, data, args: argparse.Namespace, device, log=print) -> dict:
    train, train_collator, evals, eval_collator, _ = data
    num_vision_tokens = baselines.count_vision_tokens(scale.vision, scale.image_size)
    model = baselines.build_method(name, scale, args.seed, args.bottleneck, args.lora_rank, num_vision_tokens,
                           head_layers=args.head_layers, head_ffn_dim=args.head_ffn_dim).to(device)
    if not name.startswith("m2ist_") and name != "head_only":
        model.pair.train()
    groups = parameter_groups(model, args)
    optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
    scheduler = lr_scheduler(optimizer, args.steps, max(1, int(args.warmup_ratio * args.steps)))
    generator = torch.Generator().manual_seed(args.seed)  # the same data order for every method
    order: list[int] = []
    start = time.perf_counter()
    account, losses = None, []
    for step in range(args.steps):
        if len(order) < args.batch_size:
            order += torch.randperm(len(train), generator=generator).tolist()
        ids, order = order[: args.batch_size], order[args.batch_size:]
        batch = train_collator([train[i] for i in ids])
        batch.pop("phrase_type")
        batch = {k: v.to(device) for k, v in batch.items()}
        if step == 0:  # the exact account of this very step (forward, backward, clipping skipped, AdamW step)
            account = measurement.exact_account(model, optimizer, batch)
        else:
            optimizer.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], args.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
        scheduler.step()
        if losses and (step + 1) % max(1, args.steps // 10) == 0:
            recent = losses[-50:]
            log(f"  {name} step {step + 1}/{args.steps}: loss {sum(recent) / max(1, len(recent)):.4f} "
                f"({time.perf_counter() - start:.0f} s)")
    train_s = time.perf_counter() - start
    scores = {split: evaluate(model, ds, eval_collator, args.eval_batch_size, device) for split, ds in evals.items()}
    log(f"  {name}: " + ", ".join(f"{s} {v['accuracy']:.3f}" for s, v in scores.items()))
    return {"note": model.method_note, "params": baselines.parameter_counts(model), "account": account,
            "train_time_s": train_s, "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])), "scores": scores}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    out_path = args.output or environment.RESULTS_DIR / f"accuracy_{args.scale}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("methods", "resume", "output", "device")}
    scale = scales.build_scale(args.scale, 0)
    # which module of a text block feeds the language expert: runs made before the BERT-family tap was fixed (#20)
    # lack this key and tapped `output` (LayerNorm(FFN + residual)); the report keeps the two apart
    settings["text_ffn_tap"] = TOWER_LAYOUTS[tower_model_type(scale.text)].ffn
    result = {"kind": "accuracy", "scale": args.scale, "command": environment.command_line(), "machine": environment.machine_info(device),
              "settings": settings, "methods": {}}
    if args.resume and out_path.exists():
        previous = json.loads(out_path.read_text())
        if previous.get("settings") == settings:
            result["methods"] = previous["methods"]
    result["scale_description"] = scale.description
    data = load_data(scale, args)
    result["chance"] = data[4]
    for name in args.methods:
        if name in result["methods"]:
            print(f"{name}: kept from {out_path}")
            continue
        print(f"training {name} for {args.steps} steps at batch {args.batch_size} ...")
        result["methods"][name] = train_one(name, scale, data, args, device)
        out_path.write_text(json.dumps(result, indent=2))
    print(f"{'method':<30}{'train MiB':>10}" + "".join(f"{s:>14}" for s in data[2]))
    for name, entry in result["methods"].items():
        print(f"{name:<30}{environment.mib(entry['account']['total']):>10}"
              + "".join(f"{entry['scores'][s]['accuracy']:>14.3f}" for s in data[2]))
    print(f"wrote {out_path}")
    return result


if __name__ == "__main__":
    main()
