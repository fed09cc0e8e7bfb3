"""Rewrite `benchmarks/RESULTS.md` and `benchmarks/results/memory_accuracy.png` from the JSON files in
`benchmarks/results/` (and the paper's reference numbers in `benchmarks/reference_paper.json`).

    python benchmarks/report.py

Every number in RESULTS.md comes from a JSON file written by a benchmark script; nothing is typed by hand.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `benchmarks` and the library

from benchmarks.baselines import ALL_METHODS
from benchmarks.environment import RESULTS_DIR

PAPER_ADAPTER_PARAMS = 2.99e6  # adapter-only count of the reference code (method.md)

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
FIGURE = RESULTS_DIR / "memory_accuracy.png"
GOAL_METHOD = "m2ist_shared_sum"  # the paper's configuration

LABELS = {
    "full": "full fine-tuning",
    "lora": "LoRA (towers' attention) + head",
    "adapter": "bottleneck adapters (in towers) + head",
    "head_only": "head only (frozen towers)",
    "m2ist_shared_sum": "M2IST shared / sum (paper)",
    "m2ist_shared_gated": "M2IST shared / gated",
    "m2ist_cross_attention_sum": "M2IST cross-attention / sum",
    "m2ist_cross_attention_gated": "M2IST cross-attention / gated",
}


def gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**30:.2f}"


def mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:,.0f}"


def ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def millions(n: int | float | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f}M"


def machine_line(result: dict) -> str:
    m = result["machine"]
    where = f"GPU {m['gpu']}" if m.get("gpu") else f"CPU {m['cpu']}, {m['torch_threads']} torch thread{'s' if m['torch_threads'] != 1 else ''}"
    load = ""
    if "load_average_1min_at_start" in m:
        load = (f"; 1-min load average {m['load_average_1min_at_start']:.1f} at start"
                + (f", {m['load_average_1min_at_end']:.1f} at end" if "load_average_1min_at_end" in m else "")
                + f" on {m.get('cpu_count')} cores")
    return (f"{where}; torch {m['torch']}, transformers {m.get('transformers')}, peft {m.get('peft')}; "
            f"commit {m.get('git_commit')}"
            + (" + uncommitted changes" if m.get("git_worktree_clean") is False
               and "uncommitted" not in str(m.get("git_commit")) else "")
            + f"; {m['date']}{load}")


def load_results() -> list[dict]:
    out = []
    for path in sorted(RESULTS_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        data["_file"] = path.relative_to(HERE).as_posix()
        out.append(data)
    return out


def _ordered(methods: dict) -> list[str]:
    return [m for m in ALL_METHODS if m in methods]


# ---------------------------------------------------------------------------------------------- memory / time
def memory_time_section(r: dict) -> list[str]:
    s = r["settings"]
    methods = r["methods"]
    b = str(s["account_batches"][-1])
    device = "GPU" if r["machine"].get("gpu") else "CPU"
    lines = [
        f"### {r['scale']} scale on {device}: {r['scale_description']}",
        "",
        f"- Machine: {machine_line(r)}",
        f"- Command: `{r['command']}` -> `{r['_file']}`" + ("" if r.get("finished") else " (**run did not finish**)"),
        f"- Batch {s['batch_size']} (timing); exact account at batch(es) {s['account_batches']}; bottleneck "
        f"{s['bottleneck']}, LoRA r={s['lora_rank']}; {s['image_size']} px ({s['vision_tokens']} vision tokens), "
        f"{s['text_tokens']} text tokens; head dropout {s.get('head_dropout', 0.1)}; {s['optimizer']}"
        + ("; bf16 autocast" if s.get("bf16") else "")
        + ("; TF32 float32 matmuls (`set_float32_matmul_precision('high')`)" if s.get("tf32") else "")
        + ("; vision tower channels-last (every method)" if s.get("channels_last") else "")
        + ("; gradient checkpointing in every method's grounding head" if s.get("head_checkpointing") else "")
        + (f"; frozen batch norms {s['frozen_batch_norm']}" if _frozen_batch_norm(r) != "stock" else "")
        + "".join(f"; **{note}**" for note in _implementation_notes(r)) + ".",
        "",
    ]
    if all("account" in methods[m] for m in methods):
        has_ext = all("account_extrapolated" in methods[m] for m in methods)
        ext_b = s.get("extrapolate_to")
        head = (f"| method | trainable | tunable excl. proj.+head | weights MiB | grads + AdamW MiB | activations MiB "
                f"@{b} | total MiB @{b} | x full | x LoRA |")
        sep = "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        if has_ext:
            head += f" total GiB @{ext_b} (extrap.) | x full | x LoRA |"
            sep += " ---: | ---: | ---: |"
        lines += ["**Exact training-memory account** (one step; activations = tensors saved for backward, each "
                  "storage once, parameters and buffers excluded there and counted once in `weights`):", "",
                  head, sep]
        for m in _ordered(methods):
            e = methods[m]
            a = e["account"][b]
            row = (f"| {LABELS.get(m, m)} | {millions(e['params']['trainable'])} | "
                   f"{millions(e['params'].get('adapter_only'))} | {mib(a['weights'])} | "
                   f"{mib(a['grads'] + a['optimizer'])} | {mib(a['activations'])} | {mib(a['total'])} | "
                   f"{ratio(a.get('ratio_to_full'))} | {ratio(a.get('ratio_to_lora'))} |")
            if has_ext:
                x = e["account_extrapolated"]
                row += f" {gib(x['total'])} | {ratio(x.get('ratio_to_full'))} | {ratio(x.get('ratio_to_lora'))} |"
            lines.append(row)
        lines.append("")
        if has_ext:
            lines += [f"The batch-{ext_b} column is extrapolated: saved activations are affine in the batch size, "
                      f"fitted exactly from the batches {s['account_batches']}; weights, gradients and optimizer "
                      "state do not depend on the batch.", ""]
        if "head_only" in methods and GOAL_METHOD in methods:
            ho = methods["head_only"]["account"][b]["activations"]
            mm = methods[GOAL_METHOD]["account"][b]["activations"]
            lines += [f"Where M2IST's activations go: the projections + grounding head alone (head-only row) keep "
                      f"{mib(ho)} MiB of the {mib(mm)} MiB that `{GOAL_METHOD}` keeps at batch {b} "
                      f"({100 * ho / mm:.0f}%); the side network adds the rest."
                      + _head_only_floor(methods, has_ext), ""]
    if any("live_peak" in methods[m] for m in methods):
        lines += _peak_table(
            methods, "live_peak",
            f"**Peak of live tensors** (`LiveTensorPeak` in `benchmarks/common.py`: every storage an op allocates, "
            f"until its last reference goes, over one step after a warm-up step, at batch "
            f"{_peak_batch(methods, 'live_peak')}; training memory = the step's peak increment + the method's own "
            f"weights and optimizer state, as for the CUDA peak; the same on every run of the same kernels):",
            ["where the peak is"], lambda p: [f"`{p.get('peak_op')}`"])
    if any("cuda_peak" in methods[m] for m in methods):
        lines += _peak_table(
            methods, "cuda_peak",
            "**CUDA peak** (`max_memory_allocated` over one step after a warm-up step; training memory = peak "
            "increment over the resident state + the method's own weights and optimizer state):",
            ["peak allocated GiB (all resident models)"], lambda p: [gib(p.get("peak_allocated"))],
            numeric_extras=True)
    if any("step_time" in methods[m] for m in methods):
        lines += [f"**Training-step time** (forward + backward + AdamW step, batch {s['batch_size']}; median of "
                  f"interleaved rounds after {s['warmup']} warm-up round(s)):", "",
                  "| method | median wall s | rounds | x full (wall) | median CPU s | x full (CPU) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        rows = [(LABELS.get(m, m), methods[m].get("step_time", {})) for m in _ordered(methods)]
        cached = [m for m in _ordered(methods) if "step_time_cached_features" in methods[m]]
        rows += [(f"{LABELS.get(m, m)}, from cached tower features*", methods[m]["step_time_cached_features"])
                 for m in cached]
        for label, t in rows:
            med, cpu = t.get("median_s"), t.get("median_cpu_s")
            lines.append(f"| {label} | {'n/a' if med is None else f'{med:.3f}'} | "
                         f"{len(t.get('times_s', []))} | {ratio(t.get('ratio_to_full'))} | "
                         f"{'n/a' if cpu is None else f'{cpu:.3f}'} | {ratio(t.get('cpu_ratio_to_full'))} |")
        lines += ["", "CPU s = this process's CPU time over the step (all threads); other processes sharing the "
                  "cores disturb it much less than the wall clock (see the load average above).", ""]
        if cached:
            lines += ["\\* Not like for like: the same M2IST step fed with tower features computed once before the "
                      "timing (`forward(tower_features=...)`), so the frozen towers' forward is skipped. This is the "
                      "step `examples/train_rec.py` runs after its first pass with its feature cache on (its default "
                      "when images are not augmented); full fine-tuning, LoRA and in-tower adapters change the towers "
                      "and cannot cache them. The goals table judges the rows above it.", ""]
        lines.append("")
    if "inference" in r:
        lines += [f"**Inference latency** (eval, `no_grad`, batch {r.get('inference_batch_size')}; towers alone = both "
                  "towers' forward only):", "",
                  "| model | median wall s | rounds | x towers alone (wall) | x towers alone (CPU) |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name, e in r["inference"].items():
            label = "towers alone" if name == "towers_only" else LABELS.get(name, name)
            lines.append(f"| {label} | {e['median_s']:.4f} | {len(e['times_s'])} | {ratio(e['ratio_to_towers'])} | "
                         f"{ratio(e.get('cpu_ratio_to_towers'))} |")
        lines.append("")
    lines += ["Methods as built:", ""]
    lines += [f"- `{m}`: {methods[m]['note']}" for m in _ordered(methods)]
    lines.append("")
    return lines


MICRO = "_tower_micro_batches"  # suffix of the peak measured with M2IST's frozen towers in micro-batches


def _peak_batch(methods: dict, key: str) -> int | None:
    return next((e[key].get("batch_size") for e in methods.values() if key in e), None)


def _peak_table(methods: dict, key: str, title: str, extra_heads: list[str], extra_cells,
                numeric_extras: bool = False) -> list[str]:
    """One row per method from `methods[m][key]`, then M2IST's rows with its towers in micro-batches (`key + MICRO`)."""
    lines = [title, "", "| method | training memory MiB | x full | x LoRA | " + " | ".join(extra_heads) + " |",
             "| --- | ---: | ---: | ---: |" + (" ---: |" if numeric_extras else " --- |") * len(extra_heads)]
    rows = [(LABELS.get(m, m), methods[m].get(key, {})) for m in _ordered(methods)]
    micro = [m for m in _ordered(methods) if key + MICRO in methods[m]]
    rows += [(f"{LABELS.get(m, m)}, towers in micro-batches of {methods[m][key + MICRO]['tower_micro_batch_size']}"
              "†", methods[m][key + MICRO]) for m in micro]
    for label, p in rows:
        if "error" in p:
            lines.append(f"| {label} | {p['error']} | | |" + " |" * len(extra_heads))
        else:
            lines.append(f"| {label} | {mib(p.get('training_memory'))} | {ratio(p.get('ratio_to_full'))} | "
                         f"{ratio(p.get('ratio_to_lora'))} | " + " | ".join(extra_cells(p)) + " |")
    lines.append("")
    if micro:
        lines += ["† The same M2IST step with `tower_micro_batch_size` set: the frozen towers run on that many "
                  "samples at a time, with the same features and gradients. Not like for like: a baseline could lower "
                  "its own peak by splitting its batch too (gradient accumulation), so the goals judge the rows "
                  "above.", ""]
    return lines


# ---------------------------------------------------------------------------------------------- goals
VARIANTS = [m for m in ALL_METHODS if m.startswith("m2ist")]
PAPER_BATCH = 64  # the batch the paper's memory and time figures are given at


@dataclass
class GoalCheck:
    """One goal measured once: the value and verdict of each M2IST variant in one result file."""

    goal: str  # "training memory <= 25% of full FT"
    how: str  # "exact account, batch 64 extrapolated" ("" for the plain measurement)
    source: str  # the result file and its settings, for the full table
    where: str  # the machine and settings in a few words, for the summary
    cells: dict[str, tuple[str, bool] | None]  # variant -> (value as printed, met); None = not measured
    in_summary: bool = True  # False: a side measurement (off the goal's batch, or CPU time of a GPU run)
    judged: bool = True  # False: shown for reference, no verdict (M2IST with micro-batches vs unsplit baselines)

    @property
    def label(self) -> str:
        return f"{self.goal} ({self.how})" if self.how else self.goal


def _head_only_floor(methods: dict, extrapolated: bool) -> str:
    """The head-only run's share of LoRA at the extrapolated batch: the least any method that adds its own memory to
    this head can reach against LoRA, which has the same head."""
    x = methods["head_only"].get("account_extrapolated") if extrapolated else None
    if not x or "ratio_to_lora" not in x:
        return ""
    return (f" Head only is itself at {x['ratio_to_lora']:.3f}x LoRA at batch {x['batch_size']}: no side network "
            "added to this head can go below that against LoRA, which has the same head.")


def _where(r: dict) -> str:
    m, s = r["machine"], r["settings"]
    parts = [m["gpu"].removeprefix("NVIDIA ") if m.get("gpu") else f"CPU {m['torch_threads']} thread"
             + ("s" if m["torch_threads"] > 1 else "")]
    parts += ["bf16"] * bool(s.get("bf16")) + ["TF32 matmuls"] * bool(s.get("tf32"))
    parts += ["channels-last convs"] * bool(s.get("channels_last"))
    parts += ["head checkpointing"] * bool(s.get("head_checkpointing"))
    parts += _implementation_notes(r)
    return ", ".join(parts)


def _implementation_notes(r: dict) -> list[str]:
    """What differs from the current implementation in a run, as short labels: files written before the lean head
    feed-forward; the head's feed-forward hidden tensors stored (before they were recomputed, or
    `--store-head-feed-forward`); stock frozen batch norms (before they were fused, or `--stock-batch-norm`); fused
    ones not folded into the convolutions (before they were folded, or `--unfolded-batch-norm`). Under head
    checkpointing the feed-forward block is recomputed with the rest of the layer, so its own setting does not
    apply."""
    s = r["settings"]
    ffn = s.get("head_feed_forward")
    notes = ["stock head FFN"] * (ffn is None)
    if ffn is not None and not ffn.startswith("hidden recomputed") and not s.get("head_checkpointing"):
        notes.append("head FFN hidden stored")
    if r.get("scale", "paper") == "paper":
        notes += {"stock": ["stock frozen BN"], "fused": ["frozen BN not folded"], "folded": []}[_frozen_batch_norm(r)]
    return notes


def paper_goal_checks(results: list[dict]) -> list[GoalCheck]:
    """Every paper-scale goal measurement in `results` (memory, parameters, step time, inference latency)."""
    checks: list[GoalCheck] = []
    paper = [r for r in results if r.get("kind") == "memory_time" and r["scale"] == "paper"]
    for r in paper:
        ms = r["methods"]
        src = (f"`{r['_file']}` (head dropout {r['settings'].get('head_dropout', 0.1)}"
               + (", head checkpointing" if r["settings"].get("head_checkpointing") else "") + ")")
        b = str(r["settings"]["account_batches"][-1])
        where, gpu = _where(r), bool(r["machine"].get("gpu"))

        def add(goal: str, how: str, values: list[float | None], holds, fmt=ratio, side: bool = False, src=src,
                where=where, judged: bool = True) -> None:
            cells = {v: None if x is None else (fmt(x), bool(holds(x))) for v, x in zip(VARIANTS, values)}
            checks.append(GoalCheck(goal, how, src, where, cells, in_summary=not side, judged=judged))

        for key, goal, limit in (("ratio_to_full", "training memory <= 25% of full FT", 0.25),
                                 ("ratio_to_lora", "training memory <= 50% of LoRA", 0.5)):
            if all("account_extrapolated" in ms.get(v, {}) for v in VARIANTS):
                add(goal, f"exact account, batch {r['settings']['extrapolate_to']} extrapolated",
                    [ms[v]["account_extrapolated"].get(key) for v in VARIANTS], lambda x, lim=limit: x <= lim)
            if all("account" in ms.get(v, {}) for v in VARIANTS):
                add(goal, f"exact account, batch {b} measured", [ms[v]["account"][b].get(key) for v in VARIANTS],
                    lambda x, lim=limit: x <= lim, side=int(b) != PAPER_BATCH)
            if all("cuda_peak" in ms.get(v, {}) for v in VARIANTS):
                add(goal, f"CUDA peak, batch {r['settings']['batch_size']}",
                    [ms[v]["cuda_peak"].get(key) for v in VARIANTS], lambda x, lim=limit: x <= lim)
            for entry, how in (("live_peak", "live-tensor peak"),
                               ("live_peak" + MICRO, "live-tensor peak, towers in micro-batches of {}")):
                peaks = [ms.get(v, {}).get(entry, {}) for v in VARIANTS]
                values = [p.get(key) if p.get("batch_size") == PAPER_BATCH else None for p in peaks]
                if any(x is not None for x in values):
                    size = next(p.get("tower_micro_batch_size") for p, x in zip(peaks, values) if x is not None)
                    # a baseline could split its batch too (gradient accumulation): M2IST's split is not judged
                    add(goal, f"{how.format(size)}, batch {PAPER_BATCH}", values,
                        lambda x, lim=limit: x <= lim, judged=entry == "live_peak")
        if r is paper[0]:
            add(f"adapter-only params within 5% of {PAPER_ADAPTER_PARAMS / 1e6:.2f}M", "",
                [ms[v]["params"].get("adapter_only") if v in ms else None for v in VARIANTS],
                lambda x: abs(x / PAPER_ADAPTER_PARAMS - 1) <= 0.05, millions)
        if all("step_time" in ms.get(v, {}) for v in VARIANTS):
            add("training-step time <= 50% of full FT", "",
                [ms[v]["step_time"].get("ratio_to_full") for v in VARIANTS], lambda x: x <= 0.5)
            if all(ms[v]["step_time"].get("cpu_ratio_to_full") is not None for v in VARIANTS):
                add("training-step time <= 50% of full FT", "process CPU time",
                    [ms[v]["step_time"]["cpu_ratio_to_full"] for v in VARIANTS], lambda x: x <= 0.5, side=gpu)
        if "inference" in r:
            add("inference latency <= 1.3x towers alone", "",
                [r["inference"].get(v, {}).get("ratio_to_towers") for v in VARIANTS], lambda x: x <= 1.3)
            values = [r["inference"].get(v, {}).get("cpu_ratio_to_towers") for v in VARIANTS]
            if all(x is not None for x in values):
                add("inference latency <= 1.3x towers alone", "process CPU time", values, lambda x: x <= 1.3,
                    side=gpu)
    return checks


NOT_JUDGED = "not judged"


def _cell(cell: tuple[str, bool] | None, judged: bool = True) -> str:
    if cell is None:
        return "n/a"
    return f"{cell[0]} {NOT_JUDGED}" if not judged else f"{cell[0]} **{'met' if cell[1] else 'missed'}**"


def _shape(op: str | None) -> tuple[int, ...] | None:
    """The output shape at the end of a `peak_op` string (`"aten.add.Tensor -> (2, 256, 160, 160)"`)."""
    if not op or "->" not in op:
        return None
    text = op.rsplit("->", 1)[1].strip().strip("()")
    return tuple(int(x) for x in text.split(",") if x.strip())


def _peak_in_towers(op: str | None) -> bool:
    """A 4-D output (a feature map) at the peak: only the vision backbone makes those, before the head runs."""
    shape = _shape(op)
    return bool(shape) and len(shape) == 4


def _frozen_batch_norm(r: dict) -> str:
    """"folded" (into the convolutions), "fused" (one op each) or "stock", from a run's settings (older files: stock)."""
    setting = str(r["settings"].get("frozen_batch_norm", "stock"))
    return next((kind for kind in ("folded", "fused") if setting.startswith(kind)), "stock")


def _comparable_gpu(live: dict, gpus: list[dict], peak_in_towers: bool) -> dict | None:
    """The first GPU run measured with the same implementation and precision as the live-peak run `live`. A peak
    inside the towers' forward happens before the head runs, so only the towers' implementation has to match there."""
    for gpu in gpus:
        same = _frozen_batch_norm(gpu) == _frozen_batch_norm(live) if peak_in_towers else \
            _implementation_notes(gpu) == _implementation_notes(live)
        if same and bool(gpu["settings"].get("bf16")) == bool(live["settings"].get("bf16")):
            return gpu
    return None


def peak_findings(paper: list[dict]) -> list[str]:
    """Why the CUDA peak differs from the exact account, from the peak-of-live-tensors runs (computed, not typed)."""
    intro = ("CUDA peak vs exact account: the methods that keep the ResNet-50 frozen (LoRA, in-tower adapters, head "
             "only, M2IST) peak close to one another on the GPU, although the tensors they save for backward differ "
             "by gigabytes (exact account).")
    lives = [r for r in paper if "live_peak" in r["methods"].get("head_only", {})
             and not r["settings"].get("head_checkpointing")]
    gpus = [r for r in paper if "cuda_peak" in r["methods"].get("head_only", {})
            and not r["settings"].get("head_checkpointing") and not r["settings"].get("tf32")]
    if not lives:
        return [intro + " Where their peak happens has not been measured yet (`memory_time.py` records it).", ""]
    items = []
    for live in lives:
        peak = live["methods"]["head_only"]["live_peak"]
        b = peak["batch_size"]
        in_towers = _peak_in_towers(peak.get("peak_op"))
        where = (", a 4-D feature map, which only the vision backbone produces: the peak is inside the frozen towers' "
                 "forward, before the head runs" if in_towers else "")
        notes = ", ".join(["bf16 autocast"] * bool(live["settings"].get("bf16"))
                          + [f"frozen batch norms {_frozen_batch_norm(live)}"]
                          + [n for n in _implementation_notes(live) if "frozen BN" not in n])
        item = (f"Head only, batch {b} (`{live['_file']}`, {notes}): the peak of live tensors is at "
                f"`{peak['peak_op']}`{where}.")
        gpu = _comparable_gpu(live, gpus, in_towers)
        if gpu is not None:
            cuda = gpu["methods"]["head_only"]["cuda_peak"]
            gpu_batch = cuda.get("batch_size", gpu["settings"]["batch_size"])
            scaled = peak["step_increment"] * gpu_batch / b
            item += (f" Its step increment scaled linearly to batch {gpu_batch} is {mib(scaled)} MiB; the GPU "
                     f"measured {mib(cuda['step_increment'])} MiB (`{gpu['_file']}`, "
                     f"{cuda['step_increment'] / scaled:.3f}x).")
        else:
            scaled = f" scaled linearly to batch {PAPER_BATCH}" if b != PAPER_BATCH else ""
            item += (f" Its step increment{scaled}: {mib(peak['step_increment'] * PAPER_BATCH / b)} MiB; "
                     "no GPU run with this implementation yet.")
        items.append(item)
    at_paper_batch = [r for r in paper if r["methods"].get(GOAL_METHOD, {}).get("live_peak", {})
                      .get("batch_size") == PAPER_BATCH]
    for r in lives + [r for r in at_paper_batch if r not in lives]:
        m = r["methods"].get(GOAL_METHOD, {})
        if "live_peak" not in m or "live_peak" + MICRO not in m:
            continue
        plain, micro = m["live_peak"], m["live_peak" + MICRO]
        item = (f"`{GOAL_METHOD}`, batch {plain['batch_size']} (`{r['_file']}`): training memory "
                f"{mib(plain['training_memory'])} MiB (peak at `{plain['peak_op']}`); with its towers in micro-batches "
                f"of {micro['tower_micro_batch_size']}, {mib(micro['training_memory'])} MiB (peak at "
                f"`{micro['peak_op']}`).")
        gpu = _comparable_gpu(r, gpus, _peak_in_towers(plain.get("peak_op")))
        cuda = gpu["methods"].get(GOAL_METHOD, {}).get("cuda_peak", {}) if gpu else {}
        if "training_memory" in cuda and cuda.get("batch_size", gpu["settings"]["batch_size"]) == plain["batch_size"]:
            item += (f" The GPU's CUDA training memory for it at that batch: {mib(cuda['training_memory'])} MiB "
                     f"(`{gpu['_file']}`, {cuda['training_memory'] / plain['training_memory']:.3f}x the live peak).")
        lora = r["methods"].get("lora", {}).get("live_peak")
        if lora and plain["batch_size"] == PAPER_BATCH:
            item += (f" LoRA's live peak at that batch: {mib(lora['training_memory'])} MiB; M2IST is at "
                     f"{plain['training_memory'] / lora['training_memory']:.3f}x of it, "
                     f"{micro['training_memory'] / lora['training_memory']:.3f}x with micro-batches.")
        items.append(item)
    return [intro + " Measured where it happens:", "", *[f"- {item}" for item in items], ""]


def goals_section(results: list[dict]) -> list[str]:
    checks = paper_goal_checks(results)
    if not checks:
        return ["No paper-scale result yet.", ""]
    lines = ["| goal | source | " + " | ".join(LABELS[m] for m in VARIANTS) + " |",
             "| --- | --- |" + " --- |" * len(VARIANTS)]
    lines += [f"| {c.label} | {c.source} | " + " | ".join(_cell(c.cells[v], c.judged) for v in VARIANTS) + " |"
              for c in checks]
    paper = [r for r in results if r.get("kind") == "memory_time" and r["scale"] == "paper"]
    lines += ["", "The adapter-parameter goal targets the paper's configuration; the cross-attention variants add two "
              "bottleneck attention modules per layer pair by design. The memory goals are stated at the paper's "
              "batch (64): the batch-64 rows are the ones to judge; the measured batch-2 rows are dominated by the "
              "frozen weights every method holds. Head dropout 0.1 is TransVG's (the paper's) setting on the residual "
              "and feed-forward paths; the head's attention dropout is 0 in every method (`head_attention_dropout`, "
              "whose non-zero value makes the attention kernel store its probability maps for backward).",
              "",
              *(["Rows marked \"head checkpointing\" come from runs with gradient checkpointing in every method's "
                 "grounding head (`M2ISTConfig.head_gradient_checkpointing` for M2IST, the same `GroundingHead` "
                 "option for the baselines): like for like, with the head's activations, common to all methods, "
                 "recomputed in backward instead of stored. What remains is what each method itself keeps: the "
                 "side network for M2IST, the towers' activations for LoRA and the adapters. The other rows store "
                 "the head's activations.", ""]
                if any(r["settings"].get("head_checkpointing") for r in paper) else []),
              *(["Rows marked \"head FFN hidden stored\" come from runs whose grounding heads (every method's) keep "
                 "each layer's `(batch, tokens, ffn_dim)` feed-forward hidden tensor for backward: written with "
                 "`--store-head-feed-forward` (`M2ISTConfig.head_recompute_feed_forward=False`) or before the "
                 "head recomputed it by default. The other rows recompute it in backward (one more `linear1` "
                 "matmul and dropout draw per layer).", ""]
                if any("head FFN hidden stored" in _implementation_notes(r) for r in paper) else []),
              *(["Rows marked \"frozen BN not folded\" or \"stock frozen BN\" come from runs whose vision tower (every "
                 "method's) computes its frozen batch norms as separate ops after the convolutions: fused into one "
                 "op (`--unfolded-batch-norm`, or written before the norms were folded) or as transformers has "
                 "them (`--stock-batch-norm`, or written before they were fused). The other rows fold them into the "
                 "convolutions before them (`peft_m2ist.fold_frozen_batch_norms`; the ReLUs after them run in "
                 "place): the same outputs and gradients, without the norms' feature maps.", ""]
                if any("frozen BN" in note for r in paper for note in _implementation_notes(r)) else []),
              *peak_findings(paper)]
    reference = json.loads((HERE / "reference_paper.json").read_text())["methods"]
    for r in paper:
        ms = r["methods"]
        if all("account_extrapolated" in ms.get(m, {}) for m in ("full", "adapter", GOAL_METHOD)):
            ext = r["settings"]["extrapolate_to"]
            parts = [f"{LABELS[m]} {ms[m]['account_extrapolated']['total'] / 1e9:.2f} GB "
                     f"(paper: {reference[ref]['train_memory_gb']} GB)"
                     for m, ref in (("full", "full"), ("adapter", "adapter"), (GOAL_METHOD, "m2ist"))]
            lines += [f"Against the paper's training memory at batch {ext} (`{r['_file']}`, exact account "
                      "extrapolated, 1 GB = 1e9 bytes): " + "; ".join(parts) + ".", ""]
    return lines


def summary_section(results: list[dict]) -> list[str]:
    """One row per goal for `GOAL_METHOD`: every measurement of it (value, machine, how), then how many met."""
    lines = [f"Every measurement of each goal for `{GOAL_METHOD}` (the paper's configuration), gathered from the "
             f"sections below: paper-scale memory at batch {PAPER_BATCH} (the account measured at a small batch, "
             "dominated by the frozen weights, and the CPU time of GPU runs, equal to their wall time, are only in "
             "the full table), "
             "then accuracy on the built-in benchmark. A goal is settled where its measurements agree. Peaks of "
             f"M2IST with its towers in micro-batches are {NOT_JUDGED} (shown for reference, not counted): the "
             "baselines run their batch whole, and could split it too.", "",
             "| goal | measurements | met |", "| --- | --- | ---: |"]
    checks = paper_goal_checks(results)
    for goal in dict.fromkeys(c.goal for c in checks):
        found = [(c, c.cells[GOAL_METHOD]) for c in checks
                 if c.goal == goal and c.in_summary and c.cells.get(GOAL_METHOD)]
        parts = [f"{value} {(NOT_JUDGED if not c.judged else 'met' if met else '**missed**')} ({c.where}"
                 + (f"; {c.how}" if c.how else "") + ")" for c, (value, met) in found]
        judged = [met for c, (_, met) in found if c.judged]
        lines.append(f"| {goal} | " + "<br>".join(parts) + f" | {sum(judged)} of {len(judged)} |")
    for runs in _accuracy_groups(results):
        splits = list(runs[0].get("chance", {}))
        for label, n, cells in accuracy_goal_checks(runs, splits):
            if cells is None:
                lines.append(f"| Acc@0.5 {label} ({runs[0]['scale']} scale) | not run | |")
                continue
            parts = [f"{c.split} {100 * c.diff:+.1f} points {'met' if c.met else '**missed**'}{_per_seed(c.per_seed)}"
                     for c in cells]
            lines.append(f"| Acc@0.5 {label} ({runs[0]['scale']} scale, mean of {n} seed{'s' if n > 1 else ''}) | "
                         + "<br>".join(parts) + f" | {sum(c.met for c in cells)} of {len(cells)} |")
    return [*lines, ""]


# ---------------------------------------------------------------------------------------------- accuracy + figure
def _accuracy_groups(results: list[dict]) -> list[list[dict]]:
    """Accuracy runs grouped by scale and settings, the seed aside (one group = one comparison, several seeds)."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        if r.get("kind") == "accuracy":
            key = json.dumps([r["scale"], {k: v for k, v in r["settings"].items() if k != "seed"}], sort_keys=True)
            groups.setdefault(key, []).append(r)
    return list(groups.values())


def _mean_accuracy(runs: list[dict], method: str, split: str) -> float | None:
    """Mean Acc@0.5 of `method` on `split` over the runs (seeds) that trained it."""
    values = [r["methods"][method]["scores"][split]["accuracy"] for r in runs if method in r["methods"]]
    return sum(values) / len(values) if values else None


def accuracy_section(results: list[dict]) -> list[str]:
    groups = _accuracy_groups(results)
    if not groups:
        return ["Not run yet. The script is ready (`benchmarks/accuracy.py`: equal budget = the same optimiser steps, "
                "batch, schedule and data order for every method, Acc@0.5 on val / test / test_heldout of the "
                "built-in shapes benchmark):", "", "    python benchmarks/accuracy.py", ""]
    lines = []
    for runs in groups:
        first = runs[0]
        s = first["settings"]
        splits = list(first.get("chance", {}))
        seeds = [r["settings"]["seed"] for r in runs]
        lines += [f"### {first['scale']} scale: {first.get('scale_description', '')}", ""]
        for r in runs:
            lines += [f"- Seed {r['settings']['seed']}: {machine_line(r)}; `{r['command']}` -> `{r['_file']}`"
                      + ("" if len(r["methods"]) == len(first["methods"]) else
                         f" ({len(r['methods'])} of the methods)")]
        lines += [f"- Every method: {s['steps']} optimiser steps at batch {s['batch_size']}, the same data order; "
                  f"grounding head {s.get('head_layers', 6)} layers x FFN {s.get('head_ffn_dim', 2048)}; AdamW, lr "
                  f"{s['lr_head']:g} (projections + head), {s['lr_adapter']:g} (adapters of any kind, LoRA), "
                  f"{s['lr_tower']:g} (tower weights, full fine-tuning); warm-up {s['warmup_ratio']:g} then cosine; "
                  f"augmentation {'on' if s.get('augment') else 'off'}.",
                  "- Chance level (the best constant box per phrase type): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in first.get("chance", {}).items()), "",
                  "| method | seed | trainable | train memory MiB (exact, step 1) | train wall s (shared cores) | "
                  + " | ".join(f"Acc@0.5 {sp}" for sp in splits) + " |",
                  "| --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(splits)]
        for m in _ordered({m: None for r in runs for m in r["methods"]}):
            for r in runs:
                if m not in r["methods"]:
                    continue
                e = r["methods"][m]
                lines.append(f"| {LABELS.get(m, m)} | {r['settings']['seed']} | {millions(e['params']['trainable'])}"
                             f" | {mib(e['account']['total'])} | {e['train_time_s']:.0f} | "
                             + " | ".join(f"{e['scores'][sp]['accuracy']:.3f}" for sp in splits) + " |")
        lines.append("")
        lines += _accuracy_by_phrase_type(runs, "test" if "test" in splits else splits[0])
        lines += _accuracy_goals(runs, splits, seeds)
    return lines


def _accuracy_by_phrase_type(runs: list[dict], split: str) -> list[str]:
    """Mean Acc@0.5 per phrase type (the benchmark's `phrase_type` column) on `split`, over the seeds."""
    methods = _ordered({m: None for r in runs for m in r["methods"]})
    types = sorted({k[len("accuracy_"):] for r in runs for e in r["methods"].values()
                    for k in e["scores"].get(split, {}) if k.startswith("accuracy_")})
    if not types:
        return []
    lines = [f"Acc@0.5 on {split} by phrase type (mean over seeds):", "",
             "| method | " + " | ".join(types) + " |", "| --- |" + " ---: |" * len(types)]
    for m in methods:
        cells = []
        for t in types:
            values = [r["methods"][m]["scores"][split][f"accuracy_{t}"] for r in runs if m in r["methods"]]
            cells.append(f"{sum(values) / len(values):.3f}")
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


ACCURACY_GOALS = (("full", "within 2 points of full fine-tuning", lambda d: d >= -0.02),
                  ("lora", "above LoRA", lambda d: d > 0),
                  ("head_only", "above head only", lambda d: d > 0))


@dataclass
class SplitCheck:
    """One accuracy goal on one split: means over the seeds that trained both methods (fractions, not points)."""

    split: str
    mine: float  # GOAL_METHOD
    theirs: float  # the method compared with
    met: bool
    per_seed: list[float]  # GOAL_METHOD minus the other, seed by seed

    @property
    def diff(self) -> float:
        return self.mine - self.theirs


def _scores_by_seed(runs: list[dict]) -> dict[int, dict[str, dict]]:
    """Each seed's method entries, gathered from every run (file) of that seed: a method may be trained apart."""
    by_seed: dict[int, dict[str, dict]] = {}
    for r in runs:
        by_seed.setdefault(r["settings"]["seed"], {}).update(r["methods"])
    return by_seed


def accuracy_goal_checks(runs: list[dict], splits: list[str], method: str = GOAL_METHOD,
                         ) -> list[tuple[str, int, list[SplitCheck] | None]]:
    """Per accuracy goal of `method`: its label, the number of seeds that trained both methods (in one run or in two
    runs of that seed), and one `SplitCheck` per split (None when no seed trained both)."""
    by_seed = _scores_by_seed(runs)
    checks = []
    for other, label, holds in ACCURACY_GOALS:
        both = [{"methods": ms} for ms in by_seed.values() if method in ms and other in ms]
        if not both:
            checks.append((label, 0, None))
            continue
        cells = []
        for sp in splits:
            mine, theirs = _mean_accuracy(both, method, sp), _mean_accuracy(both, other, sp)
            per_seed = [_mean_accuracy([r], method, sp) - _mean_accuracy([r], other, sp) for r in both]
            cells.append(SplitCheck(sp, mine, theirs, bool(holds(mine - theirs)), per_seed))
        checks.append((label, len(both), cells))
    return checks


def _per_seed(differences: list[float]) -> str:
    """` (per seed -0.8 / -5.1 / -0.4; standard error 1.5)`, in points, when there is more than one seed; else ''.

    The standard error is that of the mean paired difference (sample standard deviation / sqrt(seeds)): how far the
    mean may move with other seeds."""
    if len(differences) < 2:
        return ""
    error = statistics.stdev(differences) / math.sqrt(len(differences))
    return (" (per seed " + " / ".join(f"{100 * d:+.1f}" for d in differences)
            + f"; standard error {100 * error:.1f})")


def _accuracy_goals(runs: list[dict], splits: list[str], seeds: list[int]) -> list[str]:
    """The issue's accuracy goals for `GOAL_METHOD`, then the same comparisons for the other M2IST variants trained,
    each on the mean over the seeds that trained both methods compared."""
    lines = [f"Goals (mean Acc@0.5 over the seeds that trained both methods; seeds run: {sorted(set(seeds))}):", "",
             "| goal | " + " | ".join(splits) + " |", "| --- |" + " --- |" * len(splits)]
    trained = {m for r in runs for m in r["methods"]}
    for method in [GOAL_METHOD, *(m for m in _ordered(trained) if m.startswith("m2ist_") and m != GOAL_METHOD)]:
        for label, n, cells in accuracy_goal_checks(runs, splits, method):
            if cells is None:
                lines.append(f"| {LABELS.get(method, method)} {label} |" + " not run |" * len(splits))
                continue
            lines.append(f"| {LABELS.get(method, method)} {label} ({n} seed{'s' if n > 1 else ''}) | "
                         + " | ".join(f"{100 * c.mine:.1f} vs {100 * c.theirs:.1f} ({100 * c.diff:+.1f}) "
                                      f"**{'met' if c.met else 'missed'}**" + _per_seed(c.per_seed) for c in cells)
                         + " |")
    lines.append("")
    return lines


def make_figure(results: list[dict]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = _accuracy_groups(results)
    if groups:
        runs = groups[0]
        r = runs[0]
        split = "test" if "test" in r.get("chance", {}) else next(iter(r["chance"]))
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in _ordered({m: None for run in runs for m in run["methods"]}):
            # memory from the newest run: the account of the current implementation (accuracy is the seeds' mean)
            e = max((run for run in runs if m in run["methods"]), key=lambda run: run["machine"].get("date", ""))[
                "methods"][m]
            x, y = e["account"]["total"] / 2**20, 100 * _mean_accuracy(runs, m, split)
            color = "C3" if m.startswith("m2ist") else "C0"
            seeds = [100 * run["methods"][m]["scores"][split]["accuracy"] for run in runs if m in run["methods"]]
            if len(seeds) > 1:  # the range over seeds
                ax.errorbar(x, y, yerr=[[y - min(seeds)], [max(seeds) - y]], fmt="none", ecolor=color, alpha=0.5,
                            capsize=3, linewidth=1)
            ax.scatter(x, y, s=20 + e["params"]["trainable"] / 2e5, alpha=0.7, color=color)
            ax.annotate(LABELS.get(m, m), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.axhline(100 * r["chance"][split], color="grey", linestyle=":", linewidth=1)
        ax.annotate("chance", (0, 100 * r["chance"][split]), xycoords=("axes fraction", "data"), fontsize=7,
                    xytext=(4, 2), textcoords="offset points", color="grey")
        ax.set_xscale("log")
        ax.margins(x=0.35)  # room for the labels of the outermost points
        ax.set_xlabel(f"training memory, MiB (exact account of the newest run, batch {r['settings']['batch_size']}, "
                      "log scale)")
        ax.set_ylabel(f"Acc@0.5 on {split} (%), mean over seeds (bars: range)")
        ax.set_title(f"Accuracy vs training memory ({r['scale']} scale; marker size ~ trainable params)",
                     fontsize=10)
    else:
        mt = [r for r in results if r.get("kind") == "memory_time" and all(
            "account" in e for e in r["methods"].values()) and not r["machine"].get("gpu")]
        if not mt:
            return None
        fig, axes = plt.subplots(1, len(mt), figsize=(5.5 * len(mt), 4.2), squeeze=False, sharey=True)
        for ax, r in zip(axes[0], mt):
            ms = _ordered(r["methods"])
            ext = all("account_extrapolated" in r["methods"][m] for m in ms)
            key_b = r["settings"]["extrapolate_to"] if ext else r["settings"]["account_batches"][-1]
            vals = [(r["methods"][m]["account_extrapolated"] if ext else
                     r["methods"][m]["account"][str(key_b)])["total"] / 2**30 for m in ms]
            ax.barh([LABELS.get(m, m) for m in ms], vals, color=["C0" if m.startswith("m2ist") else "C7" for m in ms])
            for i, v in enumerate(vals):
                ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(f"GiB, exact account, batch {key_b}" + (" (extrap.)" if ext else ""))
            ax.set_title(f"{r['scale']} scale, {r['settings']['image_size']} px, head dropout "
                         f"{r['settings'].get('head_dropout', 0.1)}", fontsize=10)
        fig.suptitle("Training memory per method (accuracy not measured yet: axis pending benchmarks/accuracy.py)")
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=120)
    plt.close(fig)
    return FIGURE.relative_to(HERE).as_posix()


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    results = load_results()
    reference = json.loads((HERE / "reference_paper.json").read_text())
    figure = make_figure(results)
    lines = ["# Benchmarks", "",
             "Generated by `python benchmarks/report.py` from the JSON files in `benchmarks/results/`; every figure "
             "below comes from one of them (the file and the command that wrote it are named in each section). "
             "Timings are on the machine named in each section and compare methods measured in the same process "
             "(interleaved rounds); ratios are the portable numbers.", ""]
    lines += ["## Summary", ""]
    lines += summary_section(results)
    lines += ["## Goals (paper scale)", "",
              f"Goals of the issue, checked for each M2IST variant. `{GOAL_METHOD}` is the paper's configuration.", ""]
    lines += goals_section(results)
    lines += ["## Paper reference", "", f"From `benchmarks/reference_paper.json` ({reference['source']}):", "",
              "| method | tunable | train memory GB | x full | epoch min | RefCOCO val |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    full_gb = reference["methods"]["full"]["train_memory_gb"]
    for e in reference["methods"].values():
        lines.append(f"| {e['label']} | {millions(e['tunable_params'])} | {e['train_memory_gb']} | "
                     f"{e['train_memory_gb'] / full_gb:.3f} | {e['epoch_min']} | {e['refcoco_val']} |")
    lines.append("")
    lines += ["## Memory and time", ""]
    for r in results:
        if r.get("kind") == "memory_time":
            lines += memory_time_section(r)
    lines += ["## Accuracy at equal budget", ""]
    lines += accuracy_section(results)
    if figure:
        lines += ["## Figure", "", f"![accuracy vs training memory]({figure})", ""]
    lines += ["## How the numbers are made", "",
              "- `benchmarks/memory_time.py`: builds every method on deep copies of the same towers in one process; "
              "exact account (`torch.autograd.graph.saved_tensors_hooks`, storages deduplicated by "
              "`untyped_storage().data_ptr()`, parameter/buffer storages excluded from activations and counted once "
              "in weights; gradients and AdamW state read from the tensors after the step); the peak of live tensors "
              "over a step (`LiveTensorPeak`, a `TorchDispatchMode`; on any device); on a GPU also "
              "`torch.cuda.max_memory_allocated`; both peaks for M2IST also with its towers in micro-batches; "
              "interleaved step timing (each M2IST variant also from tower "
              "features computed beforehand, as train_rec's feature cache does: reported apart, not like for like); "
              "inference latency.",
              "- `benchmarks/gpu_paper_scale.py`: the same at paper scale, batch 64, with a global time budget.",
              "- `benchmarks/accuracy.py`: equal-budget training on the built-in shapes benchmark.",
              "- Gradient-based baselines (full, LoRA, adapters) run the towers in train mode (dropout on), as a "
              "practitioner would; head-only and M2IST run them in eval mode under `no_grad`. DETR's decoder is "
              "removed from the vision tower for every method (no REC forward runs it).",
              "- LoRA and the bottleneck adapters sit in DETR's transformer encoder and BERT only, so their backward "
              "stops at DETR's input projection and never enters the ResNet-50; that makes them much lighter than "
              "full fine-tuning, and it is why the M2IST-vs-LoRA ratio is far from the M2IST-vs-full ratio: the "
              "grounding head, common to all methods, holds most of what LoRA keeps.",
              "- What is saved for backward depends on the kernels the device picks (e.g. dropout: the CPU kernel keeps "
              "a float32 mask, 4 bytes per element, the CUDA kernel a bool one, 1 byte; the head's attention, with "
              "attention dropout 0, runs a fused kernel on both that keeps no attention probabilities), so the CPU "
              "account is exact for the CPU kernels; the GPU runs record their own account at the real batch.", ""]
    RESULTS_MD.write_text("\n".join(lines))
    print(f"wrote {RESULTS_MD.relative_to(HERE.parent)}" + (f" and {figure}" if figure else ""))


if __name__ == "__main__":
    main()
