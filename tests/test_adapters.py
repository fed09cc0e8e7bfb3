"""Adapter management: several adapters, switching, deleting, disabling, unloading; no merge."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_towers import batch, build_pair, tiny_config

from peft_m2ist import M2ISTTapLayer
from peft_m2ist.towers.forward import frozen, run_text_tower, run_vision_tower


def _towers_alone(pair, inputs):
    with frozen(pair.vision_model, pair.text_model):
        v = run_vision_tower(pair.vision_model, inputs["pixel_values"], None).tokens.tensor
        t = run_text_tower(pair.text_model, inputs["input_ids"], inputs["attention_mask"]).tokens.tensor
    return v, t


def test_add_switch_delete_adapters():
    model = get_peft_model(build_pair("vit+bert"), tiny_config())
    model.add_adapter("other", tiny_config(interaction="cross_attention", bottleneck_dim=4))
    model.eval()
    inputs = batch(labels=False)
    first = model(**inputs).pred_boxes
    model.set_adapter("other")
    second = model(**inputs).pred_boxes
    assert not torch.allclose(first, second)
    trainable = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"other"}
    model.set_adapter("default")
    assert torch.equal(model(**inputs).pred_boxes, first)
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="one adapter at a time"):  # the PeftModel users hold, too
        model.set_adapter(["default", "other"])
    model.set_adapter(["other"])
    assert model.active_adapter == "other" and torch.equal(model(**inputs).pred_boxes, second)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert set(model.base_model.m2ist_side) == {"default"}
    assert torch.equal(model(**inputs).pred_boxes, first)


def test_delete_last_adapter_restores_the_towers():
    pair = build_pair("vit+bert")
    model = get_peft_model(pair, tiny_config())
    model.add_adapter("other", tiny_config())
    model.delete_adapter("other")
    assert any(isinstance(m, M2ISTTapLayer) for m in pair.modules())
    model.base_model.delete_adapter("default")
    assert not any(isinstance(m, M2ISTTapLayer) for m in pair.modules())


def test_disable_adapter_gives_the_towers_own_outputs():
    reference = build_pair("vit+bert")
    model = get_peft_model(build_pair("vit+bert"), tiny_config())
    inputs = batch(labels=False)
    with model.disable_adapter():
        out = model(**inputs)
    assert out.pred_boxes is None
    v, t = _towers_alone(reference, inputs)
    assert torch.allclose(out.vision_last_hidden_state, v) and torch.allclose(out.text_last_hidden_state, t)
    with model.disable_adapter(), pytest.raises(ValueError, match="no grounding head"):
        model(**batch(labels=True))
    assert model(**inputs).pred_boxes is not None


def test_unload_returns_untouched_towers_and_merge_is_refused():
    reference = build_pair("vit+bert")
    model = get_peft_model(build_pair("vit+bert"), tiny_config())
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    pair = model.unload()
    assert not any(isinstance(m, M2ISTTapLayer) for m in pair.modules())
    assert pair.state_dict().keys() == reference.state_dict().keys()
    inputs = batch(labels=False)
    for a, b in zip(_towers_alone(pair, inputs), _towers_alone(reference, inputs)):
        assert torch.equal(a, b)


def test_print_trainable_parameters_matches_the_counts(capsys):
    model = get_peft_model(build_pair("vit+bert"), tiny_config())
    trainable, total = model.get_nb_trainable_parameters()
    counts = model.get_parameter_counts()
    assert trainable == counts["adapter_and_head"] and total == counts["total"]
    assert 0 < counts["adapter_only"] < counts["adapter_and_head"]
    model.print_trainable_parameters()
    model.print_parameter_counts()
    printed = capsys.readouterr().out
    assert f"{trainable:,}" in printed and f"{counts['adapter_only']:,}" in printed


def test_gradient_checkpointing_is_not_enabled_on_the_towers():
    model = get_peft_model(build_pair("vit+bert"), tiny_config())
    towers = (model.base_model.model.vision_model, model.base_model.model.text_model)
    assert not any(getattr(t, "is_gradient_checkpointing", False) for t in towers)


@pytest.mark.parametrize("recompute", [True, False])
def test_the_head_recomputes_its_feed_forward_as_configured(recompute):
    model = get_peft_model(build_pair("vit+bert"), tiny_config(head_recompute_feed_forward=recompute))
    layers = model.base_model.m2ist_head["default"].encoder.layers
    assert [layer.recompute_hidden for layer in layers] == [recompute] * len(layers)


def test_towers_stay_in_eval_mode_while_the_side_network_and_head_train():
    pair = build_pair("mobilenet_v2+bert")
    model = get_peft_model(pair, tiny_config(expert_dropout=0.1, head_dropout=0.1))
    side, head = model.base_model.m2ist_side["default"], model.base_model.m2ist_head["default"]
    towers = (pair.vision_model, pair.text_model)
    model.train()
    assert not any(m.training for tower in towers for m in tower.modules())
    assert all(m.training for m in (*side.modules(), *head.modules()))
    # a tower called on its own keeps its batch norms' running statistics
    statistics = {name: buffer.clone() for name, buffer in pair.vision_model.named_buffers()}
    assert any("running_mean" in name for name in statistics)
    with torch.no_grad():
        pair.vision_model(pixel_values=batch()["pixel_values"])
    for name, buffer in pair.vision_model.named_buffers():
        assert torch.equal(buffer, statistics[name]), name
    model.eval()
    assert not any(m.training for m in (*side.modules(), *head.modules()))
    assert not any(m.training for tower in towers for m in tower.modules())


def test_only_the_active_adapters_taps_record(monkeypatch):
    model = get_peft_model(build_pair("vit+bert"), tiny_config(num_tapped_layers=1)).eval()  # the last block
    inputs = batch(labels=False)
    before = model(**inputs).pred_boxes
    # a second adapter tapping the first block of both towers
    first_block = {field: [name.replace(".1.", ".0.") for name in getattr(model.peft_config["default"], field)]
                   for field in ("vision_layers", "vision_attention_layers", "text_layers", "text_attention_layers")}
    model.add_adapter("other", tiny_config(**first_block))
    model.eval()
    default_taps = set(model.peft_config["default"].target_modules)
    other_taps = set(model.peft_config["other"].target_modules)
    assert other_taps - default_taps and default_taps - other_taps

    recorder = model.base_model._m2ist_recorder
    stored: list[set[str]] = []
    stop = recorder.stop

    def recording_stop():
        records = stop()
        stored.append(set(records))
        return records

    monkeypatch.setattr(recorder, "stop", recording_stop)
    # one recording per tower (vision, then text) in each forward; together they hold the active adapter's taps only
    assert torch.equal(model(**inputs).pred_boxes, before)
    assert len(stored) == 2 and set().union(*stored) == default_taps
    stored.clear()
    model.set_adapter("other")
    model(**inputs)
    assert len(stored) == 2 and set().union(*stored) == other_taps
