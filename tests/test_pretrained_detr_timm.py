"""`facebook/detr-resnet-50` stores its backbone in timm's ResNet layout: DETR checkpoints load by path whether
their backbone is saved in timm's layout (`use_timm_backbone=True`) or transformers' (`use_timm_backbone=False`),
with or without timm installed (without it, timm's keys are mapped onto transformers' ResNet backbone)."""

from __future__ import annotations

import re

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from peft_m2ist.pretrained import TowerUnavailableError, load_vision_tower, timm_resnet

COMMON = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
              encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=4, use_pretrained_backbone=False)
# timm's resnet18: basic blocks, 2 per stage (the smallest ResNet timm names)
RESNET18 = dict(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic",
                out_features=["stage1", "stage2", "stage3", "stage4"])


def _to_timm(key: str) -> str:
    """transformers' ResNet key -> timm's (as in facebook/detr-resnet-50: `conv1`, `bn1`, `layerS.B.convK`,
    `layerS.B.bnK`, `layerS.B.downsample.{0,1}`), written out independently of the loader's mapping."""
    key = key.replace("embedder.embedder.convolution.", "conv1.").replace("embedder.embedder.normalization.", "bn1.")
    match = re.search(r"encoder\.stages\.(\d)\.layers\.(\d+)\.(layer\.(\d)|shortcut)\.(convolution|normalization)\.", key)
    if match:
        stage, block, part, k, kind = match.groups()
        if part == "shortcut":
            new = f"layer{int(stage) + 1}.{block}.downsample.{0 if kind == 'convolution' else 1}."
        else:
            new = f"layer{int(stage) + 1}.{block}.{'conv' if kind == 'convolution' else 'bn'}{int(k) + 1}."
        key = key.replace(match.group(0), new)
    return key


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch.manual_seed(0)
    config = tf.DetrConfig(use_timm_backbone=False, backbone_config=tf.ResNetConfig(**RESNET18), **COMMON)
    model = tf.DetrModel(config).eval()
    with torch.no_grad():  # frozen batch norms with non-trivial statistics
        for name, buffer in model.named_buffers():
            if "running_" in name or "normalization" in name:
                buffer.uniform_(0.5, 1.5)
    hf = tmp_path_factory.mktemp("detr_transformers_layout")
    model.save_pretrained(hf)
    processor = tf.DetrImageProcessor()
    processor.save_pretrained(hf)
    timm = tmp_path_factory.mktemp("detr_timm_layout")
    tf.DetrConfig(use_timm_backbone=True, backbone="resnet18", **COMMON).save_pretrained(timm)
    processor.save_pretrained(timm)
    # stored as the Hub's DetrForObjectDetection checkpoint: `model.` prefix, backbone under `conv_encoder`
    weights = {"model." + _to_timm(k): v for k, v in load_file(hf / "model.safetensors").items()}
    assert "model.backbone.conv_encoder.model.layer2.0.downsample.0.weight" in weights
    assert "model.backbone.conv_encoder.model.bn1.running_var" in weights
    assert "model.backbone.conv_encoder.model.layer4.1.conv2.weight" in weights
    assert not any("stages" in k or "embedder" in k for k in weights)
    save_file(weights, timm / "model.safetensors", metadata={"format": "pt"})
    return model, hf, timm


def _encode(model: torch.nn.Module) -> torch.Tensor:
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(pixel_values=pixels, pixel_mask=torch.ones(1, 64, 64, dtype=torch.long)).encoder_last_hidden_state


@pytest.mark.parametrize("layout", ["transformers", "timm"])
def test_detr_loads_in_both_backbone_layouts_without_timm(checkpoints, layout, monkeypatch):
    monkeypatch.setattr(timm_resnet, "timm_available", lambda: False)
    original, hf, timm = checkpoints
    loaded, processor = load_vision_tower(str(hf if layout == "transformers" else timm))
    assert isinstance(loaded, tf.DetrModel) and isinstance(processor, tf.DetrImageProcessor)
    assert loaded.config.backbone_config.model_type == "resnet"
    expected = original.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(_encode(loaded), _encode(original))


def test_key_mapping_covers_every_timm_resnet_key():
    for layer_type, convs in (("basic", 2), ("bottleneck", 3)):
        mapping = timm_resnet.timm_key_mapping(layer_type)
        assert len(mapping) == 2 + 4 * (2 * convs + 2)
        key = "backbone.conv_encoder.model.layer3.5.bn2.running_mean"
        hits = [(p, t) for p, t in mapping.items() if re.search(p, key)]
        assert len(hits) == 1
        pattern, target = hits[0]
        renamed = key.replace(re.search(pattern, key).group(0), target.replace(r"\1", "5"))
        assert renamed == "backbone.model.encoder.stages.2.layers.5.layer.1.normalization.running_mean"


def test_a_timm_backbone_without_a_mapping_names_the_optional_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(timm_resnet, "timm_available", lambda: False)
    tf.DetrConfig(use_timm_backbone=True, backbone="resnet50d", **COMMON).save_pretrained(tmp_path)
    tf.DetrImageProcessor().save_pretrained(tmp_path)
    with pytest.raises(TowerUnavailableError, match=r"pip install timm"):
        load_vision_tower(str(tmp_path))
    dilated = tmp_path / "dc5"
    tf.DetrConfig(use_timm_backbone=True, backbone="resnet50", dilation=True, **COMMON).save_pretrained(dilated)
    tf.DetrImageProcessor().save_pretrained(dilated)
    with pytest.raises(TowerUnavailableError, match=r"dilated.*pip install timm"):
        load_vision_tower(str(dilated))


def test_with_timm_installed_the_loader_leaves_the_timm_backbone_to_transformers():
    config = tf.DetrConfig(use_timm_backbone=True, backbone="resnet50", **COMMON)
    if timm_resnet.timm_available():
        assert timm_resnet.timm_free_detr(config, "x") is None
    else:
        converted, mapping = timm_resnet.timm_free_detr(config, "x")
        assert converted.backbone_config.model_type == "resnet" and converted.backbone_config.depths == [3, 4, 6, 3]
        assert mapping == timm_resnet.timm_key_mapping("bottleneck")
