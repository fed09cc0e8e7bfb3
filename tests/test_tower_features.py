"""`TowerFeatures`: the typed container of the frozen towers' outputs, and its flat form for feature caches."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_towers import batch, build_pair, tiny_config

from peft_m2ist import TowerFeatures


def _features(vision_mask: bool = True) -> TowerFeatures:
    return TowerFeatures(
        vision=torch.randn(2, 5, 4), text=torch.randn(2, 3, 6), text_mask=torch.ones(2, 3, dtype=torch.long),
        vision_mask=torch.ones(2, 5, dtype=torch.long) if vision_mask else None,
        taps={"vision_model.layers.0.mlp": torch.randn(2, 5, 8), "text_model.encoder.layer.0.output": torch.randn(2, 3, 6)},
    )


@pytest.mark.parametrize("vision_mask", [True, False])
def test_flat_tensors_round_trip(vision_mask):
    features = _features(vision_mask)
    flat = features.to_tensors()
    assert ("vision_mask" in flat) == vision_mask
    assert set(flat) >= {"vision", "text", "text_mask", "tap:vision_model.layers.0.mlp"}
    back = TowerFeatures.from_tensors(flat)
    assert back.taps.keys() == features.taps.keys() and back.batch_size == 2
    for name, tensor in features.taps.items():
        assert back.taps[name] is tensor
    assert back.vision is features.vision and (back.vision_mask is None) == (not vision_mask)


def test_malformed_features_are_refused_with_the_argument_named():
    flat = _features().to_tensors()
    with pytest.raises(ValueError, match=r"tower_features.*missing keys: \['text_mask'\]"):
        TowerFeatures.from_tensors({k: v for k, v in flat.items() if k != "text_mask"})
    with pytest.raises(ValueError, match=r"unknown keys: \['layers\.0\.mlp'\]"):
        TowerFeatures.from_tensors({**flat, "layers.0.mlp": flat["vision"]})
    with pytest.raises(TypeError, match="tower_features"):
        TowerFeatures.coerce([flat["vision"]])


def test_the_model_takes_the_container_or_its_collated_flat_form():
    model = get_peft_model(build_pair("mobilenet_v2+bert"), tiny_config()).eval()
    inputs = batch(labels=False)
    features = model.encode_towers(**inputs)
    assert isinstance(features, TowerFeatures) and features.vision_mask is not None
    config = model.peft_config["default"]
    # the side network's taps only, each pooled onto the final grid of 1 x 1 cells: (batch, tokens, dim)
    assert set(features.taps) == set(config.target_modules)
    assert all(t.shape[:2] == features.text.shape[:2] for n, t in features.taps.items() if n.startswith("text_model."))
    assert all(t.shape[:2] == features.vision.shape[:2] for n, t in features.taps.items() if n.startswith("vision_model."))
    collated = torch.utils.data.default_collate([{k: v[i] for k, v in features.to_tensors().items()} for i in range(2)])
    with torch.no_grad():
        direct = model(**inputs).pred_boxes
        torch.testing.assert_close(model(tower_features=features).pred_boxes, direct, rtol=0, atol=0)
        torch.testing.assert_close(model(tower_features=collated).pred_boxes, direct, rtol=0, atol=0)
