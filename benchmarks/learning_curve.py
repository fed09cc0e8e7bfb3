"""Learning curves on the built-in shapes benchmark from cached tower features: val Acc@0.5 and training loss
against the optimiser step, for `M2ISTConfig(preset="paper")` and the library default, under two recipes.

    python benchmarks/learning_curve.py                                    # (a) (b) (c) below, up to 20,000 steps
    python benchmarks/learning_curve.py --runs paper:authors --max-steps 3000 --eval-every 250
    python benchmarks/learning_curve.py --runs paper+box_head=pointer:benchmark --max-steps 600 \\
        --output benchmarks/results/learning_curve_fields.json              # the preset with one field changed
    python benchmarks/learning_curve.py --runs default+expert_init=kaiming:benchmark --max-steps 300 \\
        --output benchmarks/results/learning_curve_fields_reverse.json      # the default with one preset field

A run is `CONFIG[+FIELD=VALUE...]:RECIPE`:

- CONFIG `paper` is `M2ISTConfig(preset="paper")`; `default` is the library default (`interaction="shared"`,
  `mixture="sum"`, every other field at its default); `+FIELD=VALUE` sets FIELD (one of the preset's fields,
  `PAPER_PRESET`) to VALUE (JSON, else a string): from the preset's fields written out without `preset` (the preset
  moved toward the default), or from the default's (the default moved toward the preset);
- RECIPE `authors` is the authors' `train.py`: AdamW, lr 1e-4 for the projections and head, 1e-5 for the experts,
  weight decay 1e-4, no clipping, no warm-up, x0.1 at two thirds of `--max-steps`; `benchmark` is
  `benchmarks/accuracy.py`'s: AdamW lr 3e-4 for both groups, weight decay 1e-4, 5% linear warm-up then cosine to 0
  over `--max-steps`, gradient norm clipped at 1.0.

Everything else is `benchmarks/accuracy.py`'s at the default scale (MobileNetV2 stride 16 + MiniLM-L6, 128 px,
20 tokens, unaugmented, batch 32, the head of the training example: 2 layers, FFN 512, the same data order and
initialisation seeds). The training data are unaugmented, so the frozen towers' outputs (final tokens and taps) are
computed once for the train set and the first `--eval-samples` val rows and kept in memory; a step is then the
side network and the head only. Before each run the script asserts that the cached forward gives the normal
forward's loss on a batch (eval mode). A run stops at `--max-steps` or at the first evaluation with val Acc@0.5
>= `--stop-at`. The JSON (`--output`) is written after every evaluation, so a killed run keeps its points.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `benchmarks` and the library

from benchmarks import accuracy, baselines, environment, scales

RECIPES = {
    "authors": {"lr_head": 1e-4, "lr_adapter": 1e-5, "weight_decay": 1e-4, "max_grad_norm": None,
                "schedule": "x0.1 at 2/3 of max_steps", "warmup_ratio": 0.0},
    "benchmark": {"lr_head": 3e-4, "lr_adapter": 3e-4, "weight_decay": 1e-4, "max_grad_norm": 1.0,
                  "schedule": "5% linear warm-up, cosine to 0 at max_steps", "warmup_ratio": 0.05},
}
CONFIGS = {"paper": "m2ist_paper", "default": "m2ist_shared_sum"}
DEFAULT_RUNS = ("paper:authors", "paper:benchmark", "default:benchmark")
RESULT = environment.RESULTS_DIR / "learning_curve.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="CONFIG[+FIELD=VALUE...]:RECIPE")
    p.add_argument("--max-steps", type=int, default=20000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--stop-at", type=float, default=0.70, help="stop a run once val Acc@0.5 reaches this")
    p.add_argument("--eval-samples", type=int, default=500, help="score the first N val rows")
    p.add_argument("--train-samples", type=int, default=None, help="train on the first N rows only (smoke tests)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--head-layers", type=int, default=2)
    p.add_argument("--head-ffn-dim", type=int, default=512)
    p.add_argument("--bottleneck", type=int, default=128)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in --output when its settings match, and skip them")
    p.add_argument("--output", type=Path, default=RESULT)
    return p.parse_args(argv)


def parse_run(spec: str) -> tuple[str, dict, str]:
    """`CONFIG[+FIELD=VALUE...]:RECIPE` -> (config, overrides, recipe)."""
    body, _, recipe = spec.rpartition(":")
    config, *changes = body.split("+")
    if config not in CONFIGS or recipe not in RECIPES:
        raise ValueError(f"run {spec!r}: config must be one of {tuple(CONFIGS)} and recipe one of {tuple(RECIPES)}")
    overrides = {}
    for change in changes:
        name, _, value = change.partition("=")
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError:
            overrides[name] = value
    return config, overrides, recipe


def build_model(config: str, overrides: dict, scale: scales.Scale, args: argparse.Namespace) -> torch.nn.Module:
    """The model of `benchmarks/accuracy.py` (`baselines.build_method`), or that config with `overrides` applied:
    the preset written out field by field (`PAPER_PRESET`, which `preset="paper"` refuses to mix with other values),
    or the default's fields, then `overrides`."""
    from peft_m2ist.tuner.config import PAPER_PRESET

    kw = dict(seed=args.seed, bottleneck=args.bottleneck, head_layers=args.head_layers, head_ffn_dim=args.head_ffn_dim)
    if not overrides:
        return baselines.build_method(CONFIGS[config], scale, **kw)
    unknown = set(overrides) - set(PAPER_PRESET)
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not fields of the paper preset; known: {sorted(PAPER_PRESET)}")
    base = PAPER_PRESET if config == "paper" else {}
    return baselines.build_method(CONFIGS["default"], scale, m2ist_fields={**base, **overrides}, **kw)


class FeatureCache:
    """The frozen towers' outputs (`encode_towers(...).to_tensors()`) for whole splits, kept in memory.

    Features of several models share one store: a model whose keys (final tokens and its taps) are all there reuses
    them; otherwise the split is encoded again with it and the missing keys are added."""

    def __init__(self, datasets: dict, collator, chunk: int = 64) -> None:
        self.datasets, self.collator, self.chunk = datasets, collator, chunk
        self.store: dict[str, dict[str, torch.Tensor]] = {split: {} for split in datasets}
        self.labels: dict[str, torch.Tensor] = {}
        self.types: dict[str, list[str]] = {}

    def batch(self, split: str, start: int, stop: int) -> dict:
        return self.collator([self.datasets[split][i] for i in range(start, stop)])

    def ensure(self, model: torch.nn.Module, log=print) -> None:
        """Encode what `model` reads and the store lacks, one tower at a time (`encode_vision`, `encode_text`): a
        model that taps other vision layers than the store has costs only a vision-tower pass."""
        model.eval()
        for split, ds in self.datasets.items():
            halves = {"vision": model.encode_vision, "text": model.encode_text}
            with torch.no_grad():
                first = {name: self._encode(fn, self.batch(split, 0, min(self.chunk, len(ds))))
                         for name, fn in halves.items()}
            missing = [name for name, keys in first.items() if not keys.keys() <= self.store[split].keys()]
            if not missing:
                continue
            t0 = time.perf_counter()
            parts, labels, types = {name: [] for name in missing}, [], []
            for start in range(0, len(ds), self.chunk):
                batch = self.batch(split, start, min(start + self.chunk, len(ds)))
                types += batch.pop("phrase_type")
                labels.append(batch.pop("labels"))
                with torch.no_grad():
                    for name in missing:
                        parts[name].append(self._encode(halves[name], batch))
            for chunks in parts.values():
                for key in chunks[0]:
                    if key not in self.store[split]:
                        self.store[split][key] = torch.cat([p[key] for p in chunks])
            self.labels[split], self.types[split] = torch.cat(labels), types
            size = sum(t.numel() * t.element_size() for t in self.store[split].values()) / 2**20
            log(f"  encoded {split} ({len(ds)} rows, {' and '.join(missing)} tower) in {time.perf_counter() - t0:.0f}"
                f" s; cache {size:,.0f} MiB")
        model.train()

    @staticmethod
    def _encode(half, batch: dict) -> dict[str, torch.Tensor]:
        """One tower's outputs (`encode_vision` or `encode_text` of the model) on a collated batch."""
        if half.__name__ == "encode_vision":
            return half(batch["pixel_values"], batch.get("pixel_mask"))
        return half(batch["input_ids"], batch.get("attention_mask"))

    @staticmethod
    def model_keys(model: torch.nn.Module, batch: dict) -> list[str]:
        """The feature names `model` reads (`encode_towers(...).to_tensors()`'s keys)."""
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "phrase_type")}
        with torch.no_grad():
            return list(model.encode_towers(**inputs).to_tensors())

    def features(self, model_keys, split: str, ids) -> dict[str, torch.Tensor]:
        return {k: self.store[split][k][ids] for k in model_keys}


def check_cached_forward(model, cache: FeatureCache, keys) -> float:
    """The cached forward's loss equals the normal forward's on 8 train rows (eval mode: no dropout)."""
    model.eval()
    batch = cache.batch("train", 0, 8)
    batch.pop("phrase_type")
    with torch.no_grad():
        direct = model(**batch).loss
        cached = model(tower_features=cache.features(keys, "train", torch.arange(8)), labels=batch["labels"]).loss
    model.train()
    torch.testing.assert_close(cached, direct, rtol=1e-5, atol=1e-5)
    return abs(cached.item() - direct.item())


def evaluate(model, cache: FeatureCache, keys, batch_size: int = 64) -> dict:
    from peft_m2ist.metrics import load_rec_metric

    metric = load_rec_metric()
    n = len(cache.labels["val"])
    model.eval()
    with torch.no_grad():
        for start in range(0, n, batch_size):
            ids = torch.arange(start, min(start + batch_size, n))
            boxes = model(tower_features=cache.features(keys, "val", ids)).pred_boxes.float()
            metric.add_batch(predictions=boxes.tolist(), references=cache.labels["val"][ids].tolist())
    model.train()
    scores = metric.compute()
    return {"accuracy": scores["accuracy"], "mean_iou": scores["mean_iou"], "n": n}


def make_schedule(optimizer, recipe: dict, max_steps: int):
    if recipe["warmup_ratio"]:
        return accuracy.lr_scheduler(optimizer, max_steps, max(1, int(recipe["warmup_ratio"] * max_steps)))
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, [round(2 * max_steps / 3)], gamma=0.1)


def train_run(spec: str, scale, cache: FeatureCache, args, save, log=print) -> dict:
    config, overrides, recipe_name = parse_run(spec)
    recipe = RECIPES[recipe_name]
    model = build_model(config, overrides, scale, args)
    cache.ensure(model, log)
    keys = FeatureCache.model_keys(model.eval(), cache.batch("train", 0, 2))
    model.train()
    gap = check_cached_forward(model, cache, keys)
    groups = accuracy.parameter_groups(model, argparse.Namespace(lr_head=recipe["lr_head"],
                                                                 lr_adapter=recipe["lr_adapter"], lr_tower=0.0))
    optimizer = torch.optim.AdamW(groups, weight_decay=recipe["weight_decay"])
    scheduler = make_schedule(optimizer, recipe, args.max_steps)
    params = [p for g in groups for p in g["params"]]
    generator = torch.Generator().manual_seed(args.seed)  # accuracy.py's data order
    n_train = len(cache.labels["train"])
    entry = {"config": config, "overrides": overrides, "recipe": recipe_name, "recipe_settings": recipe,
             "fields": {k: getattr(model.peft_config["default"], k) for k in _field_names()},
             "params": baselines.parameter_counts(model), "cached_forward_loss_gap": gap,
             "points": [], "reached_stop_at": None, "steps_run": 0}
    order: list[int] = []
    losses: list[float] = []
    start = time.perf_counter()
    log(f"{spec}: up to {args.max_steps} steps, eval every {args.eval_every} on {len(cache.labels['val'])} val rows")
    for step in range(1, args.max_steps + 1):
        if len(order) < args.batch_size:
            order += torch.randperm(n_train, generator=generator).tolist()
        ids, order = torch.tensor(order[: args.batch_size]), order[args.batch_size:]
        optimizer.zero_grad(set_to_none=True)
        loss = model(tower_features=cache.features(keys, "train", ids), labels=cache.labels["train"][ids]).loss
        loss.backward()
        if recipe["max_grad_norm"] is not None:
            torch.nn.utils.clip_grad_norm_(params, recipe["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.max_steps:
            scores = evaluate(model, cache, keys)
            elapsed = time.perf_counter() - start
            point = {"step": step, "val_accuracy": scores["accuracy"], "val_mean_iou": scores["mean_iou"],
                     "train_loss": sum(losses) / len(losses), "lr_head": optimizer.param_groups[-1]["lr"],
                     "elapsed_s": elapsed}
            losses = []
            entry["points"].append(point)
            entry["steps_run"], entry["seconds_per_step"] = step, elapsed / step
            log(f"  {spec} step {step}: val Acc@0.5 {100 * point['val_accuracy']:.1f}%, mean IoU "
                f"{point['val_mean_iou']:.3f}, train loss {point['train_loss']:.3f} ({elapsed:.0f} s)")
            save(spec, entry)
            if scores["accuracy"] >= args.stop_at:
                entry["reached_stop_at"] = step
                save(spec, entry)
                break
    return entry


def _field_names() -> list[str]:
    from peft_m2ist.tuner.config import PAPER_PRESET

    return list(PAPER_PRESET)


def load_splits(scale: scales.Scale, args: argparse.Namespace):
    ns = argparse.Namespace(data_seed=args.data_seed, augment=False, seed=args.seed, eval_samples=args.eval_samples)
    train, _, evals, collator, chance = accuracy.load_data(scale, ns)
    if args.train_samples:
        train = train.select(range(min(args.train_samples, len(train))))
    return {"train": train, "val": evals["val"]}, collator, chance["val"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    for spec in args.runs:
        parse_run(spec)  # refuse a bad spec before any work
    torch.manual_seed(args.seed)
    scale = scales.build_scale("default", 0)
    datasets, collator, chance = load_splits(scale, args)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("runs", "output", "resume")}
    result = {"kind": "learning_curve", "scale": "default", "scale_description": scale.description,
              "command": environment.command_line(), "machine": environment.machine_info(torch.device("cpu")),
              "settings": settings, "chance_val": chance, "recipes": RECIPES, "runs": {}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.resume and args.output.exists():
        previous = json.loads(args.output.read_text())
        if previous.get("settings") == settings:
            result["runs"] = previous["runs"]
            result["earlier_commands"] = [*previous.get("earlier_commands", []), previous["command"]]

    def save(spec: str, entry: dict) -> None:
        result["runs"][spec] = entry
        args.output.write_text(json.dumps(result, indent=2))

    cache = FeatureCache(datasets, collator)
    for spec in args.runs:
        if spec in result["runs"]:
            print(f"{spec}: kept from {args.output}")
            continue
        save(spec, train_run(spec, scale, cache, args, save))
    print(f"\n{'run':<48}{'steps':>7}{'best val Acc@0.5':>18}{'last train loss':>17}{'s/step':>8}")
    for spec, e in result["runs"].items():
        best = max(p["val_accuracy"] for p in e["points"])
        print(f"{spec:<48}{e['steps_run']:>7}{100 * best:>17.1f}%{e['points'][-1]['train_loss']:>17.3f}"
              f"{e['seconds_per_step']:>8.2f}")
    print(f"chance (val, first {args.eval_samples} rows): {100 * chance:.1f}%; wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
