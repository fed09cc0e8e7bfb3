"""Bad input gets a clear ValueError/TypeError naming the argument, and leaves no partial state behind."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_towers import batch, build_pair, tiny_config

from peft_m2ist import M2ISTConfig, M2ISTTapLayer


@pytest.fixture(scope="module")
def model():
    return get_peft_model(build_pair("vit+bert"), tiny_config())


def _taps(module) -> int:
    return sum(isinstance(m, M2ISTTapLayer) for m in module.modules())


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda b: b.update(input_ids=b["input_ids"][:1], attention_mask=b["attention_mask"][:1]), ValueError,
         "Batch sizes differ"),
        (lambda b: b.update(pixel_values=b["pixel_values"][0]), ValueError, "pixel_values"),
        (lambda b: b.update(input_ids=b["input_ids"][0]), ValueError, "input_ids"),
        (lambda b: b.update(input_ids=b["input_ids"].float()), TypeError, "input_ids"),
        (lambda b: b.update(attention_mask=b["attention_mask"][:, :3]), ValueError, "attention_mask"),
        (lambda b: b.update(pixel_mask=b["pixel_mask"][:, :4]), ValueError, "pixel_mask"),
        (lambda b: b.update(pixel_values=b["pixel_values"].tolist()), TypeError, "pixel_values"),
        (lambda b: b.update(labels=b["labels"] + 1.0), ValueError, r"labels.*\[0, 1\]"),
        (lambda b: b["labels"].__setitem__((0, 2), 0.0), ValueError, "width and height > 0"),
        (lambda b: b.update(labels=b["labels"][:, :3]), ValueError, "labels"),
        (lambda b: b.update(labels=torch.ones(2, 4, dtype=torch.long)), TypeError, "labels"),
        (lambda b: b.update(input_ids=torch.ones(2, 9, dtype=torch.long), attention_mask=torch.ones(2, 9)),
         ValueError, "max_text_tokens"),
        (lambda b: b.update(input_ids=b["input_ids"][:, :0], attention_mask=b["attention_mask"][:, :0]), ValueError,
         "`input_ids` has no tokens"),
        (lambda b: b.update(pixel_values=(b["pixel_values"] * 50).clamp(0, 255).to(torch.uint8)), TypeError,
         "`pixel_values` must be floating point"),
        (lambda b: b.update(pixel_values=b["pixel_values"].to("meta")), ValueError,
         "`pixel_values` is on meta but the vision tower is on cpu"),
        (lambda b: b.update(attention_mask=b["attention_mask"].to("meta")), ValueError,
         "`attention_mask` is on meta but the text tower is on cpu"),
    ],
)
def test_bad_batches_are_rejected(model, change, error, match):
    inputs = batch()
    change(inputs)
    with pytest.raises(error, match=match):
        model(**inputs)
    # the recorder is idle and the model still works
    assert not model.base_model._m2ist_recorder.active
    assert model(**batch()).pred_boxes.shape == (2, 4)



def test_unknown_forward_arguments_are_refused(model):
    inputs = batch()
    inputs["label"] = inputs.pop("labels")  # a typo that would otherwise train on no loss
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['label'\]"):
        model(**inputs)
    # the collator's metadata and Trainer's token count are accepted and ignored
    out = model(**batch(), phrase_type=["attribute", "relation"], num_items_in_batch=2)
    assert out.loss is not None


def test_return_dict_false_gives_the_output_as_a_tuple(model):
    was_training = model.training
    model.eval()
    out = model(**batch())
    loss, pred_boxes, loss_l1, loss_giou = model(**batch(), return_dict=False)
    assert torch.equal(pred_boxes, out.pred_boxes) and torch.equal(loss, out.loss)
    assert torch.equal(loss_l1, out.loss_l1) and torch.equal(loss_giou, out.loss_giou)
    (boxes,) = model(**batch(labels=False), return_dict=False)
    assert torch.equal(boxes, out.pred_boxes)
    model.train(was_training)



def test_towers_without_weights_are_refused_before_probing():
    with torch.device("meta"):
        pair = build_pair("vit+bert")
    with pytest.raises(ValueError, match="weights on the 'meta' device"):
        get_peft_model(pair, tiny_config())


def test_wrong_image_size_names_the_config_field(model):
    inputs = batch(labels=False)
    inputs["pixel_values"] = torch.randn(2, 3, 48, 48)
    inputs.pop("pixel_mask")
    with pytest.raises(ValueError, match="image_size"):
        model(**inputs)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(vision_layers=["layers.0.nope"], vision_attention_layers=["layers.0.attention"]), "unknown modules"),
        (dict(text_layers=r"encoder\.layer\.\d+\.nothing"), "matches no module"),
        (dict(vision_tower="visual"), "vision_tower"),
        (dict(vision_layers=["layers.0", "layers.1"], vision_attention_layers=["layers.0.attention",
                                                                               "layers.1.attention"]),
         "must not be nested"),
        (dict(text_layers=["encoder.layer.0.output"]), "tapped layers"),
        (dict(max_text_tokens=10_000), r"`max_text_tokens` is 10000 but the text tower has position embeddings"),
    ],
)
def test_bad_tap_configs_fail_before_touching_the_model(overrides, match):
    pair = build_pair("vit+bert")
    with pytest.raises(ValueError, match=match):
        get_peft_model(pair, tiny_config(**overrides))
    assert _taps(pair) == 0


def test_unknown_tower_type_names_the_fields_to_set():
    pair = build_pair("vit+bert")
    pair.text_model = torch.nn.Sequential(torch.nn.Embedding(100, 32))
    with pytest.raises(ValueError, match="text_layers"):
        get_peft_model(pair, tiny_config())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bottleneck_dim=0), "bottleneck_dim"),
        (dict(interaction="concat"), "interaction"),
        (dict(mixture="router"), "mixture"),
        (dict(head_hidden_size=30, head_num_attention_heads=8), "head_hidden_size"),
        (dict(head_dropout=1.5), "head_dropout"),
        (dict(expert_scale=0.0), "expert_scale"),
        (dict(expert_scale=float("nan")), "`expert_scale` must be a finite number"),
        (dict(expert_scale="0.1"), "`expert_scale` must be a finite number"),
        (dict(expert_dropout=None), "`expert_dropout` must be a finite number"),
        (dict(l1_weight=None), "`l1_weight` must be a finite number"),
        (dict(l1_weight=0.0, giou_weight=float("nan")), "`giou_weight` must be a finite number"),
        (dict(giou_weight=float("inf")), "`giou_weight` must be a finite number"),
        (dict(l1_weight=0.0, giou_weight=0.0), "l1_weight"),
        (dict(vision_layers="("), "regular expression"),
        (dict(text_layers=[]), "text_layers"),
        (dict(image_size=-3), "image_size"),
        (dict(head_gradient_checkpointing="yes"), "head_gradient_checkpointing"),
        (dict(head_recompute_feed_forward=1), "head_recompute_feed_forward"),
        (dict(tower_micro_batch_size=0), "tower_micro_batch_size"),
        (dict(tower_micro_batch_size=True), "tower_micro_batch_size"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M2ISTConfig(**kwargs)


def test_failed_add_adapter_leaves_no_trace(model):
    before = (_taps(model), set(model.peft_config), set(model.base_model.m2ist_side))
    with pytest.raises(ValueError):
        model.add_adapter("broken", tiny_config(text_layers=r"nothing\.here"))
    assert (_taps(model), set(model.peft_config), set(model.base_model.m2ist_side)) == before
