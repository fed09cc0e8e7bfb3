"""Frozen towers make their outputs cacheable: `forward(tower_features=encode_towers(...))` equals `forward(...)`."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_towers import PAIRS, batch, build_pair, tiny_config

from peft_m2ist.tower_layouts import get_tower


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
