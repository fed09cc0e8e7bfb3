"""Frozen towers in int8 (`peft_m2ist.towers.quantization`, ``--tower_dtype int8``): the int8 convolution, the weight
bytes, outputs close to float32's, training (gradients reach the adapter, never the towers), the saved adapter's
layout, the record and loading that quantizes again, the feature cache's fingerprint and the model card.

Tolerances: the quantized towers' outputs are compared to float32's by relative Frobenius error over the real
tokens (``|int8 - float32| / |float32|``): below 5% for MiniLM-L6's last hidden state and 8% for MobileNetV2's last
map (measured: about 3% and 5%); a single int8 convolution is within half a quantization step per weight.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from tiny_adapter import save_tiny_towers
from tiny_towers import batch, build_pair, detr_resnet, mobilenet_v2, tiny_config

from peft_m2ist import M2ISTConfig, VisionTextPair, fold_frozen_batch_norms, pretrained
from peft_m2ist.loading import load_adapter_with_towers
from peft_m2ist.model_card import build_model_card
from peft_m2ist.towers.quantization import (
    TOWER_DTYPE_CHOICES,
    Int8WeightOnlyConv2d,
    plain_tensors,
    quantize_tower_weights,
    quantized_modules,
    set_tower_dtype,
    tensor_bytes,
    tower_weight_bytes,
)
from peft_m2ist.training.feature_cache import towers_fingerprint
from peft_m2ist.tuner.tower_record import check_base_towers, dtype_name, tower_dtype_name


def relative_error(expected: torch.Tensor, got: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


# ------------------------------------------------------------------------------------------- the int8 convolution
@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, groups=4, bias=False),
                                    dict(kernel_size=1), dict(kernel_size=3, padding="same", dilation=2)])
def test_an_int8_convolution_is_the_convolution_of_its_rounded_weight(kwargs):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 12, **kwargs).eval()
    quantized = Int8WeightOnlyConv2d.from_conv(conv)
    assert quantized.weight_int8.dtype == torch.int8 and quantized.weight_scale.shape == (12,)
    step = quantized.weight_scale.view(-1, 1, 1, 1)  # per output channel
    assert ((quantized.dequantized_weight() - conv.weight).abs() <= step / 2 + 1e-7).all()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        expected = torch.nn.functional.conv2d(x, quantized.dequantized_weight(), conv.bias, conv.stride, conv.padding,
                                              conv.dilation, conv.groups)
        torch.testing.assert_close(quantized(x), expected)
        torch.testing.assert_close(quantized(x.contiguous(memory_format=torch.channels_last)), expected)
        assert relative_error(conv(x), quantized(x)) < 0.02


def test_a_convolution_with_a_folded_batch_norm_is_quantized_with_the_norm_in_it():
    torch.manual_seed(0)
    vision = detr_resnet().eval()
    assert fold_frozen_batch_norms(vision) > 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = vision.backbone.model(x).feature_maps[-1]  # the ResNet's last map, (2, 32, 2, 2)
        quantize_tower_weights(vision)
        got = vision.backbone.model(x).feature_maps[-1]
    assert quantized_modules(vision)["conv2d"] == sum(1 for m in vision.modules() if isinstance(m, Int8WeightOnlyConv2d))
    assert not any(type(m) is torch.nn.Conv2d or "FoldedConv" in type(m).__name__ for m in vision.modules())
    assert relative_error(expected, got) < 0.05


def test_another_padding_mode_is_refused():
    with pytest.raises(ValueError, match="padding_mode='zeros', got 'reflect'"):
        Int8WeightOnlyConv2d.from_conv(torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))


# ------------------------------------------------------------------------------------------------ whole towers
def _weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the weights of `module`'s convolutions, linears and embeddings (int8 values + scales once quantized)."""
    total = 0
    for child in module.modules():
        if isinstance(child, Int8WeightOnlyConv2d):
            total += tensor_bytes(child.weight_int8) + tensor_bytes(child.weight_scale)
        elif isinstance(child, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding)):
            total += tensor_bytes(child.weight)
    return total


@pytest.fixture(scope="module")
def default_towers():
    """The offline default towers (the README main job's), float32, and their int8 copies."""
    vision, _ = pretrained.load_vision_tower(pretrained.MOBILENET_V2_STRIDE16_TOWER)
    text, tokenizer = pretrained.load_text_tower()
    vision, text = vision.eval(), text.eval()
    return vision, text, tokenizer, quantize_tower_weights(copy.deepcopy(vision)), \
        quantize_tower_weights(copy.deepcopy(text))


def test_the_default_towers_in_int8_hold_a_quarter_of_the_weight_bytes(default_towers):
    vision, text, _, vision8, text8 = default_towers
    assert quantized_modules(vision8) == {"conv2d": 39, "linear": 0, "embedding": 0}
    assert quantized_modules(text8) == {"conv2d": 0, "linear": 37, "embedding": 3}
    for float32, int8 in ((vision, vision8), (text, text8)):
        ratio = _weight_bytes(int8) / _weight_bytes(float32)
        assert 0.25 < ratio < 0.27, ratio  # int8 values + a float32 scale (and torchao's zero point) per row
    # the whole towers, normalisation layers and biases (kept in float32) included
    whole = (tower_weight_bytes(vision8) + tower_weight_bytes(text8)) / (tower_weight_bytes(vision)
                                                                          + tower_weight_bytes(text))
    assert 0.25 < whole < 0.27, whole


def test_the_default_towers_in_int8_give_nearly_float32_outputs(default_towers):
    vision, text, tokenizer, vision8, text8 = default_towers
    pixels = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    inputs = tokenizer(["the red circle on the left", "a blue square below the green triangle"], padding=True,
                       return_tensors="pt")
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        assert relative_error(vision(pixels).last_hidden_state, vision8(pixels).last_hidden_state) < 0.08
        assert relative_error(text(**inputs).last_hidden_state[real], text8(**inputs).last_hidden_state[real]) < 0.05
        assert vision8(pixels).last_hidden_state.dtype == torch.float32


def test_quantizing_twice_changes_nothing_and_freezes_the_tower():
    vision = quantize_tower_weights(mobilenet_v2().eval())
    state = {name: [t.clone() for t in plain_tensors(tensor)] for name, tensor in vision.state_dict().items()}
    counts = quantized_modules(vision)
    quantize_tower_weights(vision)
    assert quantized_modules(vision) == counts
    for name, tensor in vision.state_dict().items():
        assert all(torch.equal(a, b) for a, b in zip(plain_tensors(tensor), state[name], strict=True))
    assert not any(p.requires_grad for p in vision.parameters())


def test_set_tower_dtype_casts_float_dtypes_and_names_the_allowed_values():
    pair = build_pair("vit+bert")
    assert set_tower_dtype(pair.vision_model, "bfloat16").embeddings.patch_embeddings.projection.weight.dtype \
        == torch.bfloat16
    assert set_tower_dtype(pair.text_model, torch.float16).pooler.dense.weight.dtype == torch.float16
    assert quantized_modules(set_tower_dtype(pair.text_model, "int8"))["linear"] > 0
    with pytest.raises(ValueError, match=r"'int4' is neither a torch floating-point dtype .* nor one of \['int8'\]"):
        set_tower_dtype(pair.vision_model, "int4")
    assert TOWER_DTYPE_CHOICES == ("bfloat16", "float16", "float32", "int8")


# ------------------------------------------------------------------------------------- training and the adapter
def _int8_model(name: str = "mobilenet_v2+bert", seed: int = 0):
    pair = build_pair(name, seed)
    set_tower_dtype(pair.vision_model, "int8")
    set_tower_dtype(pair.text_model, "int8")
    torch.manual_seed(seed)
    return get_peft_model(pair, tiny_config())


@pytest.mark.parametrize("name", ["mobilenet_v2+bert", "detr_resnet+clip_text", "vit+bert"])
def test_a_training_step_on_int8_towers_trains_the_adapter_only(name):
    model = _int8_model(name)
    towers = model.base_model.model
    before = {key: [t.clone() for t in plain_tensors(value)] for key, value in towers.state_dict().items()
              if "m2ist" not in key}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and not any(p.requires_grad for n, p in towers.named_parameters() if "m2ist" not in n)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    out = model(**batch())
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in trainable)
    assert sum(p.grad.abs().sum() for p in trainable) > 0
    optimizer.step()
    for key, value in towers.state_dict().items():
        if key in before:
            assert all(torch.equal(a, b) for a, b in zip(plain_tensors(value), before[key], strict=True)), key


def test_the_saved_adapter_is_laid_out_as_a_float32_ones(tmp_path):
    float32 = build_pair("mobilenet_v2+bert", 0)
    torch.manual_seed(0)
    get_peft_model(float32, tiny_config()).save_pretrained(tmp_path / "float32")
    _int8_model().save_pretrained(tmp_path / "int8")

    def layout(folder):
        return {key: (t.shape, t.dtype) for key, t in load_file(folder / "adapter_model.safetensors").items()}

    assert layout(tmp_path / "int8") == layout(tmp_path / "float32")
    sizes = [(tmp_path / kind / "adapter_model.safetensors").stat().st_size for kind in ("float32", "int8")]
    assert sizes[0] == sizes[1]
    configs = [json.loads((tmp_path / kind / "adapter_config.json").read_text()) for kind in ("float32", "int8")]
    assert configs[0]["base_towers"]["dtype"] == "float32" and configs[1]["base_towers"]["dtype"] == "int8"
    for config in configs:
        del config["base_towers"]
    assert configs[0] == configs[1]


def test_an_adapter_recorded_on_int8_towers_is_loaded_on_towers_quantized_again(tmp_path):
    vision_path, text_path = save_tiny_towers(tmp_path)
    vision, _ = pretrained.load_vision_tower(str(vision_path))
    text, _ = pretrained.load_text_tower(str(text_path))
    torch.manual_seed(0)
    model = get_peft_model(VisionTextPair(set_tower_dtype(vision.eval(), "int8"), set_tower_dtype(text.eval(), "int8")),
                           tiny_config()).eval()
    assert model.peft_config["default"].base_towers == {"vision": str(vision_path), "text": str(text_path),
                                                        "dtype": "int8"}
    model.save_pretrained(tmp_path / "adapter")
    loaded = load_adapter_with_towers(tmp_path / "adapter")
    assert loaded.towers["dtype"] == "int8"
    pair = loaded.model.base_model.model
    assert quantized_modules(pair.vision_model)["conv2d"] > 0 and quantized_modules(pair.text_model)["linear"] > 0
    inputs = {k: v for k, v in batch(labels=False).items() if k != "pixel_mask"}
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**inputs).pred_boxes, model(**inputs).pred_boxes)
    float32 = load_adapter_with_towers(tmp_path / "adapter", dtype="float32")  # the argument wins
    assert not any(quantized_modules(float32.model.base_model.model.vision_model).values())


# ---------------------------------------------------------------------------------- record, cache, model card
def test_the_record_takes_int8():
    assert dtype_name("int8") == "int8" and dtype_name(torch.bfloat16) == "bfloat16"
    assert check_base_towers({"vision": "v", "text": "t", "dtype": "int8"})["dtype"] == "int8"
    with pytest.raises(ValueError, match="is not a torch floating-point dtype"):
        dtype_name(torch.int8)  # the torch dtype is not a tower format: the towers compute in float32
    assert tower_dtype_name(quantize_tower_weights(mobilenet_v2())) == "int8"
    assert tower_dtype_name(mobilenet_v2()) == "float32"
    assert M2ISTConfig(base_towers={"dtype": "int8"}).base_towers["dtype"] == "int8"


def test_int8_towers_never_share_a_float32_feature_cache():
    float32 = build_pair("mobilenet_v2+bert", 0)
    torch.manual_seed(0)
    float32 = get_peft_model(float32, tiny_config())
    fingerprints = [towers_fingerprint(float32), towers_fingerprint(_int8_model()), towers_fingerprint(_int8_model())]
    assert fingerprints[1] == fingerprints[2]
    assert fingerprints[0]["weights"] != fingerprints[1]["weights"]
    assert {k: v for k, v in fingerprints[0].items() if k != "weights"} == \
        {k: v for k, v in fingerprints[1].items() if k != "weights"}


def test_the_model_card_loads_int8_towers_by_hand():
    model = _int8_model()
    model.peft_config["default"].base_towers = {"vision": "org/vision", "text": "org/text", "dtype": "int8"}
    card = str(build_model_card(model))
    assert "from peft_m2ist.towers.quantization import quantize_tower_weights" in card
    assert "VisionTextPair(quantize_tower_weights(vision), quantize_tower_weights(text))" in card
    assert "torch.int8" not in card
