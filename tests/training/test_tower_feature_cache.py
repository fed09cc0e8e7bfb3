"""peft_m2ist.training.feature_cache: the towers' outputs cached per sample, in order, if they fit in RAM."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from peft import get_peft_model
from tiny_towers import batch, build_pair, tiny_config
from torch.utils.data import DataLoader

from peft_m2ist.training.feature_cache import (
    allocate_feature_cache,
    cache_tower_features,
    cached_loaders,
    feature_cache_message,
)


def _rows(inputs: dict[str, torch.Tensor], n: int) -> list[dict]:
    return [{**{k: v[i] for k, v in inputs.items()}, "labels": torch.full((4,), i / 10), "phrase_type": f"type{i}"}
            for i in range(n)]


def test_feature_cache_holds_each_samples_tower_outputs_in_order():
    model = get_peft_model(build_pair("vit+bert"), tiny_config()).eval()
    inputs = batch(size=5, labels=False)
    inputs["pixel_mask"][1, :, 16:] = 0
    cache = cache_tower_features(model, DataLoader(_rows(inputs, 5), batch_size=2), Accelerator(cpu=True), "test")
    expected = model.encode_towers(**inputs).to_tensors()
    assert len(cache) == 5 and set(cache.features) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(cache.features[key], value, rtol=0, atol=1e-6)
    assert cache[3]["phrase_type"] == "type3" and cache[3]["labels"][0] == pytest.approx(0.3)
    assert cache[3]["tower_features"].keys() == expected.keys()


def test_cached_loaders_feed_the_model_the_same_boxes_as_the_images():
    model = get_peft_model(build_pair("mobilenet_v2+bert"), tiny_config()).eval()
    inputs = batch(size=4, labels=False)
    loader = DataLoader(_rows(inputs, 4), batch_size=3)
    train, evals = cached_loaders(model, loader, {"val": loader, "testA": loader}, Accelerator(cpu=True), batch_size=3)
    assert list(evals) == ["val", "testA"] and len(evals["testA"].dataset) == 4  # one cached loader per eval split
    cached = next(iter(evals["val"]))
    assert cached["phrase_type"] == ["type0", "type1", "type2"]
    with torch.no_grad():
        direct = model(**{k: v[:3] for k, v in inputs.items()}).pred_boxes
        boxes = model(tower_features=cached["tower_features"]).pred_boxes
    torch.testing.assert_close(boxes, direct, rtol=0, atol=1e-6)
    assert len(train.dataset) == 4 and isinstance(train.sampler, torch.utils.data.RandomSampler)


def test_a_feature_cache_that_does_not_fit_in_ram_is_refused_before_allocating():
    first = {"vision": torch.zeros(2, 65, 384), "vision_mask": torch.ones(2, 65, dtype=torch.long)}
    per_sample = 65 * 384 * 4 + 65 * 8
    cache = allocate_feature_cache(first, 10, 1, "caching", available=10 * per_sample * 2)
    assert {k: (tuple(v.shape), v.dtype) for k, v in cache.items()} == {
        "vision": ((10, 65, 384), torch.float32), "vision_mask": ((10, 65), torch.long)}
    refusal = r"caching: the tower-feature cache needs .* 2 process\(es\).*--no-cache_features"
    with pytest.raises(MemoryError, match=refusal):
        allocate_feature_cache(first, 10, 2, "caching", available=10 * per_sample * 2)


def test_the_log_line_says_whether_and_why_features_are_cached():
    assert feature_cache_message(True, False).startswith("tower-feature cache on")
    assert "off: --augment changes the images" in feature_cache_message(False, True)
    assert "off (--no-cache_features)" in feature_cache_message(False, False)
