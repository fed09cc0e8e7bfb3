"""Reliability of the tuner: all-or-nothing adapter loading, clean rollback, and peft's tuner API on M2IST."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_towers import batch, build_pair, tiny_config

from peft_m2ist import M2ISTTapLayer

WEIGHTS = "adapter_model.safetensors"


def _taps(module: torch.nn.Module) -> dict[str, dict[str, bool]]:
    return {name: dict(m.m2ist_tapped_by) for name, m in module.named_modules() if isinstance(m, M2ISTTapLayer)}


def _saved(tmp_path, pair_name: str = "vit+bert", **overrides):
    model = get_peft_model(build_pair(pair_name), tiny_config(**overrides))
    with torch.no_grad():  # weights other than the freshly initialised ones
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    model.save_pretrained(tmp_path)
    return model.eval()


def _damage(tmp_path, change) -> dict[str, torch.Tensor]:
    weights = load_file(tmp_path / WEIGHTS)
    change(weights)
    save_file(weights, tmp_path / WEIGHTS, metadata={"format": "pt"})
    return weights


def _drop_one(weights):
    del weights[sorted(weights)[0]]


def _reshape_one(weights):
    key = sorted(weights)[-1]
    weights[key] = torch.zeros(*weights[key].shape[:-1], weights[key].shape[-1] + 1)


def _add_one(weights):
    weights["base_model.m2ist_side.not_a_module.weight"] = torch.zeros(3)


DAMAGES = {
    "missing": (_drop_one, r"missing keys \['base_model\.m2ist_"),
    "wrong shape": (_reshape_one, r"another shape \[base_model\.m2ist_.*in the file"),
    "unexpected": (_add_one, r"unexpected keys \['base_model\.m2ist_side\.not_a_module\.weight'\]"),
}


def _wrap_again_without_warnings(pair) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(pair, tiny_config())
    assert not [w for w in caught if "peft_config" in str(w.message)], [str(w.message) for w in caught]
    model(**batch())


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_adapter_file_is_refused_and_the_pair_stays_clean(tmp_path, damage):
    _saved(tmp_path)
    change, match = DAMAGES[damage]
    _damage(tmp_path, change)
    pair = build_pair("vit+bert")
    with pytest.raises(ValueError, match=match) as info:
        PeftModel.from_pretrained(pair, tmp_path)
    assert str(tmp_path / WEIGHTS) in str(info.value)
    assert not _taps(pair)
    assert "peft_config" not in pair.__dict__
    _wrap_again_without_warnings(pair)


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_failed_load_adapter_leaves_the_model_as_it_was(tmp_path, damage):
    _saved(tmp_path / "other")
    _damage(tmp_path / "other", DAMAGES[damage][0])
    # "default" taps the last block only; "other" shares those taps and adds the first block's
    model = get_peft_model(build_pair("vit+bert"), tiny_config(num_tapped_layers=1))
    inputs = batch(labels=False)
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).pred_boxes
    state = {k: v.clone() for k, v in model.state_dict().items()}
    requires_grad = {k: p.requires_grad for k, p in model.named_parameters()}
    before = (sorted(model.peft_config), sorted(model.base_model.m2ist_side), sorted(model.base_model.m2ist_head),
              _taps(model), model.active_adapter)

    with pytest.raises(ValueError, match=DAMAGES[damage][1]):
        model.load_adapter(tmp_path / "other", adapter_name="other")
    # into the existing adapter (of another config): refused before any weight changes
    with pytest.raises(ValueError, match="do not match the side network and head of adapter 'default'"):
        model.load_adapter(tmp_path / "other", adapter_name="default")

    after = (sorted(model.peft_config), sorted(model.base_model.m2ist_side), sorted(model.base_model.m2ist_head),
             _taps(model), model.active_adapter)
    assert after == before
    assert {k: p.requires_grad for k, p in model.named_parameters()} == requires_grad
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(model(**inputs).pred_boxes, expected)


def test_an_intact_adapter_still_loads_exactly(tmp_path):
    model = _saved(tmp_path)
    inputs = batch(labels=False)
    with torch.no_grad():
        expected = model(**inputs).pred_boxes
        loaded = PeftModel.from_pretrained(build_pair("vit+bert"), tmp_path)
        assert torch.equal(loaded(**inputs).pred_boxes, expected)


def test_a_missing_weights_file_leaves_no_adapter_behind(tmp_path):
    _saved(tmp_path / "other")
    (tmp_path / "other" / WEIGHTS).unlink()
    model = get_peft_model(build_pair("vit+bert"), tiny_config())
    before = _taps(model)
    with pytest.raises(ValueError):
        model.load_adapter(tmp_path / "other", adapter_name="other")
    assert sorted(model.peft_config) == ["default"] and sorted(model.base_model.m2ist_side) == ["default"]
    assert _taps(model) == before


@pytest.mark.parametrize("pair_name", ["vit+bert", "mobilenet_v2+bert"])
def test_low_cpu_mem_usage_loads_the_same_adapter(tmp_path, pair_name):
    model = _saved(tmp_path, pair_name)
    inputs = batch(labels=False)
    with torch.no_grad():
        expected = model(**inputs).pred_boxes
    loaded = PeftModel.from_pretrained(build_pair(pair_name), tmp_path, low_cpu_mem_usage=True)
    assert not any(t.device.type == "meta" for t in (*loaded.parameters(), *loaded.buffers()))
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).pred_boxes, expected)
    second = get_peft_model(build_pair(pair_name), tiny_config())
    second.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=True)
    second.set_adapter("other")
    second.eval()
    with torch.no_grad():
        assert torch.equal(second(**inputs).pred_boxes, expected)


def test_unload_takes_peft_config_off_the_container():
    pair = build_pair("vit+bert")
    model = get_peft_model(pair, tiny_config())
    assert model.unload() is pair
    assert not hasattr(pair, "peft_config")
    _wrap_again_without_warnings(pair)


def test_set_requires_grad_reaches_side_networks_and_heads(tmp_path):
    model = get_peft_model(build_pair("vit+bert"), tiny_config())
    model.add_adapter("other", tiny_config())

    def trainable(name):
        modules = (model.base_model.m2ist_side[name], model.base_model.m2ist_head[name])
        flags = {p.requires_grad for m in modules for p in m.parameters()}
        assert len(flags) == 1
        return flags.pop()

    assert trainable("default") and not trainable("other")
    model.set_requires_grad("other")
    assert trainable("other") and trainable("default")
    model.set_requires_grad(["default", "other"], requires_grad=False)
    assert not trainable("default") and not trainable("other")
    assert not any(p.requires_grad for p in model.base_model.model.parameters())  # towers stay frozen
    with pytest.raises(ValueError, match="do not exist"):
        model.set_requires_grad("nope")

    # peft's load_adapter(is_trainable=True) goes through set_requires_grad
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="third", is_trainable=True)
    assert trainable("third")


def test_forward_without_any_adapter_says_so():
    model = get_peft_model(build_pair("vit+bert"), tiny_config())
    model.delete_adapter("default")
    for call in (lambda: model(**batch()), lambda: model.encode_towers(**batch(labels=False)),
                 model.get_parameter_counts):
        with pytest.raises(ValueError, match="no adapter: every adapter was deleted"):
            call()
