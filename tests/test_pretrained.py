"""Tests for peft_m2ist.pretrained as callers see it: the public names, the offline towers behind the `offline:*`
names (peft_m2ist/pretrained/offline.py), and load_vision_tower / load_text_tower (loaders.py)."""

from __future__ import annotations

import json

import pytest
import torch

from peft_m2ist import pretrained as P
from peft_m2ist.pretrained import cache

# What examples/, benchmarks/, tests/ and docs/ import from peft_m2ist.pretrained: the package keeps exporting them.
PUBLIC_NAMES = {
    "CACHE_ENV",
    "DEFAULT_TEXT_TOWER",
    "DEFAULT_VISION_TOWER",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MOBILENET_V2_STRIDE16_TOWER",
    "OFFLINE_TEXT_TOWERS",
    "OFFLINE_VISION_TOWERS",
    "TOWER_DTYPES",
    "TowerUnavailableError",
    "convert_mobilenet_v2_state_dict",
    "default_cache_dir",
    "load_minilm",
    "load_mobilenet_v2_imagenet",
    "load_text_tower",
    "load_vision_tower",
    "minilm_path",
    "mobilenet_v2_imagenet_path",
    "mobilenet_v2_weights_file",
    "truncate_mobilenet_v2",
}


# --------------------------------------------------------------------------------------------------
# fast tests: no real weights
# --------------------------------------------------------------------------------------------------


def test_the_package_exports_the_public_names():
    assert set(P.__all__) == PUBLIC_NAMES
    assert all(hasattr(P, name) for name in PUBLIC_NAMES)
    assert {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16} == P.TOWER_DTYPES
    # tracebacks and pickles name the error by the path callers import it from
    assert P.TowerUnavailableError.__module__ == "peft_m2ist.pretrained"
    assert P.TowerUnavailableError.__qualname__ == "TowerUnavailableError"


def test_default_names_are_exported_and_offline():
    assert P.DEFAULT_VISION_TOWER in P.OFFLINE_VISION_TOWERS
    assert P.DEFAULT_TEXT_TOWER in P.OFFLINE_TEXT_TOWERS
    assert P.DEFAULT_VISION_TOWER.startswith("offline:")
    assert P.DEFAULT_TEXT_TOWER.startswith("offline:")


def test_unknown_offline_name_is_rejected():
    with pytest.raises(ValueError, match=r"offline:minilm-l6"):
        P.load_text_tower("offline:bert-huge")
    with pytest.raises(ValueError, match=r"offline:mobilenet_v2"):
        P.load_vision_tower("offline:resnet")


# --------------------------------------------------------------------------------------------------
# slow tests: the real offline weights
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mobilenet_folder(tmp_path_factory):
    return P.mobilenet_v2_imagenet_path(tmp_path_factory.mktemp("m2ist_cache"))


@pytest.mark.slow
def test_default_vision_tower(mobilenet_folder):
    from transformers import MobileNetV2Model

    model, processor = P.load_vision_tower(P.DEFAULT_VISION_TOWER, cache_dir=mobilenet_folder.parent)
    assert isinstance(model, MobileNetV2Model) and not model.training
    pixel_values = processor(images=torch.zeros(3, 40, 60, dtype=torch.uint8), return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        out = model(pixel_values=pixel_values).last_hidden_state
    assert out.shape == (1, 1280, 7, 7)


@pytest.mark.slow
def test_stride16_vision_tower_is_the_same_network_cut_after_block_12(mobilenet_folder):
    full, _ = P.load_vision_tower(P.DEFAULT_VISION_TOWER, cache_dir=mobilenet_folder.parent)
    cut, _ = P.load_vision_tower(P.MOBILENET_V2_STRIDE16_TOWER, cache_dir=mobilenet_folder.parent)
    assert P.MOBILENET_V2_STRIDE16_TOWER in P.OFFLINE_VISION_TOWERS
    assert len(cut.layer) == 12 and cut.config.num_kept_blocks == 12
    pixel_values = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        out = cut(pixel_values=pixel_values).last_hidden_state
        block_11 = full(pixel_values=pixel_values, output_hidden_states=True).hidden_states[11]
    assert out.shape == (1, 96, 8, 8)
    torch.testing.assert_close(out, block_11, rtol=0, atol=0)


@pytest.mark.slow
def test_minilm_text_tower():
    model, tokenizer = P.load_text_tower(P.DEFAULT_TEXT_TOWER)
    assert type(model).__name__ == "BertModel" and not model.training
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6

    sentences = ["a cat sleeping on a sofa", "a kitten napping on a couch", "a red truck on the highway"]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape[0] == 3 and hidden.shape[-1] == 384
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    sim = emb @ emb.T
    # Trained sentence embeddings: paraphrases are much closer than unrelated sentences.
    assert sim[0, 1] > sim[0, 2] + 0.3


@pytest.mark.slow
def test_loading_the_offline_towers_leaves_the_global_rng_alone(tmp_path):
    """A seeded run must initialise its adapters the same whether it converts the weights (the first run on a machine)
    or reads them from the cache, and whichever tower it loads."""
    torch.manual_seed(0)
    expected = torch.get_rng_state()
    for _ in ("convert", "read the cache"):
        P.load_vision_tower(P.MOBILENET_V2_STRIDE16_TOWER, cache_dir=tmp_path)
        P.load_text_tower(P.DEFAULT_TEXT_TOWER)
        assert torch.equal(torch.get_rng_state(), expected)


# --------------------------------------------------------------------------------------------------
# names recorded for the offline towers
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_saved_adapter_records_the_offline_tower_names(tmp_path, monkeypatch):
    from peft import get_peft_model

    from peft_m2ist import M2ISTConfig, VisionTextPair

    monkeypatch.setenv(P.CACHE_ENV, str(tmp_path / "cache"))
    vision, _ = P.load_vision_tower(P.MOBILENET_V2_STRIDE16_TOWER)
    text, _ = P.load_text_tower(P.DEFAULT_TEXT_TOWER)
    assert vision.config._name_or_path == "offline:mobilenet_v2-stride16"
    assert text.config._name_or_path == "offline:minilm-l6"
    full, _ = P.load_vision_tower(P.DEFAULT_VISION_TOWER)
    assert full.config._name_or_path == "offline:mobilenet_v2"

    pair = VisionTextPair(vision, text)
    assert pair.name_or_path == "offline:mobilenet_v2-stride16 + offline:minilm-l6"
    config = M2ISTConfig(bottleneck_dim=8, head_hidden_size=16, head_num_hidden_layers=1, head_num_attention_heads=2, head_intermediate_size=32,
                         max_text_tokens=8, image_size=64, num_tapped_layers=2)
    get_peft_model(pair, config).save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "offline:mobilenet_v2-stride16 + offline:minilm-l6"
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "- Vision tower (`vision_model`): `offline:mobilenet_v2-stride16`: " in card
    assert "- Text tower (`text_model`): `offline:minilm-l6`: " in card
    assert "base_model:" not in card  # a tag must name a Hub model, which an offline asset is not
    for machine_local in (str(tmp_path / "cache"), str(P.minilm_path()), cache._MOBILENET_FOLDER):
        assert machine_local not in card and machine_local not in json.dumps(saved)
