"""peft_m2ist.training.feature_cache: the towers' outputs cached on disk, memory-mapped, once per image and once per
expression, built once and reused while the towers, taps and data stay the same."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from peft import get_peft_model
from tiny_towers import batch, build_pair, tiny_config
from torch.utils.data import DataLoader, Dataset

from peft_m2ist.training import feature_cache
from peft_m2ist.training.feature_cache import (
    CachedTowerFeatures,
    build_feature_cache,
    cached_loaders,
    feature_cache_message,
)


class Rows(Dataset):
    """Collated-ready records; with `image_ids`, an `image_id` column as the real-format loaders have."""

    def __init__(self, inputs: dict[str, torch.Tensor], n: int, image_ids: list[str] | None = None) -> None:
        self.rows = [{**{k: v[i] for k, v in inputs.items()}, "labels": torch.full((4,), i / 10),
                      "phrase_type": f"type{i}"} for i in range(n)]
        self.image_ids = image_ids
        self.column_names = ["image_id"] if image_ids else []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        return self.image_ids if key == "image_id" else self.rows[key]


def _vision_images_seen(model) -> list[int]:
    """A list that grows by the batch size at every forward of the vision tower."""
    seen: list[int] = []
    model.base_model.model.vision_model.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(len(kwargs.get("pixel_values", args[0] if args else None))),
        with_kwargs=True)
    return seen


def _model(pair: str = "vit+bert"):
    return get_peft_model(build_pair(pair), tiny_config()).eval()


def test_the_cache_holds_each_records_tower_outputs_in_dataset_order(tmp_path):
    model = _model()
    inputs = batch(size=5, labels=False)
    inputs["pixel_mask"][1, :, 16:] = 0
    cache = build_feature_cache(model, DataLoader(Rows(inputs, 5), batch_size=2, shuffle=True), tmp_path / "split",
                                Accelerator(cpu=True), "test")
    expected = model.encode_towers(**inputs).to_tensors()
    assert len(cache) == 5 and cache.num_images == 5
    for i in range(5):
        item = cache[i]
        assert item.keys() == {"tower_features", "labels", "phrase_type"} and item["phrase_type"] == f"type{i}"
        assert item["tower_features"].keys() == expected.keys() and item["labels"][0] == pytest.approx(i / 10)
        for key, value in expected.items():
            torch.testing.assert_close(item["tower_features"][key], value[i], rtol=0, atol=1e-6)
    arrays = cache.arrays()
    assert all(isinstance(arrays[f], np.memmap) for f in cache.manifest["vision"].values())  # memory-mapped, not RAM
    assert pickle.loads(pickle.dumps(cache))._arrays is None  # workers get the folder's path, then map it themselves


def test_the_vision_tower_runs_and_stores_once_per_image(tmp_path):
    """Five expressions on two images: two images through the vision tower, two vision rows on disk."""
    model = _model()
    inputs = batch(size=5, labels=False)
    for i in (1, 2):  # records 1 and 2 show record 0's image, record 4 shows record 3's
        inputs["pixel_values"][i], inputs["pixel_mask"][i] = inputs["pixel_values"][0], inputs["pixel_mask"][0]
    inputs["pixel_values"][4], inputs["pixel_mask"][4] = inputs["pixel_values"][3], inputs["pixel_mask"][3]
    seen = _vision_images_seen(model)
    rows = Rows(inputs, 5, image_ids=["a", "a", "a", "b", "b"])
    cache = build_feature_cache(model, DataLoader(rows, batch_size=2), tmp_path / "split", Accelerator(cpu=True), "t")
    assert sum(seen) == 2 and cache.num_images == 2
    assert cache.arrays()[cache.manifest["vision"]["vision"]].shape[0] == 2
    assert cache.arrays()[cache.manifest["text"]["text"]].shape[0] == 5
    expected = model.encode_towers(**inputs).to_tensors()
    for i in range(5):
        for key, value in expected.items():
            torch.testing.assert_close(cache[i]["tower_features"][key], value[i], rtol=0, atol=1e-6)


def test_records_that_share_an_image_id_but_not_their_image_are_refused(tmp_path):
    rows = Rows(batch(size=3, labels=False), 3, image_ids=["x", "y", "x"])
    with pytest.raises(ValueError, match=r"share image_id 'x' but their images differ \(record 2\)"):
        build_feature_cache(_model(), DataLoader(rows, batch_size=3), tmp_path / "s", Accelerator(cpu=True), "t")
    assert not (tmp_path / "s").exists()  # nothing half-built where a later run would look


def test_a_finished_cache_is_reused_only_for_the_same_towers_taps_and_data(tmp_path, caplog):
    model = _model()
    loader = DataLoader(Rows(batch(size=3, labels=False), 3), batch_size=2)
    accelerator = Accelerator(cpu=True)
    seen = _vision_images_seen(model)
    build_feature_cache(model, loader, tmp_path / "s", accelerator, "t", {"dataset": "abc"})
    assert sum(seen) == 3
    build_feature_cache(model, loader, tmp_path / "s", accelerator, "t", {"dataset": "abc"})
    assert sum(seen) == 3  # reused: the towers did not run again
    build_feature_cache(model, loader, tmp_path / "s", accelerator, "t", {"dataset": "other"})
    assert sum(seen) == 6  # other data: rebuilt
    build_feature_cache(model, loader, tmp_path / "s", accelerator, "t", None)
    assert sum(seen) == 9  # data of unknown identity: always rebuilt
    other_towers = _model()
    with torch.no_grad():
        next(other_towers.base_model.model.vision_model.parameters()).add_(1.0)
    other_seen = _vision_images_seen(other_towers)
    build_feature_cache(other_towers, loader, tmp_path / "s", accelerator, "t", {"dataset": "other"})
    assert sum(other_seen) == 3  # other tower weights: rebuilt
    other_towers.base_model.model.vision_model.config.layer_norm_eps = 1e-3
    build_feature_cache(other_towers, loader, tmp_path / "s", accelerator, "t", {"dataset": "other"})
    assert sum(other_seen) == 6  # another tower config (same weights): rebuilt


def test_the_other_processes_wait_and_map_the_main_processs_cache(tmp_path):
    model = _model()
    loader = DataLoader(Rows(batch(size=3, labels=False), 3), batch_size=2)
    main = build_feature_cache(model, loader, tmp_path / "s", Accelerator(cpu=True), "t")
    waited = []
    other = SimpleNamespace(is_main_process=False, is_local_main_process=False, device=torch.device("cpu"),
                            wait_for_everyone=lambda: waited.append(True))
    seen = _vision_images_seen(model)
    mapped = build_feature_cache(model, loader, tmp_path / "s", other, "t")
    assert waited == [True] and seen == [] and len(mapped) == len(main) == 3  # no tower ran in the other process
    torch.testing.assert_close(mapped[2]["tower_features"]["vision"], main[2]["tower_features"]["vision"])


def test_an_interrupted_build_leaves_no_cache_and_the_next_build_completes(tmp_path):
    model = _model()
    rows = Rows(batch(size=4, labels=False), 4)
    calls = []

    def failing_collate(records):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is stopped mid-build
        return torch.utils.data.default_collate(records)

    with pytest.raises(KeyboardInterrupt):
        build_feature_cache(model, DataLoader(rows, batch_size=2, collate_fn=failing_collate), tmp_path / "s",
                            Accelerator(cpu=True), "t", {"dataset": "d"})
    assert not (tmp_path / "s").exists() and (tmp_path / "s.tmp").exists()
    cache = build_feature_cache(model, DataLoader(rows, batch_size=2), tmp_path / "s", Accelerator(cpu=True), "t",
                                {"dataset": "d"})
    assert len(cache) == 4 and not (tmp_path / "s.tmp").exists()


def test_a_cache_larger_than_the_free_disk_is_refused_before_writing(tmp_path, monkeypatch):
    class Usage:
        free = 1000

    monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda path: Usage)
    rows = Rows(batch(size=2, labels=False), 2)
    refusal = r"t: the tower-feature cache needs .* GB but .* has 0\.00 GB free.*--feature_cache_dir.*--no-cache_features"
    with pytest.raises(OSError, match=refusal):
        build_feature_cache(_model(), DataLoader(rows, batch_size=2), tmp_path / "s", Accelerator(cpu=True), "t")
    assert not (tmp_path / "s").exists()


def test_bfloat16_tower_outputs_round_trip(tmp_path):
    model = _model()
    model.base_model.model.to(torch.bfloat16)
    inputs = batch(size=2, labels=False)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    cache = build_feature_cache(model, DataLoader(Rows(inputs, 2), batch_size=2), tmp_path / "s",
                                Accelerator(cpu=True), "t")
    expected = model.encode_towers(**inputs).to_tensors()
    assert expected["vision"].dtype == torch.bfloat16
    for key, value in expected.items():
        assert cache[1]["tower_features"][key].dtype == value.dtype
        torch.testing.assert_close(cache[1]["tower_features"][key], value[1], rtol=0, atol=0)


def test_building_leaves_the_global_random_state_as_it_was(tmp_path):
    """So that a run with the cache shuffles and drops out as the same run without it."""
    model, loader = _model(), DataLoader(Rows(batch(size=2, labels=False), 2), batch_size=1, shuffle=True)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_feature_cache(model, loader, tmp_path / "s", Accelerator(cpu=True), "t")
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_cached_loaders_feed_the_model_the_same_boxes_as_the_images(tmp_path):
    model = _model("mobilenet_v2+bert")
    inputs = batch(size=4, labels=False)
    loader = DataLoader(Rows(inputs, 4), batch_size=3)
    train, evals = cached_loaders(model, loader, {"val": loader, "testA": loader}, Accelerator(cpu=True),
                                  batch_size=3, cache_dir=tmp_path)
    assert list(evals) == ["val", "testA"] and len(evals["testA"].dataset) == 4  # one cached loader per eval split
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval-testA", "eval-val", "train"]
    cached = next(iter(evals["val"]))
    assert cached["phrase_type"] == ["type0", "type1", "type2"]
    with torch.no_grad():
        direct = model(**{k: v[:3] for k, v in inputs.items()}).pred_boxes
        boxes = model(tower_features=cached["tower_features"]).pred_boxes
    torch.testing.assert_close(boxes, direct, rtol=0, atol=1e-6)
    assert isinstance(train.dataset, CachedTowerFeatures) and isinstance(train.sampler, torch.utils.data.RandomSampler)


def test_the_log_line_says_whether_and_why_features_are_cached():
    assert feature_cache_message(True, False).startswith("tower-feature cache on")
    assert "off: --augment changes the images" in feature_cache_message(False, True)
    assert "off (--no-cache_features)" in feature_cache_message(False, False)
