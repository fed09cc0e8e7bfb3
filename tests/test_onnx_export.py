"""`peft_m2ist.export`: the grounding model exported to ONNX (dynamo, dynamic batch) and run by onnxruntime in a
process where torch cannot be imported; its boxes must equal torch's within 1e-4.

Cases: three tiny tower pairs of different families (ViT + BERT, MobileNetV2 + RoBERTa, DETR-ResNet + CLIP text),
the README main job's model (examples/configs/default.yaml on the offline MobileNetV2-stride16 + MiniLM-L6 towers,
128 px) through the whole bundle (examples/export_onnx.py's `export_adapter`, examples/onnx_predict.py), a real
family that cannot be exported (SigLIP2's NaFlex vision tower) and a deliberately unexportable module, each refused
with the piece named.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx
import tiny_towers as tt

from peft_m2ist import VisionTextPair
from peft_m2ist.export import (
    INPUT_NAMES,
    BoxPredictor,
    OnnxExportError,
    check_round_trip,
    export_adapter,
    export_onnx,
)

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-4
NO_TORCH = "import sys; sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
RUN_GRAPH = NO_TORCH + """
import numpy as np
import onnxruntime
model, batches, out, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
data = np.load(batches)
count = len({key.split("/")[0] for key in data.files})
boxes = [session.run(["pred_boxes"], {name: data[f"{i}/{name}"] for name in names})[0] for i in range(count)]
np.savez(out, *boxes)
"""

PAIRS = {
    "vit+bert": lambda: VisionTextPair(tt.vit(), tt.bert()),
    "mobilenet_v2+roberta": lambda: VisionTextPair(tt.mobilenet_v2(), tt.roberta()),
    "detr_resnet+clip_text": lambda: VisionTextPair(tt.detr_resnet(), tt.clip_text()),
}


def _tiny_model(pair_name: str, **config):
    torch.manual_seed(0)
    pair = PAIRS[pair_name]().eval() if pair_name in PAIRS else tt.build_family_pair(pair_name)
    return get_peft_model(pair, tt.tiny_config(**config)).eval()


def run_without_torch(model_path: Path, batches: list[dict[str, torch.Tensor]], tmp_path: Path) -> list[np.ndarray]:
    """onnxruntime's `pred_boxes` for each batch, computed in a fresh Python that cannot import torch."""
    arrays = {f"{i}/{name}": batch[name].numpy() for i, batch in enumerate(batches) for name in INPUT_NAMES}
    np.savez(tmp_path / "batches.npz", **arrays)
    subprocess.run([sys.executable, "-c", RUN_GRAPH, str(model_path), str(tmp_path / "batches.npz"),
                    str(tmp_path / "boxes.npz"), ",".join(INPUT_NAMES)], check=True, timeout=300, capture_output=True, text=True)
    found = np.load(tmp_path / "boxes.npz")
    return [found[f"arr_{i}"] for i in range(len(batches))]


def _batch_dims(model_path: Path) -> list[str]:
    graph = onnx.load(str(model_path)).graph
    return [graph.input[i].type.tensor_type.shape.dim[0].dim_param for i in range(len(graph.input))]


@pytest.mark.slow
@pytest.mark.parametrize("pair_name", list(PAIRS))
def test_onnxruntime_without_torch_gives_torchs_boxes(pair_name, tmp_path):
    model = _tiny_model(pair_name)
    model.train()  # the export runs in eval mode and gives the model back as it was
    export = export_onnx(model, tmp_path / "m2ist.onnx")
    assert model.training and all(m.training for m in model.base_model.m2ist_head.modules())
    model.eval()
    assert [i.name for i in onnx.load(str(export.path)).graph.input] == list(INPUT_NAMES)
    assert all(_batch_dims(export.path)), "the batch must be a symbolic dimension"
    batches = [export.inputs, tt.batch(3, seed=5, labels=False), tt.batch(1, seed=7, labels=False)]
    with torch.no_grad():
        expected = [model(**batch).pred_boxes.numpy() for batch in batches]
    assert np.array_equal(expected[0], export.reference_boxes.numpy())
    found = run_without_torch(export.path, batches, tmp_path)
    for got, want in zip(found, expected):
        assert got.shape == want.shape and np.abs(got - want).max() <= ATOL, (got, want)
    assert check_round_trip(export) <= ATOL


def test_box_predictor_is_the_models_own_forward():
    """What the export traces gives the forward's boxes bit for bit; with micro-batched towers, the same boxes."""
    model = _tiny_model("vit+bert")
    batch = tt.batch(3, labels=False)
    args = [batch[name] for name in INPUT_NAMES]
    with torch.no_grad():
        assert torch.equal(BoxPredictor(model)(*args), model(**batch).pred_boxes)
        micro = _tiny_model("vit+bert", tower_micro_batch_size=1)
        assert torch.allclose(BoxPredictor(micro)(*args), micro(**batch).pred_boxes, atol=1e-6)


def test_export_refuses_what_is_not_an_m2ist_model(tmp_path):
    with pytest.raises(ValueError, match=r"expected an M2IST model.*BertModel"):
        export_onnx(tt.bert(), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="batch must be >= 2"):
        export_onnx(_tiny_model("vit+bert"), tmp_path / "x.onnx", batch=1)
    model = _tiny_model("vit+bert")
    with model.disable_adapter(), pytest.raises(ValueError, match="disabled"):
        export_onnx(model, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
def test_a_family_that_cannot_export_is_named(tmp_path):
    """SigLIP2's NaFlex vision tower checks its patch grid with `torch._check`, which exports as
    `aten._is_all_true`: the ONNX translation has no function for it."""
    with pytest.raises(OnnxExportError) as caught:
        export_onnx(_tiny_model("siglip2+bert"), tmp_path / "siglip2.onnx")
    message = str(caught.value)
    assert "the vision tower Siglip2VisionModel" in message
    assert "module `embeddings` (Siglip2VisionEmbeddings)" in message
    assert "`aten._is_all_true`" in message
    assert caught.value.piece.tower == "vision" and caught.value.piece.op == "aten._is_all_true"
    assert not (tmp_path / "siglip2.onnx").exists()


class ValueBranch(torch.nn.Module):
    """A module that branches in Python on its input's values: `torch.export` cannot trace that."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if bool((hidden.abs() > 1e6).any()):  # a data-dependent branch
            hidden = hidden.clamp(-1e6, 1e6)
        return self.inner(hidden)


@pytest.mark.slow
def test_a_module_that_cannot_be_traced_is_named(tmp_path):
    torch.manual_seed(0)
    pair = VisionTextPair(tt.vit(), tt.bert()).eval()
    pair.text_model.embeddings.LayerNorm = ValueBranch(pair.text_model.embeddings.LayerNorm)
    model = get_peft_model(pair, tt.tiny_config()).eval()
    with pytest.raises(OnnxExportError) as caught:
        export_onnx(model, tmp_path / "branch.onnx")
    message = str(caught.value)
    assert "the text tower BertModel fails in its module `embeddings.LayerNorm` (ValueBranch)" in message
    assert "torch.export failed at test_onnx_export.py:" in message and "in forward" in message
    assert caught.value.piece.tower == "text" and not caught.value.piece.op


# ------------------------------------------------------------------------------------------ the README main job
def _main_job_model():
    """examples/configs/default.yaml's model (untrained), built by examples/train_rec.py itself."""
    from accelerate import PartialState

    spec = importlib.util.spec_from_file_location("train_rec_onnx", ROOT / "examples" / "train_rec.py")
    train_rec = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_rec)
    PartialState(cpu=True)
    args = train_rec.parse_args(["--config", str(ROOT / "examples" / "configs" / "default.yaml")])
    model, _, _ = train_rec.build_model(args)
    return model


@pytest.mark.slow
def test_the_main_jobs_adapter_exports_and_runs_without_torch(tmp_path):
    from PIL import Image, ImageDraw

    from peft_m2ist.inference import ReferringExpressionGrounder

    model = _main_job_model()
    config = model.peft_config["default"]
    assert (config.image_size, config.head_num_hidden_layers, config.head_intermediate_size) == (128, 2, 512)
    assert config.base_towers["vision"] == "offline:mobilenet_v2-stride16"
    adapter = tmp_path / "best_adapter"
    model.save_pretrained(adapter)
    info = export_adapter(adapter, tmp_path / "onnx")
    assert info["max_abs_difference"] <= ATOL
    assert (info["image_size"], info["max_text_tokens"]) == (128, config.max_text_tokens)
    assert json.loads((tmp_path / "onnx" / "preprocessing.json").read_text())["towers"] == {
        "vision": "offline:mobilenet_v2-stride16", "text": "offline:minilm-l6"}

    image = Image.new("RGB", (150, 100), (200, 200, 200))  # not square: the canvas is padded
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 20, 50, 60), fill=(220, 30, 30))
    draw.rectangle((90, 40, 140, 90), fill=(30, 30, 220))
    image.save(tmp_path / "scene.png")
    phrases = ["the red circle", "the blue square on the right", "the grey background"]
    script = NO_TORCH + "import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')\n"
    flags = [arg for phrase in phrases for arg in ("--phrase", phrase)]
    done = subprocess.run([sys.executable, "-c", script, str(ROOT / "examples" / "onnx_predict.py"), "--bundle", str(tmp_path / "onnx"), "--image",
                           str(tmp_path / "scene.png"), *flags], check=True, timeout=300, capture_output=True,
                          text=True)
    found = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    grounder = ReferringExpressionGrounder.from_pretrained(str(adapter), device="cpu")
    expected = grounder([image] * len(phrases), phrases)
    assert [f["phrase"] for f in found] == phrases
    for got, want in zip(found, expected):
        assert np.abs(np.array(got["box_xyxy_pixels"]) - np.array(want.box)).max() <= ATOL * max(image.size)


def test_the_results_section_reads_the_latency_run():
    from benchmarks.reporting.onnx import onnx_latency_section

    assert "benchmarks/onnx_latency.py" in onnx_latency_section([{"kind": "accuracy"}])[0]
    machine = {"cpu": "cpu", "torch_threads": 1, "torch": "2", "date": "today"}
    run = {"kind": "onnx_latency", "_file": "results/onnx_latency.json", "command": "python x", "model": "m",
           "towers": {"vision": "v", "text": "t"}, "image_size": 128, "text_tokens": 20, "export_seconds": 12.3,
           "onnx_mib": 1.25, "packages": {"onnxruntime": "1.32.0"}, "machine": machine,
           "rows": [{"batch_size": 8, "torch_ms": 10.0, "onnxruntime_ms": 5.0, "ratio_onnxruntime_over_torch": 0.5,
                     "max_abs_box_difference": 2e-7, "rounds": 20}]}
    text = "\n".join(onnx_latency_section([run]))
    assert "| 8 | 10.00 | 5.00 | 0.500 | 2.0e-07 | 20 |" in text
    assert "`v` + `t`, 128 px, 20 tokens" in text and "in 12 s, 1.2 MiB" in text


def test_the_export_script_stops_with_the_reason(tmp_path):
    spec = importlib.util.spec_from_file_location("export_onnx_script", ROOT / "examples" / "export_onnx.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit, match=r"export_onnx.py: no adapter at .*nowhere.*adapter_config.json"):
        script.main(["--adapter", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
