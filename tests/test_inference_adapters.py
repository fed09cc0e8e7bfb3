"""The inference API with several adapters on one pair of towers: `extra_adapters=`, `load_adapter`, and
`adapter_names=` picking one adapter per input (the towers run once per batch)."""

from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import pytest
from tiny_adapter import save_other_adapter, save_tiny_adapter

from peft_m2ist import inference as inference_module
from peft_m2ist.data.sample_photos import SAMPLE_PHOTOS
from peft_m2ist.inference import ReferringExpressionGrounder, ground

PHRASES = ["the eye on the right", "the cup of coffee", "the cat", "top left coin"]
NAMES = ["b", "default", "b", "c"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    tiny = save_tiny_adapter(tmp_path_factory.mktemp("inference_adapters"))
    tiny.b = save_other_adapter(tiny, tiny.root / "adapter_b", seed=1, interaction="cross_attention",
                                bottleneck_dim=4)
    tiny.c = save_other_adapter(tiny, tiny.root / "adapter_c", seed=2, num_tapped_layers=1)
    return tiny


@pytest.fixture(scope="module")
def grounder(tiny) -> ReferringExpressionGrounder:
    return ReferringExpressionGrounder.from_pretrained(tiny.adapter, device="cpu", extra_adapters={"b": tiny.b})


def _images() -> list:
    return [SAMPLE_PHOTOS[i].image() for i in (3, 4, 3, 2)]


def test_each_input_is_grounded_by_its_own_adapter(tiny, grounder):
    grounder.load_adapter(tiny.c, "c")  # after from_pretrained too
    assert grounder.adapters == {"default": str(tiny.adapter), "b": str(tiny.b), "c": str(tiny.c)}
    images = _images()
    mixed = grounder(images, PHRASES, adapter_names=NAMES, batch_size=3)
    alone = {name: ReferringExpressionGrounder.from_pretrained(path, device="cpu")(images, PHRASES)
             for name, path in (("default", tiny.adapter), ("b", tiny.b), ("c", tiny.c))}
    for row, name in enumerate(NAMES):
        assert mixed[row].phrase == PHRASES[row]
        assert mixed[row].box == pytest.approx(alone[name][row].box, abs=1e-3)  # pixels (1e-6 of a 500-px side)
    assert mixed[0].box != pytest.approx(alone["default"][0].box, abs=1e-3)  # the adapters do differ
    assert grounder(images, PHRASES) == grounder(images, PHRASES, adapter_names="default")  # the first adapter
    assert grounder(images[0], PHRASES[0], adapter_names="b").box == pytest.approx(alone["b"][0].box, abs=1e-3)


def test_unknown_names_and_counts_are_refused(grounder):
    image = SAMPLE_PHOTOS[3].image()
    with pytest.raises(ValueError, match=r"unknown adapter name\(s\) \['nope'\]; loaded adapters: \['b', "):
        grounder([image, image], ["a cat", "an eye"], adapter_names=["b", "nope"])
    with pytest.raises(ValueError, match="got 3 adapter names for 2 phrases"):
        grounder([image, image], ["a cat", "an eye"], adapter_names=["b", "b", "default"])


def test_a_second_adapter_must_read_inputs_as_the_first(tiny, grounder, caplog):
    before = set(grounder.model.peft_config)
    with pytest.raises(ValueError, match="is loaded already"):
        grounder.load_adapter(tiny.b, "b")
    big = save_other_adapter(tiny, tiny.root / "adapter_64px", image_size=64)
    with pytest.raises(ValueError, match=r"image_size=64 \(loaded adapters: 32\)"):
        grounder.load_adapter(big, "big")
    assert set(grounder.model.peft_config) == before and "big" not in grounder.adapters
    renamed = tiny.root / "adapter_renamed_towers"  # the same towers under another name: warned, then loaded
    shutil.copytree(tiny.b, renamed)
    config = json.loads((renamed / "adapter_config.json").read_text())
    config["base_towers"]["vision"] = "someone/another-vision-tower"
    (renamed / "adapter_config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger=inference_module.__name__):
        grounder.load_adapter(renamed, "renamed")
    assert "records other towers" in caplog.text and "someone/another-vision-tower" in caplog.text
    assert not grounder.model.base_model.m2ist_head["renamed"].training  # loaded in eval mode
    image = SAMPLE_PHOTOS[3].image()
    assert grounder(image, "a cat", adapter_names="renamed") == grounder(image, "a cat", adapter_names="b")


def test_ground_takes_extra_adapters_and_adapter_names(tiny, grounder, monkeypatch):
    monkeypatch.setattr(inference_module, "_CACHE", {})
    image = SAMPLE_PHOTOS[4].image()
    result = ground([image, image], ["the cup", "the spoon"], adapter=tiny.adapter, device="cpu",
                    extra_adapters={"b": tiny.b}, adapter_names=["b", "default"])
    assert result == grounder([image, image], ["the cup", "the spoon"], adapter_names=["b", "default"])
