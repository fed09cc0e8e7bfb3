"""The memory and time section of one result file, and where the peaks happen (from the peak-of-live-tensors runs)."""

from __future__ import annotations

from benchmarks.reporting.base import (
    GOAL_METHOD,
    LABELS,
    MICRO,
    PAPER_BATCH,
    PROSE,
    frozen_batch_norm,
    gib,
    implementation_notes,
    machine_line,
    mib,
    millions,
    ordered,
    ratio,
)


def memory_time_section(r: dict) -> list[str]:
    s = r["settings"]
    methods = r["methods"]
    b = str(s["account_batches"][-1])
    lines = [
        PROSE.run_heading(r["scale"], "GPU" if r["machine"].get("gpu") else "CPU", r["scale_description"]),
        "",
        PROSE.run_machine(machine_line(r)),
        PROSE.run_command(r["command"], r["_file"], r.get("finished")),
        PROSE.run_settings(s, s.get("head_dropout", 0.1), frozen_batch_norm(r), implementation_notes(r)),
        "",
    ]
    if all("account" in methods[m] for m in methods):
        lines += _account_table(methods, b, s)
    if any("live_peak" in methods[m] for m in methods):
        lines += _peak_table(methods, "live_peak", PROSE.live_peak_caption(_peak_batch(methods, "live_peak")),
                             ["where the peak is"], lambda p: [f"`{p.get('peak_op')}`"])
    if any("cuda_peak" in methods[m] for m in methods):
        lines += _peak_table(methods, "cuda_peak", PROSE.cuda_peak_caption(),
                             ["peak allocated GiB (all resident models)"], lambda p: [gib(p.get("peak_allocated"))],
                             numeric_extras=True)
    if any("step_time" in methods[m] for m in methods):
        lines += _step_time_table(methods, s)
    if "inference" in r:
        lines += [PROSE.inference_caption(r.get("inference_batch_size")), "",
                  "| model | median wall s | rounds | x towers alone (wall) | x towers alone (CPU) |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name, e in r["inference"].items():
            label = "towers alone" if name == "towers_only" else LABELS.get(name, name)
            lines.append(f"| {label} | {e['median_s']:.4f} | {len(e['times_s'])} | {ratio(e['ratio_to_towers'])} | "
                         f"{ratio(e.get('cpu_ratio_to_towers'))} |")
        lines.append("")
    lines += [PROSE.methods_caption(), ""]
    lines += [f"- `{m}`: {methods[m]['note']}" for m in ordered(methods)]
    lines.append("")
    return lines


def _account_table(methods: dict, b: str, s: dict) -> list[str]:
    has_ext = all("account_extrapolated" in methods[m] for m in methods)
    ext_b = s.get("extrapolate_to")
    head = (f"| method | trainable | tunable excl. proj.+head | weights MiB | grads + AdamW MiB | activations MiB "
            f"@{b} | total MiB @{b} | x full | x LoRA |")
    sep = "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    if has_ext:
        head += f" total GiB @{ext_b} (extrap.) | x full | x LoRA |"
        sep += " ---: | ---: | ---: |"
    lines = [PROSE.account_caption(), "", head, sep]
    for m in ordered(methods):
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
        lines += [PROSE.extrapolation_note(ext_b, s["account_batches"]), ""]
    if "head_only" in methods and GOAL_METHOD in methods:
        ho = methods["head_only"]["account"][b]["activations"]
        mm = methods[GOAL_METHOD]["account"][b]["activations"]
        lines += [PROSE.activations_share(mib(ho), mib(mm), GOAL_METHOD, b, f"{100 * ho / mm:.0f}")
                  + head_only_floor(methods, has_ext), ""]
    return lines


def head_only_floor(methods: dict, extrapolated: bool) -> str:
    """The head-only run's share of LoRA at the extrapolated batch: the least any method that adds its own memory to
    this head can reach against LoRA, which has the same head."""
    x = methods["head_only"].get("account_extrapolated") if extrapolated else None
    if not x or "ratio_to_lora" not in x:
        return ""
    return " " + PROSE.head_only_floor(f"{x['ratio_to_lora']:.3f}", x["batch_size"])


def _step_time_table(methods: dict, s: dict) -> list[str]:
    lines = [PROSE.step_time_caption(s["batch_size"], s["warmup"]), "",
             "| method | median wall s | rounds | x full (wall) | median CPU s | x full (CPU) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    rows = [(LABELS.get(m, m), methods[m].get("step_time", {})) for m in ordered(methods)]
    cached = [m for m in ordered(methods) if "step_time_cached_features" in methods[m]]
    rows += [(f"{LABELS.get(m, m)}, from cached tower features*", methods[m]["step_time_cached_features"])
             for m in cached]
    for label, t in rows:
        med, cpu = t.get("median_s"), t.get("median_cpu_s")
        lines.append(f"| {label} | {'n/a' if med is None else f'{med:.3f}'} | "
                     f"{len(t.get('times_s', []))} | {ratio(t.get('ratio_to_full'))} | "
                     f"{'n/a' if cpu is None else f'{cpu:.3f}'} | {ratio(t.get('cpu_ratio_to_full'))} |")
    lines += ["", PROSE.cpu_time_note(), ""]
    if cached:
        lines += [PROSE.cached_features_note(), ""]
    lines.append("")
    return lines


def _peak_batch(methods: dict, key: str) -> int | None:
    return next((e[key].get("batch_size") for e in methods.values() if key in e), None)


def _peak_table(methods: dict, key: str, title: str, extra_heads: list[str], extra_cells,
                numeric_extras: bool = False) -> list[str]:
    """One row per method from `methods[m][key]`, then M2IST's rows with its towers in micro-batches (`key + MICRO`)."""
    lines = [title, "", "| method | training memory MiB | x full | x LoRA | " + " | ".join(extra_heads) + " |",
             "| --- | ---: | ---: | ---: |" + (" ---: |" if numeric_extras else " --- |") * len(extra_heads)]
    rows = [(LABELS.get(m, m), methods[m].get(key, {})) for m in ordered(methods)]
    micro = [m for m in ordered(methods) if key + MICRO in methods[m]]
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
        lines += [PROSE.micro_batches_note(), ""]
    return lines


# ---------------------------------------------------------------------------------------------- where the peak is
def shape(op: str | None) -> tuple[int, ...] | None:
    """The output shape at the end of a `peak_op` string (`"aten.add.Tensor -> (2, 256, 160, 160)"`)."""
    if not op or "->" not in op:
        return None
    text = op.rsplit("->", 1)[1].strip().strip("()")
    return tuple(int(x) for x in text.split(",") if x.strip())


def _peak_in_towers(op: str | None) -> bool:
    """A 4-D output (a feature map) at the peak: only the vision backbone makes those, before the head runs."""
    found = shape(op)
    return bool(found) and len(found) == 4


def _comparable_gpu(live: dict, gpus: list[dict], peak_in_towers: bool) -> dict | None:
    """The first GPU run measured with the same implementation and precision as the live-peak run `live`. A peak
    inside the towers' forward happens before the head runs, so only the towers' implementation has to match there."""
    for gpu in gpus:
        same = frozen_batch_norm(gpu) == frozen_batch_norm(live) if peak_in_towers else \
            implementation_notes(gpu) == implementation_notes(live)
        if same and bool(gpu["settings"].get("bf16")) == bool(live["settings"].get("bf16")):
            return gpu
    return None


def peak_findings(paper: list[dict]) -> list[str]:
    """Why the CUDA peak differs from the exact account, from the peak-of-live-tensors runs (computed, not typed)."""
    lives = [r for r in paper if "live_peak" in r["methods"].get("head_only", {})
             and not r["settings"].get("head_checkpointing")]
    gpus = [r for r in paper if "cuda_peak" in r["methods"].get("head_only", {})
            and not r["settings"].get("head_checkpointing") and not r["settings"].get("tf32")]
    if not lives:
        return [PROSE.peaks_not_measured(), ""]
    items = [_head_only_peak(live, gpus) for live in lives]
    at_paper_batch = [r for r in paper if r["methods"].get(GOAL_METHOD, {}).get("live_peak", {})
                      .get("batch_size") == PAPER_BATCH]
    for r in lives + [r for r in at_paper_batch if r not in lives]:
        m = r["methods"].get(GOAL_METHOD, {})
        if "live_peak" in m and "live_peak" + MICRO in m:
            items.append(_micro_batches_peak(r, m["live_peak"], m["live_peak" + MICRO], gpus))
    return [PROSE.peaks_measured(), "", *[f"- {item}" for item in items], ""]


def _head_only_peak(live: dict, gpus: list[dict]) -> str:
    peak = live["methods"]["head_only"]["live_peak"]
    b = peak["batch_size"]
    in_towers = _peak_in_towers(peak.get("peak_op"))
    notes = ", ".join(["bf16 autocast"] * bool(live["settings"].get("bf16"))
                      + [f"frozen batch norms {frozen_batch_norm(live)}"]
                      + [n for n in implementation_notes(live) if "frozen BN" not in n])
    item = PROSE.peak_head_only(b, live["_file"], notes, peak["peak_op"], in_towers)
    gpu = _comparable_gpu(live, gpus, in_towers)
    if gpu is not None:
        cuda = gpu["methods"]["head_only"]["cuda_peak"]
        gpu_batch = cuda.get("batch_size", gpu["settings"]["batch_size"])
        scaled = peak["step_increment"] * gpu_batch / b
        return item + " " + PROSE.peak_vs_gpu(gpu_batch, mib(scaled), mib(cuda["step_increment"]), gpu["_file"],
                                              f"{cuda['step_increment'] / scaled:.3f}")
    return item + " " + PROSE.peak_without_gpu(PAPER_BATCH if b != PAPER_BATCH else None,
                                               mib(peak["step_increment"] * PAPER_BATCH / b))


def _micro_batches_peak(r: dict, plain: dict, micro: dict, gpus: list[dict]) -> str:
    item = PROSE.peak_micro_batches(GOAL_METHOD, plain["batch_size"], r["_file"], mib(plain["training_memory"]),
                                    plain["peak_op"], micro["tower_micro_batch_size"],
                                    mib(micro["training_memory"]), micro["peak_op"])
    gpu = _comparable_gpu(r, gpus, _peak_in_towers(plain.get("peak_op")))
    cuda = gpu["methods"].get(GOAL_METHOD, {}).get("cuda_peak", {}) if gpu else {}
    if "training_memory" in cuda and cuda.get("batch_size", gpu["settings"]["batch_size"]) == plain["batch_size"]:
        item += " " + PROSE.peak_micro_vs_gpu(mib(cuda["training_memory"]), gpu["_file"],
                                              f"{cuda['training_memory'] / plain['training_memory']:.3f}")
    lora = r["methods"].get("lora", {}).get("live_peak")
    if lora and plain["batch_size"] == PAPER_BATCH:
        item += " " + PROSE.peak_micro_vs_lora(mib(lora["training_memory"]),
                                               f"{plain['training_memory'] / lora['training_memory']:.3f}",
                                               f"{micro['training_memory'] / lora['training_memory']:.3f}")
    return item
