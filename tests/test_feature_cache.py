"""Frozen towers make their outputs cacheable: `forward(tower_features=encode_towers(...))` equals `forward(...)`."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_towers import PAIRS, batch, build_pair, tiny_config


@pytest.mark.parametrize("pair_name", list(PAIRS))
def test_cached_features_give_the_same_boxes_and_loss(pair_name):
    model = get_peft_model(build_pair(pair_name), tiny_config(interaction="cross_attention")).eval()
    inputs = batch()
    labels = inputs.pop("labels")
    direct = model(**inputs, labels=labels)
    features = model.encode_towers(**inputs)
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
