"""examples/train_rec.py end to end on tiny local towers: resume after a crash, and 2-process evaluation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from peft_m2ist.pretrained import minilm_path

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
        "--bottleneck_dim", "16", "--head_dim", "32", "--head_layers", "1", "--head_heads", "2",
        "--head_ffn_dim", "64", "--checkpointing_steps", "2", "--report_to", "none", *extra,
    ]


def _run(args: list[str], launcher: list[str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + [str(SCRIPT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, check=check)


def test_resume_after_crash_ends_with_the_same_adapter(towers, tmp_path):
    straight = tmp_path / "straight"
    _run(_args(towers, straight))
    # 12 steps, a checkpoint every 2, the newest 2 kept (--checkpoints_total_limit)
    assert sorted(d.name for d in (straight / "checkpoints").iterdir()) == ["step_10", "step_12"]
    crashed = tmp_path / "crashed"
    first = _run(_args(towers, crashed, "--crash_after_steps", "9"), check=False)
    assert first.returncode == 3, first.stderr[-2000:]
    assert not (crashed / "final_adapter").exists()
    resumed = _run(_args(towers, crashed, "--resume_from_checkpoint", "latest"))
    assert "Resumed from" in resumed.stdout + resumed.stderr
    a = load_file(straight / "final_adapter" / "adapter_model.safetensors")
    b = load_file(crashed / "final_adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # the adapter folder holds the side network and head only
    assert all(".m2ist_side." in k or ".m2ist_head." in k for k in a)


def test_two_processes_report_the_same_evaluation_as_one(towers, tmp_path):
    out = tmp_path / "run"
    _run(_args(towers, out, "--max_train_steps", "2"))
    adapter = out / "best_adapter"
    eval_args = _args(towers, tmp_path / "eval", "--eval_only", "--adapter", str(adapter), "--eval_samples", "23")
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    one = _run(eval_args, [accelerate, "launch", "--num_processes", "1", "--cpu"])
    two = _run(eval_args, [accelerate, "launch", "--num_processes", "2", "--cpu"])

    def scores(proc):
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
        return json.loads(line)["val"]

    s1, s2 = scores(one), scores(two)
    assert s1.keys() == s2.keys() and "accuracy" in s1
    for key in s1:
        assert s1[key] == pytest.approx(s2[key], abs=1e-6), key

    # predict.py finds the towers in the adapter's towers.json and draws its boxes for validation samples
    vision, text = towers
    assert json.loads((adapter / "towers.json").read_text()) == {"vision": str(vision), "text": str(text),
                                                                 "dtype": "float32"}
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
    assert json.loads((out / "best_adapter" / "towers.json").read_text())["dtype"] == "bfloat16"
    png = tmp_path / "bf16.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "predict.py"), "--adapter", str(out / "best_adapter"),
         "--val_samples", "1", "--output", str(png)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=True,
    )
    assert proc.stdout.count("box [x0, y0, x1, y1]") == 1 and png.is_file()


def test_build_model_folds_a_detr_towers_frozen_batch_norms(towers, tmp_path):
    """`--fold_frozen_batch_norms` (the default) folds a DETR tower's frozen batch norms; the `--no-` form keeps them."""
    import importlib.util

    from accelerate import PartialState

    from peft_m2ist import FrozenBatchNormFoldedConv2d
    from tests.tiny_towers import detr_resnet

    torch.manual_seed(0)
    detr_resnet().save_pretrained(tmp_path / "detr")
    tf.DetrImageProcessor().save_pretrained(tmp_path / "detr")
    spec = importlib.util.spec_from_file_location("train_rec", SCRIPT)
    train_rec = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_rec)
    PartialState(cpu=True)
    folded = {}
    for flag in ("--fold_frozen_batch_norms", "--no-fold_frozen_batch_norms"):
        args = train_rec.parse_args([
            "--vision_model", str(tmp_path / "detr"), "--text_model", str(towers[1]), "--image_size", "64",
            "--bottleneck_dim", "8", "--head_dim", "16", "--head_layers", "1", "--head_heads", "2",
            "--head_ffn_dim", "32", flag])
        model, _, _ = train_rec.build_model(args)
        folded[flag] = sum(isinstance(m, FrozenBatchNormFoldedConv2d) for m in model.modules())
    assert folded == {"--fold_frozen_batch_norms": 12, "--no-fold_frozen_batch_norms": 0}
