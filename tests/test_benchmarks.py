"""The benchmark machinery on small inputs: the exact memory account, the timing of M2IST from cached tower features,
and the report's accuracy goals."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

from benchmarks import measurement, memory_time
from benchmarks.reporting import accuracy, base, goals, memory


class _TwoLinears(nn.Module):
    """x (batch, 4) -> Linear(4, 8) -> tanh -> Linear(8, 1); loss = sum. Optionally the first block checkpointed."""

    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        self.first, self.second, self.checkpointed = nn.Linear(4, 8), nn.Linear(8, 1), checkpointed

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.first(x))

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        x = x * 2  # an activation the checkpointed block takes as input
        if self.checkpointed:
            hidden = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)
        else:
            hidden = self.block(x)
        return SimpleNamespace(loss=self.second(hidden).sum())


def test_exact_account_counts_grads_adamw_state_and_checkpoint_inputs():
    batch = 5
    accounts = {}
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = _TwoLinears(checkpointed)
        accounts[checkpointed] = measurement.exact_account(model, torch.optim.AdamW(model.parameters()),
                                                 {"x": torch.randn(batch, 4)})
    plain, ckpt = accounts[False], accounts[True]
    param_bytes = (4 * 8 + 8 + 8 * 1 + 1) * 4
    for account in (plain, ckpt):
        assert account["weights"] == account["trainable"] == account["grads"] == param_bytes
        # AdamW: exp_avg and exp_avg_sq per parameter, plus one float32 `step` per parameter tensor
        assert account["optimizer"] == 2 * param_bytes + 4 * 4
        assert account["total"] == param_bytes * 2 + account["optimizer"] + account["activations"]
    # Without checkpointing: x*2 (saved by Linear 1), tanh's output (saved by tanh and Linear 2): 5x4 + 5x8 floats.
    assert plain["activations"] == (batch * 4 + batch * 8) * 4
    # With it: the block's input (kept for the recompute) and tanh's output (saved by Linear 2, outside the block).
    assert ckpt["activations"] == (batch * 4 + batch * 8) * 4
    assert plain["params_saved"] > 0


def test_saved_for_backward_counts_only_storages_alive_at_the_end_of_forward():
    """A tensor saved by a part of the graph the forward then drops is not kept for backward."""
    x = torch.randn(4096, requires_grad=True)
    with measurement.SavedForBackward() as saved:
        dropped_input = torch.randn(4096)
        dropped = x * dropped_input  # saves `dropped_input` (16 KiB) ...
        kept = x.exp()  # saves its result (16 KiB)
        del dropped, dropped_input  # ... and the graph that held it is gone
    assert saved.nbytes == 4096 * 4
    kept.sum().backward()


def test_exact_account_restores_torch_checkpoint():
    real = torch.utils.checkpoint.checkpoint
    model = _TwoLinears(checkpointed=True)
    measurement.exact_account(model, torch.optim.AdamW(model.parameters()), {"x": torch.randn(2, 4)})
    assert torch.utils.checkpoint.checkpoint is real


def test_live_tensor_peak_counts_each_new_storage_until_it_is_freed():
    with measurement.LiveTensorPeak() as tracker:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 4000 more: 8000 live
        del a
        view = b.view(10, 100)  # a view allocates nothing; `a` is seen gone at this op
        d = torch.ones(500)  # 2000 bytes: 6000 live
    assert tracker.peak == 8000
    assert tracker.current == 6000
    assert "mul" in tracker.peak_op and tracker.peak_op.endswith("(1000,)")
    del view, d


def test_live_peak_finds_the_frozen_towers_and_micro_batches_lower_it():
    from peft import get_peft_model
    from tiny_towers import batch, build_pair, tiny_config

    peaks = {}
    for size in (None, 2):
        torch.manual_seed(0)
        model = get_peft_model(build_pair("mobilenet_v2+bert"), tiny_config(tower_micro_batch_size=size)).train()
        optimizer = measurement.make_optimizer(model)
        peaks[size] = measurement.live_peak(model, optimizer, batch(size=8))
    whole, micro = peaks[None], peaks[2]
    # the whole batch peaks on a feature map of the frozen CNN: (batch, channels, h, w)
    assert whole["peak_op"].startswith("aten.convolution") and whole["peak_op"].endswith(")")
    assert memory.shape(whole["peak_op"])[0] == 8
    assert micro["step_increment"] < 0.5 * whole["step_increment"]
    for p in (whole, micro):
        assert p["training_memory"] == p["step_increment"] + p["own_weights"] + p["own_optimizer"]
        assert p["own_optimizer"] > 0  # the warm-up step created the AdamW state


@pytest.mark.slow
def test_memory_time_records_live_peaks_and_m2ist_micro_batches_apart(tmp_path):
    out = tmp_path / "memory_time.json"
    args = memory_time.parse_args(["--scale", "default", "--methods", "full", "head_only", "m2ist_shared_sum",
                                   "--skip", "account", "time", "inference", "--output", str(out)])
    memory_time.run(args, log=lambda *_: None)
    result = {**json.loads(out.read_text()), "_file": out.name}
    methods = result["methods"]
    assert all(methods[m]["live_peak"]["batch_size"] == 2 for m in methods)
    assert [m for m in methods if "live_peak_tower_micro_batches" in methods[m]] == ["m2ist_shared_sum"]
    micro = methods["m2ist_shared_sum"]["live_peak_tower_micro_batches"]
    assert micro["tower_micro_batch_size"] == 1
    full = methods["full"]["live_peak"]["training_memory"]
    assert micro["ratio_to_full"] == pytest.approx(micro["training_memory"] / full)
    table = "\n".join(memory.memory_time_section(result))
    assert "**Peak of live tensors**" in table and "towers in micro-batches of 1†" in table
    assert "| head only (frozen towers) |" in table


@pytest.mark.slow
def test_memory_time_times_m2ist_from_cached_tower_features_apart(tmp_path):
    out = tmp_path / "memory_time.json"
    args = memory_time.parse_args(["--scale", "default", "--methods", "full", "m2ist_shared_sum", "--repeats", "1",
                                   "--warmup", "0", "--skip", "account", "live_peak", "inference", "--channels-last",
                                   "--output", str(out)])
    memory_time.run(args, log=lambda *_: None)
    assert json.loads(out.read_text())["settings"]["channels_last"] is True
    methods = json.loads(out.read_text())["methods"]
    assert set(methods) == {"full", "m2ist_shared_sum"}  # the cached variant is not a method of its own
    assert "step_time_cached_features" not in methods["full"]
    cached = methods["m2ist_shared_sum"]["step_time_cached_features"]
    assert len(cached["times_s"]) == 1 and cached["median_s"] > 0
    assert cached["ratio_to_full"] == pytest.approx(cached["median_s"] / methods["full"]["step_time"]["median_s"])
    result = {**json.loads(out.read_text()), "_file": out.name}
    table = "\n".join(memory.memory_time_section(result))
    assert "from cached tower features*" in table and "Not like for like" in table
    assert "; vision tower channels-last (every method)" in table


def _accuracy_run(seed: int, scores: dict[str, float]) -> dict:
    return {"kind": "accuracy", "scale": "default", "settings": {"seed": seed, "steps": 10},
            "chance": {"val": 0.2}, "methods": {m: {"scores": {"val": {"accuracy": a}}} for m, a in scores.items()}}


def test_accuracy_goals_compare_means_over_shared_seeds():
    runs = [_accuracy_run(1, {"m2ist_shared_sum": 0.70, "full": 0.71, "lora": 0.60, "head_only": 0.72}),
            _accuracy_run(2, {"m2ist_shared_sum": 0.74, "head_only": 0.70})]
    groups = accuracy.accuracy_groups([*runs, {"kind": "memory_time"}])
    assert groups == [runs]
    lines = accuracy._accuracy_goals(runs, ["val"], [1, 2])

    def row(goal: str) -> str:
        (line,) = [line for line in lines if f"(paper) {goal} (" in line]
        return line

    full = row("within 2 points of full fine-tuning")
    assert "70.0 vs 71.0 (-1.0) **met**" in full and "(1 seed)" in full  # only seed 1 trained full
    assert "70.0 vs 60.0 (+10.0) **met**" in row("above LoRA")
    head = row("above head only")
    # the paired differences -2 and +4 points: standard deviation 4.24, standard error 4.24 / sqrt(2) = 3.0
    assert "72.0 vs 71.0 (+1.0) **met** (per seed -2.0 / +4.0; standard error 3.0)" in head and "(2 seeds)" in head
    runs[0]["methods"]["full"]["scores"]["val"]["accuracy"] = 0.75
    rows = accuracy._accuracy_goals(runs, ["val"], [1, 2])
    assert any("70.0 vs 75.0 (-5.0) **missed**" in line for line in rows)



def test_accuracy_goals_pair_seeds_across_runs_and_cover_every_m2ist_variant():
    # seed 1 trained its baselines and the paper's configuration in one run and another variant in a second run
    runs = [_accuracy_run(1, {"m2ist_shared_sum": 0.70, "lora": 0.72, "full": 0.60, "head_only": 0.50}),
            _accuracy_run(1, {"m2ist_cross_attention_sum": 0.75}),
            _accuracy_run(2, {"m2ist_cross_attention_sum": 0.80})]  # no baseline for seed 2: not compared
    assert accuracy.accuracy_groups(runs) == [runs]
    lines = accuracy._accuracy_goals(runs, ["val"], [1, 1, 2])
    assert lines[0].endswith("seeds run: [1, 2]):")
    (paper,) = [line for line in lines if "(paper) above LoRA (" in line]
    assert "70.0 vs 72.0 (-2.0) **missed**" in paper
    (cross,) = [line for line in lines if line.startswith("| M2IST cross-attention / sum above LoRA (")]
    assert "(1 seed)" in cross and "75.0 vs 72.0 (+3.0) **met**" in cross
    # the summary judges the paper's configuration only
    (check,) = [cells for label, _, cells in accuracy.accuracy_goal_checks(runs, ["val"]) if label == "above LoRA"]
    assert check[0].mine == pytest.approx(0.70)


def _paper_run(full_ratio_at_64: float, full_ratio_at_2: float) -> dict:
    entry = {"params": {"adapter_only": 2_961_408},
             "account": {"2": {"ratio_to_full": full_ratio_at_2, "ratio_to_lora": 0.9}},
             "account_extrapolated": {"ratio_to_full": full_ratio_at_64, "ratio_to_lora": 0.4}}
    return {"kind": "memory_time", "scale": "paper", "_file": "results/x.json",
            "settings": {"account_batches": [1, 2], "extrapolate_to": 64, "batch_size": 2,
                         "frozen_batch_norm": "folded into the convolutions before them (53 modules)",
                         "head_feed_forward": "hidden recomputed (...)"},
            "machine": {"gpu": None, "torch_threads": 1}, "methods": {v: entry for v in base.VARIANTS}}


def test_summary_judges_memory_at_the_papers_batch_only():
    lines = goals.summary_section([_paper_run(0.2, 0.3)])
    (memory,) = [line for line in lines if line.startswith("| training memory <= 25% of full FT |")]
    assert "0.200 met (CPU 1 thread; exact account, batch 64 extrapolated)" in memory
    assert "batch 2" not in memory and memory.endswith("| 1 of 1 |")
    (lora,) = [line for line in lines if line.startswith("| training memory <= 50% of LoRA |")]
    assert "0.400 met" in lora
    full_table = "\n".join(goals.goals_section([_paper_run(0.2, 0.3)]))
    assert "0.300 **missed**" in full_table  # the batch-2 row stays in the full table


def test_summary_lists_live_peaks_at_the_papers_batch():
    run = _paper_run(0.2, 0.3)
    goal = {"params": {"adapter_only": 2_961_408}, "account_extrapolated": {"ratio_to_full": 0.1, "ratio_to_lora": 0.4},
            "live_peak": {"batch_size": 64, "ratio_to_full": None, "ratio_to_lora": 0.7},
            "live_peak_tower_micro_batches": {"batch_size": 64, "tower_micro_batch_size": 16, "ratio_to_lora": 0.45}}
    run["methods"] = {base.GOAL_METHOD: goal}  # a peaks run measures only some methods
    (lora,) = [line for line in goals.summary_section([run])
               if line.startswith("| training memory <= 50% of LoRA |")]
    assert "0.700 **missed** (CPU 1 thread; live-tensor peak, batch 64)" in lora
    # M2IST split its batch and the baselines did not: shown, not judged, not counted
    assert "0.450 not judged (CPU 1 thread; live-tensor peak, towers in micro-batches of 16, batch 64)" in lora
    assert lora.endswith("| 0 of 1 |")  # only the whole-batch peak (missed) is counted
    table = "\n".join(goals.goals_section([run]))
    assert "| 0.450 not judged |" in table and "0.450 **met**" not in table
    assert not [line for line in goals.summary_section([run])  # full fine-tuning's peak was not measured there
                if line.startswith("| training memory <= 25% of full FT |") and "live-tensor" in line]
    run["methods"][base.GOAL_METHOD]["live_peak"]["batch_size"] = 2
    assert "live-tensor peak, batch" not in "\n".join(goals.summary_section([run]))  # only at the paper's batch


def test_runs_before_the_lean_head_recomputed_ffn_and_folded_batch_norms_are_labelled():
    old = _paper_run(0.2, 0.3)
    del old["settings"]["frozen_batch_norm"], old["settings"]["head_feed_forward"]
    (memory,) = [line for line in goals.summary_section([old])
                 if line.startswith("| training memory <= 25% of full FT |")]
    assert "(CPU 1 thread, stock head FFN, stock frozen BN; exact account" in memory
    assert 'Rows marked "head FFN hidden stored"' not in "\n".join(goals.goals_section([_paper_run(0.2, 0.3)]))
    stock_bn = _paper_run(0.2, 0.3)
    stock_bn["settings"]["frozen_batch_norm"] = "stock"  # --stock-batch-norm
    assert "(CPU 1 thread, stock frozen BN; exact account" in "\n".join(goals.summary_section([stock_bn]))
    assert 'Rows marked "frozen BN not folded" or "stock frozen BN"' in "\n".join(goals.goals_section([stock_bn]))
    assert "frozen BN" not in "\n".join(goals.goals_section([_paper_run(0.2, 0.3)]))  # folded: no note
    fused_bn = _paper_run(0.2, 0.3)
    fused_bn["settings"]["frozen_batch_norm"] = "fused (53 modules)"  # --unfolded-batch-norm, or before folding
    assert "(CPU 1 thread, frozen BN not folded; exact account" in "\n".join(goals.summary_section([fused_bn]))
    for stored in ("lean (peft_m2ist.modeling.head.LeanFeedForwardEncoderLayer)", "hidden stored (...)"):  # old, flag
        run = _paper_run(0.2, 0.3)
        run["settings"]["head_feed_forward"] = stored
        assert "(CPU 1 thread, head FFN hidden stored; exact account" in "\n".join(goals.summary_section([run]))
        assert 'Rows marked "head FFN hidden stored"' in "\n".join(goals.goals_section([run]))
        run["settings"]["head_checkpointing"] = True  # recomputed with the whole layer: no note
        assert "(CPU 1 thread, head checkpointing; exact account" in "\n".join(goals.summary_section([run]))


def test_peak_findings_scale_the_live_peak_to_the_gpu_batch():
    mib = 2**20
    live = {"_file": "results/live.json", "settings": {},
            "methods": {"head_only": {"live_peak": {"batch_size": 2, "step_increment": 100 * mib,
                                                    "peak_op": "aten.add.Tensor -> (2, 256, 160, 160)"}}}}
    gpu = {"_file": "results/gpu.json", "settings": {"batch_size": 64},
           "methods": {"head_only": {"cuda_peak": {"step_increment": 3300 * mib}}}}
    text = "\n".join(memory.peak_findings([gpu, live]))
    assert "inside the frozen towers' forward" in text
    assert "scaled linearly to batch 64 is 3,200 MiB; the GPU measured 3,300 MiB" in text
    assert "1.031x" in text
    # a bf16 run is compared with a bf16 GPU run only
    live["settings"]["bf16"] = True
    assert "the GPU measured" not in "\n".join(memory.peak_findings([gpu, live]))
    assert "(`results/live.json`, bf16 autocast, frozen batch norms" in "\n".join(memory.peak_findings([gpu, live]))
    gpu["settings"]["bf16"] = True
    assert "the GPU measured 3,300 MiB" in "\n".join(memory.peak_findings([gpu, live]))
    gpu["settings"] = {"batch_size": 64}
    # a GPU run made with other frozen batch norms is not compared with
    live["settings"] = {"frozen_batch_norm": "fused (53 modules)", "head_feed_forward": "lean"}
    text = "\n".join(memory.peak_findings([gpu, live]))
    assert "the GPU measured" not in text
    assert "Its step increment scaled linearly to batch 64: 3,200 MiB; no GPU run with this implementation yet." in text
    # the head's implementation does not matter for a peak inside the towers, but does for one in the head
    gpu["settings"]["frozen_batch_norm"] = "fused (53 modules)"
    assert "the GPU measured 3,300 MiB" in "\n".join(memory.peak_findings([gpu, live]))
    live["methods"]["head_only"]["live_peak"]["peak_op"] = "aten.mul.Tensor -> (2, 421, 2048)"
    assert "the GPU measured" not in "\n".join(memory.peak_findings([gpu, live]))
    live["settings"] = {}
    # a peak in the head (3-D tokens) is not attributed to the towers
    live["methods"]["head_only"]["live_peak"]["peak_op"] = "aten.add.Tensor -> (2, 400, 256)"
    text = "\n".join(memory.peak_findings([gpu, live]))
    assert "frozen towers' forward" not in text and "`aten.add.Tensor -> (2, 400, 256)`. " in text


def test_tf32_is_refused_on_cpu(tmp_path):
    args = memory_time.parse_args(["--device", "cpu", "--tf32", "--output", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="for CUDA runs"):
        memory_time.run(args, log=lambda *_: None)
    assert not (tmp_path / "x.json").exists()


def test_bf16_autocast_runs_on_cpu(tmp_path):
    accounts = {}
    for flags in ([], ["--bf16"]):
        args = memory_time.parse_args(["--scale", "default", "--methods", "head_only", "--account-batches", "1",
                                       "--skip", "live_peak", "time", "inference", *flags])
        args.output = tmp_path / f"run{len(flags)}.json"
        memory_time.run(args, log=lambda *_: None)
        result = json.loads(args.output.read_text())
        assert result["settings"]["bf16"] is bool(flags)
        accounts[bool(flags)] = result["methods"]["head_only"]["account"]["1"]
    fp32, bf16 = accounts[False], accounts[True]
    # autocast keeps float32 master weights: weights, gradients and AdamW state are the same bytes
    for key in ("weights", "trainable", "grads", "optimizer"):
        assert bf16[key] == fp32[key], key
    # the matmuls save bf16 copies of the weights (activations) instead of the float32 weights themselves
    assert bf16["params_saved"] < fp32["params_saved"]
    assert bf16["activations"] != fp32["activations"]


def test_head_only_share_of_lora_is_stated_as_the_floor():
    methods = {"head_only": {"account_extrapolated": {"ratio_to_lora": 0.4853, "batch_size": 64}}}
    text = memory.head_only_floor(methods, extrapolated=True)
    assert "Head only is itself at 0.485x LoRA at batch 64" in text
    assert memory.head_only_floor(methods, extrapolated=False) == ""
    assert memory.head_only_floor({"head_only": {}}, extrapolated=True) == ""


def test_accuracy_schedule_warms_up_from_the_first_step_then_decays_by_a_half_cosine():
    import math

    from benchmarks.accuracy import lr_scheduler

    steps, warmup, lr = 10, 4, 3e-4
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = lr_scheduler(optimizer, steps, warmup)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [lr * (s + 1) / warmup if s < warmup else lr * 0.5 * (1 + math.cos(math.pi * (s - warmup) /
                                                                                   (steps - warmup)))
                for s in range(steps)]
    assert rates == pytest.approx(expected, rel=1e-12)
    assert rates[0] == pytest.approx(lr / warmup) and rates[warmup - 1] == rates[warmup] == pytest.approx(lr)


def test_results_md_is_its_template_filled_from_the_committed_results():
    from benchmarks import report

    figure = "results/memory_accuracy.png" if (base.HERE / "results" / "memory_accuracy.png").exists() else None
    assert report.render(base.load_results(), figure) == report.RESULTS_MD.read_text()


def test_results_md_opens_with_one_table_of_every_method_against_full_fine_tuning():
    from benchmarks.reporting import overview

    results = base.load_results()
    lines = overview.overview_section(results)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ") and "---" not in line}
    assert set(rows) >= {base.LABELS[m] for m in ("full", "lora", "head_only", "m2ist_shared_sum")}
    assert rows[base.LABELS["full"]].count("(1.000)") >= 4  # full against itself, in every memory and time column
    gpu = next(r for r in results if r["_file"] == overview.GPU_RUN)["methods"]["m2ist_shared_sum"]
    paper = rows[base.LABELS["m2ist_shared_sum"]]
    assert f"({gpu['account']['64']['ratio_to_full']:.3f})" in paper
    assert f"({gpu['step_time']['ratio_to_full']:.3f})" in paper
    text = (base.HERE / "RESULTS.md").read_text()
    assert text.index("## At a glance") < text.index("memory_accuracy.png") < text.index("## Summary")
