"""The Hub round trip: an adapter records its towers in its config (`M2ISTConfig.base_towers`), travels to the Hub
with `push_to_hub` (a local stand-in, tests/helpers/hub_stand_in.py) and loads back in one call onto those towers.

Pushed by examples/train_rec.py (tiny local towers, not the defaults) or saved by a user's own script, the adapter
gives the same boxes from its Hub id as from its folder; one that records no tower is refused, never given defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_train_script as script_tests
import torch
import yaml
from hub_stand_in import LocalHub
from huggingface_hub import HfApi
from peft import PeftModel, get_peft_model
from tiny_adapter import save_tiny_adapter
from tiny_towers import build_pair, tiny_config

from peft_m2ist import M2ISTConfig, VisionTextPair
from peft_m2ist import inference as inference_module
from peft_m2ist.data.sample_photos import SAMPLE_PHOTOS
from peft_m2ist.inference import ReferringExpressionGrounder, ground
from peft_m2ist.loading import load_adapter_with_towers
from peft_m2ist.pretrained import DEFAULT_TEXT_TOWER, DEFAULT_VISION_TOWER, MOBILENET_V2_STRIDE16_TOWER

towers = script_tests.towers  # tiny local towers (a MobileNetV2 and a BERT saved as folders), once per module
train_rec = script_tests.train_rec  # examples/train_rec.py as a module, accelerate set up for one CPU process
DEFAULT_NAMES = {DEFAULT_VISION_TOWER, MOBILENET_V2_STRIDE16_TOWER, DEFAULT_TEXT_TOWER}


@pytest.fixture
def hub(tmp_path, monkeypatch) -> LocalHub:
    monkeypatch.setattr(inference_module, "_CACHE", {})  # ground()'s loaded models: none from other tests
    return LocalHub(tmp_path / "hub").install(monkeypatch)


def _boxes(adapter: str | Path) -> list[tuple[float, ...]]:
    """`ground()`'s boxes for two sample photos (the one call a user makes), on the CPU."""
    images = [SAMPLE_PHOTOS[3].image(), SAMPLE_PHOTOS[4].image()]
    return [g.box for g in ground(images, ["the cat", "the cup of coffee"], adapter=adapter, device="cpu")]


def _card_meta(path: Path) -> dict:
    return yaml.safe_load(path.read_text().split("---\n", 2)[1])


# ------------------------------------------------------------------------------------------ pushed by train_rec
@pytest.mark.slow
def test_train_rec_pushes_an_adapter_that_ground_loads_by_its_hub_id_onto_its_own_towers(towers, train_rec, hub,
                                                                                         tmp_path):
    vision, text = towers
    out = tmp_path / "run"
    train_rec.main(script_tests._args(towers, out, "--max_train_steps", "2", "--num_workers", "0",
                                      "--push_to_hub", "--hub_model_id", "me/adapter"))
    pushed = hub.files("me/adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(pushed)
    assert "towers.json" not in pushed and not (out / "best_adapter" / "towers.json").exists()
    record = {"vision": str(vision), "text": str(text), "dtype": "float32"}
    assert json.loads(pushed["adapter_config.json"].read_text())["base_towers"] == record
    assert pushed["adapter_model.safetensors"].read_bytes() == \
        (out / "best_adapter" / "adapter_model.safetensors").read_bytes()
    card = pushed["README.md"].read_text()  # the M2IST card as saved, not a generic template
    assert "# M2IST adapter for referring expression comprehension" in card
    assert f'load_vision_tower("{vision}")' in card and "- Data: shapes benchmark" in card and "| val |" in card

    grounder = ReferringExpressionGrounder.from_pretrained("me/adapter", device="cpu")
    assert {k: grounder.towers[k] for k in record} == record and not DEFAULT_NAMES & set(grounder.towers.values())
    assert grounder.model.base_model.model.vision_model.config.depth_multiplier == 0.35  # the tiny tower itself
    assert _boxes("me/adapter") == _boxes(out / "best_adapter")


# ------------------------------------------------------------------------------------- saved by a user's script
def test_an_adapter_saved_by_a_script_loads_back_in_one_call_from_its_folder_and_its_hub_id(hub, tmp_path):
    tiny = save_tiny_adapter(tmp_path / "script")  # get_peft_model on from_pretrained towers, save_pretrained
    tiny.model.push_to_hub("me/script-adapter")
    assert set(hub.files("me/script-adapter")) == set(p.name for p in tiny.adapter.iterdir())
    record = {"vision": str(tiny.vision), "text": str(tiny.text), "dtype": "float32"}
    for adapter in (tiny.adapter, "me/script-adapter"):
        model, image_processor, tokenizer, used = load_adapter_with_towers(adapter)
        assert {k: used[k] for k in record} == record and used["source"] == "adapter_config.json (base_towers)"
        assert isinstance(model, PeftModel) and not model.training
        assert type(image_processor).__name__.startswith("MobileNetV2ImageProcessor")
        assert tokenizer("the cat")["input_ids"]
        state = {k: v for k, v in model.state_dict().items() if "m2ist" in k}
        expected = {k: v for k, v in tiny.model.state_dict().items() if "m2ist" in k}
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    assert _boxes("me/script-adapter") == _boxes(tiny.adapter)


def test_the_recorded_dtype_is_used_unless_one_is_given(tmp_path):
    tiny = save_tiny_adapter(tmp_path / "script")
    config = json.loads((tiny.adapter / "adapter_config.json").read_text())
    config["base_towers"]["dtype"] = "bfloat16"
    (tiny.adapter / "adapter_config.json").write_text(json.dumps(config))
    model, *_, used = load_adapter_with_towers(tiny.adapter)
    assert used["dtype"] == "bfloat16"
    assert model.base_model.model.vision_model.dtype == torch.bfloat16
    model, *_, used = load_adapter_with_towers(tiny.adapter, dtype=torch.float32)
    assert used["dtype"] == "float32" and model.base_model.model.text_model.dtype == torch.float32


def test_a_hub_adapter_without_a_record_is_refused_naming_the_arguments(hub, tmp_path):
    tiny = save_tiny_adapter(tmp_path / "script")
    config = json.loads((tiny.adapter / "adapter_config.json").read_text())
    del config["base_towers"]  # as saved before the record existed, without towers.json
    (tiny.adapter / "adapter_config.json").write_text(json.dumps(config))
    HfApi().create_repo("me/old-adapter")
    HfApi().upload_folder(repo_id="me/old-adapter", folder_path=tiny.adapter)
    with pytest.raises(ValueError, match=r"does not record its vision and text tower.*vision_model= and text_model="):
        ground(SAMPLE_PHOTOS[3].image(), "the cat", adapter="me/old-adapter", device="cpu")
    image = SAMPLE_PHOTOS[3].image()
    given = ground(image, "the cat", adapter="me/old-adapter", device="cpu", vision_model=str(tiny.vision),
                   text_model=str(tiny.text))
    assert given.box == ground(image, "the cat", adapter=tiny.adapter, device="cpu", vision_model=str(tiny.vision),
                               text_model=str(tiny.text)).box


# ------------------------------------------------------------------------------------------------- the record
def test_get_peft_model_records_the_towers_names_and_dtype_and_hand_set_values_win():
    pair = build_pair("mobilenet_v2+bert")  # built from configs: no names
    assert get_peft_model(pair, tiny_config()).peft_config["default"].base_towers == {
        "vision": None, "text": None, "dtype": "float32"}
    pair = build_pair("mobilenet_v2+bert")
    pair.vision_model.config._name_or_path = "org/vision"
    pair.text_model.config._name_or_path = "org/text"
    pair.vision_model.to(torch.bfloat16), pair.text_model.to(torch.bfloat16)
    auto = get_peft_model(VisionTextPair(pair.vision_model, pair.text_model), tiny_config())
    assert auto.peft_config["default"].base_towers == {"vision": "org/vision", "text": "org/text",
                                                       "dtype": "bfloat16"}
    pair = build_pair("mobilenet_v2+bert")
    pair.vision_model.config._name_or_path = "org/vision"
    by_hand = get_peft_model(pair, tiny_config(base_towers={"text": "my/text"}))
    assert by_hand.peft_config["default"].base_towers == {"vision": "org/vision", "text": "my/text",
                                                          "dtype": "float32"}


def test_a_dual_encoder_container_records_no_towers():
    clip = build_pair("clip")
    clip.config._name_or_path = "openai/clip-vit-base-patch32"
    assert get_peft_model(clip, tiny_config()).peft_config["default"].base_towers is None


def test_the_record_round_trips_through_adapter_config_json_and_old_configs_still_load(tmp_path):
    config = tiny_config(base_towers={"vision": "offline:mobilenet_v2", "text": "org/text", "dtype": "float16"})
    config.save_pretrained(tmp_path / "new")
    assert M2ISTConfig.from_pretrained(tmp_path / "new").base_towers == config.base_towers
    saved = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    del saved["base_towers"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(saved))
    assert M2ISTConfig.from_pretrained(tmp_path / "old").base_towers is None


@pytest.mark.parametrize("value,match", [
    ("offline:mobilenet_v2", "must be None or a mapping"),
    ({"vision": "a", "towers": "b"}, r"unknown keys \['towers'\]"),
    ({"vision": ""}, r"`base_towers\['vision'\]` must be None or a non-empty string"),
    ({"text": 3}, r"`base_towers\['text'\]` must be None or a non-empty string"),
    ({"dtype": "int4"}, r"must name a torch floating-point dtype .* or one of \[.int8.\]"),  # int8: a tower format
    ({"dtype": "nn"}, "must name a torch floating-point dtype"),
])
def test_a_bad_record_is_refused(value, match):
    with pytest.raises(ValueError, match=match):
        M2ISTConfig(base_towers=value)


def test_the_cards_base_model_comes_from_a_hand_set_record(tmp_path):
    pair = build_pair("vit+bert")  # towers built from configs: the record set by hand names their checkpoints
    model = get_peft_model(pair, tiny_config(base_towers={"vision": "google/vit-base-patch16-224",
                                                          "text": "bert-base-uncased", "dtype": "bfloat16"}))
    model.save_pretrained(tmp_path)
    meta = _card_meta(tmp_path / "README.md")
    assert meta["base_model"] == ["google/vit-base-patch16-224", "bert-base-uncased"]
    body = (tmp_path / "README.md").read_text()
    assert "model, image_processor, tokenizer, towers = load_adapter_with_towers(PATH)\n" in body
    assert 'load_vision_tower("google/vit-base-patch16-224")' in body
    assert "VisionTextPair(vision.to(torch.bfloat16), text.to(torch.bfloat16))" in body
