"""benchmarks/learning_curve.py: its run specs, the preset written out field by field (what its one-field runs start
from), and the report's learning-curve section and figure."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks import learning_curve
from benchmarks.reporting import learning_curve as section
from peft_m2ist import M2ISTConfig
from peft_m2ist.tuner.config import PAPER_PRESET


def test_run_specs_name_a_config_a_recipe_and_preset_fields():
    assert learning_curve.parse_run("paper:authors") == ("paper", {}, "authors")
    assert learning_curve.parse_run("paper+box_head=pointer+head_input_norm=true:benchmark") == (
        "paper", {"box_head": "pointer", "head_input_norm": True}, "benchmark")
    assert learning_curve.parse_run("default+expert_init=kaiming:benchmark") == (
        "default", {"expert_init": "kaiming"}, "benchmark")
    for bad in ("paper:adam", "tiny:benchmark", "default+box_head=mlp:sgd"):
        with pytest.raises(ValueError, match="run"):
            learning_curve.parse_run(bad)


def test_a_field_run_from_the_default_starts_from_the_benchmarks_default_model():
    """`default+FIELD=VALUE` writes the default out field by field: with FIELD at its default value it is the very
    model `benchmarks/accuracy.py` trains (same config, same initial weights); a preset field moves it."""
    import argparse

    from benchmarks import scales

    scale = scales.build_scale("tiny", 0)
    args = argparse.Namespace(seed=13, bottleneck=16, head_layers=1, head_ffn_dim=32)
    plain = learning_curve.build_model("default", {}, scale, args)
    written_out = learning_curve.build_model("default", {"box_head": "pointer"}, scale, args)
    assert dataclasses.asdict(written_out.peft_config["default"]) == dataclasses.asdict(plain.peft_config["default"])
    plain_state, written_state = plain.state_dict(), written_out.state_dict()
    assert plain_state.keys() == written_state.keys()
    for name, tensor in plain_state.items():
        assert written_state[name].equal(tensor), name
    moved = learning_curve.build_model("default", {"expert_init": "kaiming"}, scale, args).peft_config["default"]
    assert moved.expert_init == "kaiming" and moved.box_head == "pointer" and moved.interaction == "shared"
    with pytest.raises(ValueError, match="not fields of the paper preset"):
        learning_curve.build_model("default", {"bottleneck_dim": 8}, scale, args)


def test_the_preset_written_out_field_by_field_is_the_preset():
    """The one-field runs build `M2ISTConfig(**PAPER_PRESET, FIELD=...)`: with no field changed that is the preset."""
    preset = dataclasses.asdict(M2ISTConfig(preset="paper"))
    written_out = dataclasses.asdict(M2ISTConfig(**PAPER_PRESET))
    assert {k: v for k, v in written_out.items() if k != "preset"} == {k: v for k, v in preset.items() if k != "preset"}


def _result(file: str, runs: dict) -> dict:
    return {"kind": "learning_curve", "_file": file, "command": "python benchmarks/learning_curve.py",
            "machine": {"cpu": "cpu", "torch_threads": 1, "torch": "2", "date": "today"}, "chance_val": 0.24,
            "settings": {"max_steps": 20, "eval_every": 10, "eval_samples": 8, "stop_at": 0.7},
            "recipes": learning_curve.RECIPES, "runs": runs}


def _entry(config: str, recipe: str, accs: list[float], overrides: dict | None = None, reached=None) -> dict:
    points = [{"step": 10 * (i + 1), "val_accuracy": a, "val_mean_iou": a / 2, "train_loss": 1.5 - a}
              for i, a in enumerate(accs)]
    return {"config": config, "recipe": recipe, "overrides": overrides or {}, "points": points,
            "steps_run": points[-1]["step"], "seconds_per_step": 0.5, "reached_stop_at": reached}


def test_section_draws_the_curves_and_tables_the_one_field_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(section, "FIGURE", tmp_path / "results" / "learning_curve.png")
    monkeypatch.setattr(section, "RESULTS_DIR", tmp_path / "results")
    curves = _result("results/learning_curve.json", {"paper:authors": _entry("paper", "authors", [0.02, 0.05]),
                                                     "default:benchmark": _entry("default", "benchmark", [0.4, 0.75],
                                                                                 reached=20)})
    fields = _result(section.FIELDS_FILE + ".json", {"paper+box_head=pointer:benchmark": _entry(
        "paper", "benchmark", [0.1, 0.3], {"box_head": "pointer"})})
    figure = section.make_learning_curve_figure([curves, fields])
    assert figure == "results/learning_curve.png" and (tmp_path / figure).stat().st_size > 0
    text = "\n".join(section.learning_curve_section([curves, fields, {"kind": "accuracy"}], figure))
    assert "![learning curves](results/learning_curve.png)" in text
    assert "| `default:benchmark` | 20 | 75.0 (step 20) | 75.0 |" in text and "70% at step 20" in text
    assert "| `paper:authors` | 20 | 5.0 (step 20) | 5.0 |" in text
    table = text.split("one field changed")[1]
    assert "`paper+box_head=pointer:benchmark`" in table and "`paper:authors`" not in table
    assert section.learning_curve_section([{"kind": "accuracy"}], None)[0].startswith("Not run yet")


def test_section_tables_what_the_head_sees_at_initialisation():
    curves = _result("results/learning_curve.json", {"paper:authors": _entry("paper", "authors", [0.02, 0.05])})
    stats = dict(vision_rms=1.99, text_rms=1.28, vision_image_share=0.028, reg_rms=1.06, position_rms=1.0,
                 first_layer_input_rms=2.18, reg_attention_entropy=0.904, gradient_norm=1.17, gradient_share_head=0.97)
    inputs = {"kind": "head_inputs", "_file": "results/head_inputs.json", "command": "python benchmarks/head_inputs.py",
              "machine": curves["machine"], "settings": {"rows": 64}, "runs": {"paper:benchmark": stats}}
    text = "\n".join(section.learning_curve_section([curves, inputs], None))
    assert "| `paper:benchmark` | 1.990 | 1.280 | 0.028 | 1.060 | 1.000 | 2.180 | 0.904 | 1.170 | 0.970 |" in text
    assert "first 64 training rows" in text


def test_a_run_whose_config_is_refused_today_is_marked():
    """Runs measured before a combination was refused (zero-initialised experts behind a tower LayerNorm) stay in the
    tables, marked."""
    degenerate = _entry("default", "benchmark", [0.03], {"language_expert_output_norm": "tower"})
    fine = _entry("default", "benchmark", [0.2], {"head_init": "transvg"})
    fields = _result(section.FIELDS_FILE + "_reverse.json", {"default+language_expert_output_norm=tower:benchmark":
                                                             degenerate, "default+head_init=transvg:benchmark": fine})
    text = "\n".join(section.learning_curve_section([fields], None))
    assert "| `default+language_expert_output_norm=tower:benchmark` (a combination refused today" in text
    assert "| `default+head_init=transvg:benchmark` | " in text
    assert section.refused_today("paper+expert_init=zero_up:benchmark")  # the preset keeps its tower norms
    assert not section.refused_today("paper:authors") and not section.refused_today("default:benchmark")
