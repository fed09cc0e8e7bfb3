"""examples/train_rec.py on tiny local towers: 2-process evaluation, bf16 towers, predict.py, its arguments.

`tests/test_train_resume.py` (killed and resumed runs) shares the tiny towers and the tiny run's arguments.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from peft_m2ist.pretrained import minilm_path
from peft_m2ist.training import feature_cache_message

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_rec.py"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny MobileNetV2 and a tiny BERT saved as ordinary HF folders (the tokenizer is MiniLM's)."""
    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    vision = tf.MobileNetV2Model(tf.MobileNetV2Config(depth_multiplier=0.35, image_size=128))
    vision.save_pretrained(root / "vision")
    tf.MobileNetV2ImageProcessor().save_pretrained(root / "vision")
    text = tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64))
    text.save_pretrained(root / "text")
    tf.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(root / "text")
    return root / "vision", root / "text"


def _args(towers, out: Path, *extra: str) -> list[str]:
    vision, text = towers
    return [
        "--vision_model", str(vision), "--text_model", str(text), "--output_dir", str(out),
        "--train_samples", "48", "--eval_samples", "24", "--batch_size", "8", "--num_epochs", "2",
        "--bottleneck_dim", "16", "--head_hidden_size", "32", "--head_num_hidden_layers", "1", "--head_num_attention_heads", "2",
        "--head_intermediate_size", "64", "--checkpointing_steps", "2", "--report_to", "none", *extra,
    ]


def _run(args: list[str], launcher: list[str] | None = None, check: bool = True,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + [str(SCRIPT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, check=check,
                          env={**os.environ, **(env or {})})


TWO_CPU_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
"""Two data-parallel processes on CPU (with ACCELERATE_USE_CPU=1). `accelerate launch --num_processes 2 --cpu`
without an MPI hostfile starts only one."""
CPU = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def test_two_processes_report_the_same_evaluation_as_one(towers, tmp_path):
    out = tmp_path / "run"
    _run(_args(towers, out, "--max_train_steps", "2"))
    adapter = out / "best_adapter"
    eval_args = _args(towers, tmp_path / "eval", "--eval_only", "--adapter", str(adapter), "--eval_samples", "23")
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    _run(eval_args, [accelerate, "launch", "--num_processes", "1", "--cpu"])

    def scores(out: Path, processes: int):
        results = json.loads((out / "results.json").read_text())
        assert results["processes"] == processes and list(results["splits"]) == ["val"]
        return results["splits"]["val"]

    s1 = scores(tmp_path / "eval", 1)
    _run([*eval_args, "--output_dir", str(tmp_path / "eval2")], TWO_CPU_PROCESSES, env=CPU)
    s2 = scores(tmp_path / "eval2", 2)
    assert s1.keys() == s2.keys() and "accuracy" in s1
    for key in s1:
        assert s1[key] == pytest.approx(s2[key], abs=1e-6), key

    # predict.py finds the towers in the adapter's config (base_towers) and draws its boxes for validation samples
    vision, text = towers
    assert json.loads((adapter / "adapter_config.json").read_text())["base_towers"] == {
        "vision": str(vision), "text": str(text), "dtype": "float32"}
    assert not (adapter / "towers.json").exists()
    png = tmp_path / "grid.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "predict.py"), "--adapter", str(adapter), "--val_samples", "3",
         "--output", str(png)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=True,
    )
    assert proc.stdout.count("box [x0, y0, x1, y1]") == 3
    from PIL import Image

    with Image.open(png) as image:
        assert image.size == (3 * 256, 284)


def test_bf16_towers_train_and_save_an_fp32_adapter(towers, tmp_path):
    out = tmp_path / "bf16"
    proc = _run(_args(towers, out, "--max_train_steps", "2", "--tower_dtype", "bfloat16"))
    assert "best val Acc@0.5" in proc.stdout
    result = json.loads((out / "results.json").read_text())
    assert result["args"]["tower_dtype"] == "bfloat16" and result["steps"] == 2
    assert 0.0 <= result["best"]["accuracy"] <= 1.0
    adapter = load_file(out / "final_adapter" / "adapter_model.safetensors")
    assert adapter and {t.dtype for t in adapter.values()} == {torch.float32}
    # predict.py reloads the towers in the dtype recorded next to the adapter
    assert json.loads((out / "best_adapter" / "adapter_config.json").read_text())["base_towers"]["dtype"] == "bfloat16"
    # the best adapter's model card: the data, the command and its scores on every eval split, no empty template
    card = (out / "best_adapter" / "README.md").read_text()
    assert "[More Information Needed]" not in card and "train_rec.py" in card and result["data"] in card
    val = result["splits"]["val"]
    assert f"| val | {100 * val['accuracy']:.2f} | {val['mean_iou']:.3f} | {val['num_samples']:,} |" in card
    png = tmp_path / "bf16.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "predict.py"), "--adapter", str(out / "best_adapter"),
         "--val_samples", "1", "--output", str(png)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=True,
    )
    assert proc.stdout.count("box [x0, y0, x1, y1]") == 1 and png.is_file()


def test_int8_towers_train_and_save_the_float32_adapter_layout(towers, tmp_path):
    runs = {dtype: tmp_path / dtype for dtype in ("float32", "int8")}
    for dtype, out in runs.items():
        _run(_args(towers, out, "--max_train_steps", "2", "--tower_dtype", dtype))
    result = json.loads((runs["int8"] / "results.json").read_text())
    assert result["args"]["tower_dtype"] == "int8" and result["steps"] == 2
    adapters = {dtype: load_file(out / "final_adapter" / "adapter_model.safetensors") for dtype, out in runs.items()}
    assert {k: (v.shape, v.dtype) for k, v in adapters["int8"].items()} == \
        {k: (v.shape, v.dtype) for k, v in adapters["float32"].items()}
    assert json.loads((runs["int8"] / "best_adapter" / "adapter_config.json").read_text())["base_towers"]["dtype"] \
        == "int8"
    # predict.py loads the towers again and quantizes them, as recorded
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "predict.py"), "--adapter", str(runs["int8"] / "best_adapter"),
         "--val_samples", "1", "--output", str(tmp_path / "int8.png")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=True,
    )
    assert proc.stdout.count("box [x0, y0, x1, y1]") == 1


@pytest.fixture(scope="module")
def train_rec():
    """examples/train_rec.py as a module, with accelerate's state set up for one CPU process."""
    import importlib.util

    from accelerate import PartialState

    spec = importlib.util.spec_from_file_location("train_rec", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    PartialState(cpu=True)
    return module


def test_build_model_folds_a_detr_towers_frozen_batch_norms(towers, tmp_path, train_rec):
    """`--fold_frozen_batch_norms` (the default) folds a DETR tower's frozen batch norms; the `--no-` form keeps them."""
    from tiny_towers import detr_resnet

    from peft_m2ist import FrozenBatchNormFoldedConv2d

    torch.manual_seed(0)
    detr_resnet().save_pretrained(tmp_path / "detr")
    tf.DetrImageProcessor().save_pretrained(tmp_path / "detr")
    folded = {}
    for flag in ("--fold_frozen_batch_norms", "--no-fold_frozen_batch_norms"):
        args = train_rec.parse_args([
            "--vision_model", str(tmp_path / "detr"), "--text_model", str(towers[1]), "--image_size", "64",
            "--bottleneck_dim", "8", "--head_hidden_size", "16", "--head_num_hidden_layers", "1", "--head_num_attention_heads", "2",
            "--head_intermediate_size", "32", flag])
        model, _, _ = train_rec.build_model(args)
        folded[flag] = sum(isinstance(m, FrozenBatchNormFoldedConv2d) for m in model.modules())
    assert folded == {"--fold_frozen_batch_norms": 12, "--no-fold_frozen_batch_norms": 0}


def _usage_error(train_rec, argv: list[str], capsys) -> str:
    """`parse_args(argv)` must stop with argparse's usage error (exit status 2); returns its message."""
    with pytest.raises(SystemExit) as stopped:
        train_rec.parse_args(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err


def test_cache_features_defaults_to_on_without_augment_and_off_with_it(train_rec, tmp_path, capsys):
    """Also when `augment` comes from the YAML --config; an explicit --cache_features with --augment is an error."""
    chosen = {}
    for argv in ([], ["--augment"], ["--no-augment"], ["--no-cache_features"], ["--augment", "--no-cache_features"]):
        args = train_rec.parse_args(argv)
        chosen[" ".join(argv)] = (args.augment, args.cache_features)
    assert chosen == {"": (False, True), "--augment": (True, False), "--no-augment": (False, True),
                      "--no-cache_features": (False, False), "--augment --no-cache_features": (True, False)}
    for argv, expected in ([], "on"), (["--augment"], "off: --augment"), (["--no-cache_features"], "off (--no-"):
        args = train_rec.parse_args(argv)
        assert expected in feature_cache_message(args.cache_features, args.augment)

    augment = tmp_path / "augment.yaml"
    augment.write_text("augment: true\n")
    assert train_rec.parse_args(["--config", str(augment)]).cache_features is False
    assert train_rec.parse_args(["--config", str(augment), "--no-augment"]).cache_features is True

    assert "--augment changes the images" in _usage_error(train_rec, ["--augment", "--cache_features"], capsys)
    assert "--augment changes the images" in _usage_error(train_rec, ["--config", str(augment), "--cache_features"],
                                                          capsys)
    both = tmp_path / "both.yaml"
    both.write_text("augment: true\ncache_features: true\n")
    assert "--augment changes the images" in _usage_error(train_rec, ["--config", str(both)], capsys)
    assert train_rec.parse_args(["--config", str(both), "--no-cache_features"]).cache_features is False


def test_config_values_outside_a_flags_choices_are_refused(train_rec, tmp_path, capsys):
    """YAML values skip argparse's `choices` check in `set_defaults`: parse_args checks them itself."""
    config = tmp_path / "config.yaml"
    config.write_text("tower_dtype: fp16\nimage_size: 64\n")
    message = _usage_error(train_rec, ["--config", str(config)], capsys)
    assert "invalid value for tower_dtype: 'fp16'" in message
    assert "(choose from 'bfloat16', 'float16', 'float32', 'int8')" in message and str(config) in message

    config.write_text("mixed_precision: no\n")  # YAML reads `no` as False
    message = _usage_error(train_rec, ["--config", str(config)], capsys)
    assert "invalid value for mixed_precision: False" in message and "quote the value" in message

    config.write_text("tower_dtype: fp16\n")  # the file is checked even when the command line overrides the key
    assert "invalid value for tower_dtype" in _usage_error(
        train_rec, ["--config", str(config), "--tower_dtype", "float16"], capsys)

    config.write_text("head_dtype: float16\n")
    assert "unknown keys in" in _usage_error(train_rec, ["--config", str(config)], capsys)

    config.write_text('tower_dtype: bfloat16\nmixed_precision: "no"\ncontrol: text_hidden\nbox_head: mlp\n')
    args = train_rec.parse_args(["--config", str(config)])
    assert (args.tower_dtype, args.mixed_precision, args.control, args.box_head) == ("bfloat16", "no", "text_hidden",
                                                                                     "mlp")
    config.write_text("mixed_precision: null\n")  # the flag's own default
    assert train_rec.parse_args(["--config", str(config)]).mixed_precision is None


def test_every_flag_is_in_the_training_guide_and_the_test_only_crash_flag_is_gone(train_rec, capsys):
    guide = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    # each flag by its name (HfArgumentParser adds a `--with-hyphens` spelling of each `--with_underscores` one)
    flags = [action.option_strings[0] for action in train_rec.build_parser()._actions
             if action.option_strings and action.option_strings[0] != "-h"]
    assert len(flags) == 70 and not [flag for flag in flags if f"`{flag}" not in guide]
    assert "unrecognized arguments: --crash_after_steps" in _usage_error(train_rec, ["--crash_after_steps", "9"],
                                                                         capsys)


def test_help_lists_every_group_and_flag(train_rec, capsys):
    """`--help` prints (a `%` in a help string, M2ISTConfig's "about 40%", once crashed argparse's formatting)."""
    with pytest.raises(SystemExit) as stopped:
        train_rec.parse_args(["--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    for group in ("towers:", "adapter:", "data:", "optimisation:", "output:"):
        assert f"\n{group}\n" in text, group
    assert "by about 40%" in text and "See docs/real-data.md for each --dataset's files" in text  # group summaries
    parser = train_rec.build_parser()
    assert all(action.option_strings[0] in text for action in parser._actions if action.option_strings)
