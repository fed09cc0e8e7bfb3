"""Frozen towers make their outputs cacheable: `forward(tower_features=encode_towers(...))` equals `forward(...)`."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_towers import PAIRS, batch, build_pair, tiny_config

from peft_m2ist.towers.layouts import get_tower


@pytest.mark.parametrize("pair_name", list(PAIRS))
def test_cached_features_give_the_same_boxes_and_loss(pair_name):
    model = get_peft_model(build_pair(pair_name), tiny_config(interaction="cross_attention")).eval()
    inputs = batch()
    labels = inputs.pop("labels")
    direct = model(**inputs, labels=labels)
    features = model.encode_towers(**inputs).to_tensors()
    assert not any(t.requires_grad for t in features.values())
    # per-sample slices restack to the same batch (what a dataset cache does)
    restacked = {k: torch.stack([v[i] for i in range(v.shape[0])]) for k, v in features.items()}
    cached = model(tower_features=restacked, labels=labels)
    torch.testing.assert_close(cached.pred_boxes, direct.pred_boxes, rtol=0, atol=1e-6)
    torch.testing.assert_close(cached.loss, direct.loss, rtol=0, atol=1e-6)


def test_cached_features_train_the_same_parameters():
    model = get_peft_model(build_pair("mobilenet_v2+bert"), tiny_config())
    inputs = batch()
    labels = inputs.pop("labels")
    features = model.encode_towers(**inputs)
    model(tower_features=features, labels=labels).loss.backward()
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert grads and all(".m2ist_side." in n or ".m2ist_head." in n for n in grads)


def test_bad_tower_features_are_rejected():
    model = get_peft_model(build_pair("vit+bert"), tiny_config())
    with pytest.raises(ValueError, match="tower_features"):
        model(tower_features={"vision": torch.zeros(1)})


def test_labels_are_validated_on_the_cached_path():
    model = get_peft_model(build_pair("vit+bert"), tiny_config())
    inputs = batch()
    labels = inputs.pop("labels")
    features = model.encode_towers(**inputs)
    with pytest.raises(ValueError, match=r"labels"):
        model(tower_features=features, labels=labels + 1.0)
    with pytest.raises(ValueError, match=r"labels"):
        model(tower_features=features, labels=labels[:1])


@pytest.mark.parametrize("pair_name", list(PAIRS))
def test_tower_micro_batches_give_the_same_features_boxes_and_gradients(pair_name):
    """`tower_micro_batch_size` splits only the frozen towers' forward: 5 samples in micro-batches of 2 (2 + 2 + 1)."""
    inputs = batch(size=5)
    labels = inputs.pop("labels")
    results = {}
    for size in (None, 2):
        model = get_peft_model(build_pair(pair_name), tiny_config(tower_micro_batch_size=size))
        model.train()
        torch.manual_seed(0)  # the same dropout masks in the side network and the head
        calls = []
        tower = get_tower(model.base_model.model, model.peft_config["default"].text_tower, "text_tower")
        handle = tower.register_forward_hook(
            lambda _m, _args, kwargs, _out, calls=calls: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
        )
        features = model.encode_towers(**inputs).to_tensors()
        handle.remove()
        assert calls == ([5] if size is None else [2, 2, 1])
        out = model(**inputs, labels=labels)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[size] = features, out, grads
    (whole, out_whole, grads_whole), (split, out_split, grads_split) = results[None], results[2]
    assert whole.keys() == split.keys()
    for key in whole:
        assert whole[key].shape == split[key].shape and whole[key].dtype == split[key].dtype, key
        torch.testing.assert_close(split[key], whole[key], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_split.pred_boxes, out_whole.pred_boxes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_split.loss, out_whole.loss, rtol=1e-5, atol=1e-5)
    assert grads_whole and grads_whole.keys() == grads_split.keys()
    for name in grads_whole:
        torch.testing.assert_close(grads_split[name], grads_whole[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pair_name", list(PAIRS))
def test_the_vision_and_text_halves_together_are_encode_towers(pair_name):
    """What a per-image feature cache relies on: each tower's outputs and taps come from its own inputs only."""
    model = get_peft_model(build_pair(pair_name), tiny_config(interaction="cross_attention")).eval()
    inputs = batch(labels=False)
    whole = model.encode_towers(**inputs).to_tensors()
    vision = model.encode_vision(inputs["pixel_values"], inputs["pixel_mask"])
    text = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
    assert not vision.keys() & text.keys() and {**vision, **text}.keys() == whole.keys()
    assert {"vision", "text", "text_mask"} <= whole.keys() and "vision" in vision and "text" in text
    for key, value in {**vision, **text}.items():
        torch.testing.assert_close(value, whole[key], rtol=0, atol=1e-6)
    # one image on its own gives the same vision outputs as within the batch
    alone = model.encode_vision(inputs["pixel_values"][1:], inputs["pixel_mask"][1:])
    for key, value in alone.items():
        torch.testing.assert_close(value, whole[key][1:], rtol=0, atol=1e-5)
    model.peft_config["default"].tower_micro_batch_size = 1  # the halves honour the towers' micro-batches too
    micro = {**model.encode_vision(inputs["pixel_values"], inputs["pixel_mask"]),
             **model.encode_text(inputs["input_ids"], inputs["attention_mask"])}
    for key, value in micro.items():
        torch.testing.assert_close(value, whole[key], rtol=0, atol=1e-5)


def test_the_halves_check_their_inputs():
    model = get_peft_model(build_pair("vit+bert"), tiny_config())
    inputs = batch(labels=False)
    with pytest.raises(TypeError, match="`pixel_values` must be floating point"):
        model.encode_vision(inputs["pixel_values"].long())
    with pytest.raises(ValueError, match="`pixel_mask` shape"):
        model.encode_vision(inputs["pixel_values"], inputs["pixel_mask"][:1])
    with pytest.raises(ValueError, match="built for at most 6"):
        model.encode_text(torch.ones(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="holds no phrases"):
        model.encode_text(torch.ones(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="vocabulary has 100 tokens"):
        model.encode_text(torch.full((1, 3), 500))
