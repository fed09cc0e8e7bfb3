"""examples/train_rec.py on tiny local towers: resume after a crash, 2-process evaluation, the feature cache."""

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
    two = _run(eval_args, TWO_CPU_PROCESSES, env=CPU)

    def scores(proc, processes: int):
        line = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
        assert line["processes"] == processes
        return line["val"]

    s1, s2 = scores(one, 1), scores(two, 2)
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


EVALUATE_DRIVER = """
import importlib.util, json, sys
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

spec = importlib.util.spec_from_file_location("train_rec", sys.argv[1])
train_rec = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_rec)


class Echo(torch.nn.Module):
    def forward(self, pred):
        return SimpleNamespace(pred_boxes=pred)


def collate(rows):
    labels = torch.tensor([[0.5, 0.5, 0.2, 0.2]] * len(rows))
    miss = torch.tensor([0.1, 0.1, 0.05, 0.05])
    pred = torch.stack([label if row["hit"] else miss for row, label in zip(rows, labels)])
    return {"pred": pred, "labels": labels, "phrase_type": [row["type"] for row in rows]}


accelerator = Accelerator(cpu=True)
loader = accelerator.prepare(DataLoader(json.loads(sys.argv[2]), batch_size=2, collate_fn=collate))
scores = train_rec.evaluate(Echo(), loader, accelerator)
if accelerator.is_main_process:
    print(json.dumps({"processes": accelerator.num_processes, "scores": scores}))
"""


def test_two_processes_keep_each_phrase_type_with_its_own_samples(tmp_path):
    """The processes meet the phrase types in different orders (process 0's batches start with 'attribute', process
    1's with 'relation'); each type's accuracy is still its own. Types outside the benchmark's are kept, the padding
    of the uneven last batch is dropped, and no metric cache file is left behind."""
    hits = {"attribute": True, "relation": False, "position": True, "ordinal": False, "custom": True}
    order = ["attribute", "relation", "relation", "attribute", "position", "custom", "ordinal", "position", "relation"]
    rows = [{"type": t, "hit": hits[t]} for t in order]  # 9 rows, batches of 2: process 0 gets batches 0, 2, 4
    driver = tmp_path / "evaluate_driver.py"
    driver.write_text(EVALUATE_DRIVER)
    cache = tmp_path / "metrics_cache"
    env = {**os.environ, **CPU, "HF_METRICS_CACHE": str(cache)}
    proc = subprocess.run([*TWO_CPU_PROCESSES, str(driver), str(SCRIPT), json.dumps(rows)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert out["processes"] == 2
    assert out["scores"] == {"accuracy": pytest.approx(5 / 9), "mean_iou": pytest.approx(5 / 9), "accuracy_attribute": 1.0,
                      "accuracy_relation": 0.0, "accuracy_position": 1.0, "accuracy_ordinal": 0.0,
                      "accuracy_custom": 1.0}
    assert not list(cache.rglob("*.arrow"))  # the metric is only fed and computed on the main process, in memory


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
    from peft_m2ist import FrozenBatchNormFoldedConv2d
    from tests.tiny_towers import detr_resnet

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


def test_feature_cache_holds_each_samples_tower_outputs_in_order(train_rec):
    from accelerate import Accelerator
    from peft import get_peft_model
    from torch.utils.data import DataLoader

    from tests.tiny_towers import batch, build_pair, tiny_config

    model = get_peft_model(build_pair("vit+bert"), tiny_config()).eval()
    inputs = batch(size=5, labels=False)
    inputs["pixel_mask"][1, :, 16:] = 0
    rows = [{**{k: v[i] for k, v in inputs.items()}, "labels": torch.full((4,), i / 10), "phrase_type": f"type{i}"}
            for i in range(5)]
    cache = train_rec.cache_tower_features(model, DataLoader(rows, batch_size=2), Accelerator(cpu=True), "test")
    expected = model.encode_towers(**inputs).to_tensors()
    assert len(cache) == 5 and set(cache.features) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(cache.features[key], value, rtol=0, atol=1e-6)
    assert cache[3]["phrase_type"] == "type3" and cache[3]["labels"][0] == pytest.approx(0.3)


def test_a_feature_cache_that_does_not_fit_in_ram_is_refused_before_allocating(train_rec):
    first = {"vision": torch.zeros(2, 65, 384), "vision_mask": torch.ones(2, 65, dtype=torch.long)}
    per_sample = 65 * 384 * 4 + 65 * 8
    cache = train_rec.allocate_feature_cache(first, 10, 1, "caching", available=10 * per_sample * 2)
    assert {k: (tuple(v.shape), v.dtype) for k, v in cache.items()} == {
        "vision": ((10, 65, 384), torch.float32), "vision_mask": ((10, 65), torch.long)}
    refusal = r"caching: the tower-feature cache needs .* 2 process\(es\).*--no-cache_features"
    with pytest.raises(MemoryError, match=refusal):
        train_rec.allocate_feature_cache(first, 10, 2, "caching", available=10 * per_sample * 2)


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
    assert "on" in train_rec.feature_cache_message(train_rec.parse_args([]))
    assert "off: --augment" in train_rec.feature_cache_message(train_rec.parse_args(["--augment"]))
    assert "off (--no-cache_features)" in train_rec.feature_cache_message(train_rec.parse_args(["--no-cache_features"]))

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
    assert "(choose from 'bfloat16', 'float16', 'float32')" in message and str(config) in message

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
