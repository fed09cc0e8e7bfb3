"""`forward(..., adapter_names=[...])`: one adapter per row, the towers run once (eval mode only)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_towers import batch, build_pair, tiny_config

from peft_m2ist.modeling.mixed_batch import row_groups

NAMES = ["b", "default", "c", "b", "default"]


@pytest.fixture(scope="module")
def model():
    """Three adapters on one tiny ViT + BERT pair: two with every layer tapped (different interactions), one tapping
    only the last layer, so a mixed batch records the union of different tap sets."""
    model = get_peft_model(build_pair("vit+bert"), tiny_config())
    model.add_adapter("b", tiny_config(interaction="cross_attention", bottleneck_dim=4))
    model.add_adapter("c", tiny_config(num_tapped_layers=1))
    return model.eval()


def _alone(model, name: str, inputs: dict) -> object:
    """The adapter `name` on the whole batch, as today: `set_adapter`, then a forward."""
    model.set_adapter(name)
    model.eval()
    try:
        with torch.no_grad():
            return model(**inputs)
    finally:
        model.set_adapter("default")
        model.eval()


def test_row_groups_keep_first_appearance_order():
    assert row_groups(["b", "a", "b", "c"]) == {"b": [0, 2], "a": [1], "c": [3]}


def test_mixed_batch_equals_each_adapter_alone_row_by_row(model):
    inputs = batch(size=5, labels=False)
    assert set(model.base_model.m2ist_side["c"].tap_names()) < set(model.base_model.m2ist_side["b"].tap_names())
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=NAMES).pred_boxes
    assert mixed.shape == (5, 4)
    for name in ("default", "b", "c"):
        alone = _alone(model, name, inputs).pred_boxes
        for row, row_name in enumerate(NAMES):
            if row_name == name:
                torch.testing.assert_close(mixed[row], alone[row], atol=1e-6, rtol=0)
    assert not torch.allclose(mixed[0], _alone(model, "default", inputs).pred_boxes[0])  # rows differ by adapter


def test_the_towers_run_once_for_a_mixed_batch(model):
    calls = []
    handles = [tower.register_forward_hook(lambda module, args, out, name=name: calls.append(name))
               for name, tower in (("vision", model.base_model.model.vision_model),
                                   ("text", model.base_model.model.text_model))]
    try:
        with torch.no_grad():
            model(**batch(size=5, labels=False), adapter_names=NAMES)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["vision", "text"]


def test_one_name_for_every_row_is_the_adapter_alone(model):
    inputs = batch(size=3, labels=True)
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=["b"] * 3)
    alone = _alone(model, "b", inputs)
    for key in ("pred_boxes", "loss", "loss_l1", "loss_giou"):
        assert torch.equal(mixed[key], alone[key]), key
    assert model.active_adapter == "default"  # a mixed batch selects no adapter


def test_mixed_loss_is_each_adapters_loss_weighted_by_its_rows(model):
    inputs = batch(size=5, labels=True)
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=NAMES)
    expected = dict.fromkeys(("loss", "loss_l1", "loss_giou"), 0.0)
    for name in ("default", "b", "c"):
        rows = [i for i, n in enumerate(NAMES) if n == name]
        alone = _alone(model, name, {k: v[rows] for k, v in inputs.items()})
        for key in expected:
            expected[key] += len(rows) / len(NAMES) * alone[key]
    for key, value in expected.items():
        torch.testing.assert_close(mixed[key], value, atol=1e-6, rtol=0)
    as_tuple = model.base_model(**inputs, adapter_names=NAMES, return_dict=False)
    assert len(as_tuple) == 4 and torch.allclose(as_tuple[1], mixed.pred_boxes, atol=1e-6)


def test_training_mode_is_refused(model):
    model.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            model(**batch(size=5), adapter_names=NAMES)
    finally:
        model.eval()


def test_unknown_names_are_refused_with_the_loaded_ones_listed(model):
    inputs = batch(size=2, labels=False)
    with pytest.raises(ValueError, match=r"\['nope'\].*loaded adapters: \['b', 'c', 'default'\]"):
        model(**inputs, adapter_names=["default", "nope"])
    with pytest.raises(ValueError, match=r"__base__.*has no box"):
        model(**inputs, adapter_names=["__base__", "b"])


def test_bad_adapter_names_are_refused_before_the_towers_run(model):
    inputs = batch(size=2, labels=False)
    with pytest.raises(ValueError, match="one adapter per row: got 3 name"):
        model(**inputs, adapter_names=["b", "b", "c"])
    with pytest.raises(TypeError, match="list of adapter names"):
        model(**inputs, adapter_names="b")
    with pytest.raises(ValueError, match="is empty"):
        model(**inputs, adapter_names=[])
    with model.disable_adapter(), pytest.raises(ValueError, match="disable_adapter"):
        model(**inputs, adapter_names=["b", "c"])


def test_adapters_on_other_towers_or_image_sizes_are_refused(model):
    config = model.peft_config["c"]
    config.image_size = 64
    try:
        with pytest.raises(ValueError, match=r"same towers at the same image size.*'c' has image_size=64"):
            model(**batch(size=2, labels=False), adapter_names=["b", "c"])
    finally:
        config.image_size = model.peft_config["b"].image_size


def test_cached_tower_features_hold_the_union_of_taps(model):
    inputs = batch(size=5, labels=False)
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=NAMES).pred_boxes
        features = model.encode_towers(**inputs, adapter_names=["c", "b"])
        cached = model(tower_features=features.to_tensors(), adapter_names=NAMES).pred_boxes
    torch.testing.assert_close(cached, mixed, atol=1e-6, rtol=0)
    model.set_adapter("c")
    try:
        only_c = model.encode_towers(**inputs)  # the active adapter's taps only: the last layer
    finally:
        model.set_adapter("default")
        model.eval()
    with pytest.raises(ValueError, match=r"lack taps that adapter 'b' reads: \['vision_model.layers.0.mlp'"):
        model(tower_features=only_c, adapter_names=NAMES)
    with pytest.raises(ValueError, match="one adapter per row: got 5 name"):
        model(tower_features=model.encode_towers(**batch(size=2, labels=False)), adapter_names=NAMES)
