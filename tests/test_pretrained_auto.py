"""Tests for peft_m2ist/pretrained/auto.py: hub ids and local folders through the Auto classes, offline mode, and
the errors for unreachable hub ids, missing local paths and incomplete local folders."""

from __future__ import annotations

import time

import huggingface_hub.constants
import pytest
import torch

from peft_m2ist import pretrained as P
from peft_m2ist.pretrained import auto

# --------------------------------------------------------------------------------------------------
# fast tests: no real weights
# --------------------------------------------------------------------------------------------------


def test_missing_local_folder_is_reported(tmp_path):
    with pytest.raises(P.TowerUnavailableError, match="no such folder"):
        P.load_vision_tower(str(tmp_path / "nope"))


def test_unreachable_hub_id_fails_fast_with_alternatives(monkeypatch, tmp_path):
    # huggingface_hub reads HF_HUB_OFFLINE at import time: set both the variable and the constant.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for loader, default in (
        (P.load_vision_tower, P.DEFAULT_VISION_TOWER),
        (P.load_text_tower, P.DEFAULT_TEXT_TOWER),
    ):
        start = time.perf_counter()
        with pytest.raises(P.TowerUnavailableError) as info:
            loader("openai/clip-vit-base-patch32", cache_dir=str(tmp_path / "hf"))
        assert time.perf_counter() - start < 10
        message = str(info.value)
        assert "openai/clip-vit-base-patch32" in message
        assert "offline" in message
        assert "local folder" in message
        assert default in message
        assert isinstance(info.value, OSError)  # callers catching OSError keep working


def _tiny_clip_folder(tmp_path, tokenizer):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=tokenizer.vocab_size,
            max_position_embeddings=32,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    folder = tmp_path / "tiny_clip"
    CLIPModel(cfg).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------
# slow tests: the real offline weights
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mobilenet_folder(tmp_path_factory):
    return P.mobilenet_v2_imagenet_path(tmp_path_factory.mktemp("m2ist_cache"))


@pytest.mark.slow
def test_local_folder_goes_through_auto_classes(mobilenet_folder):
    from transformers import MobileNetV2Model

    # A *ForImageClassification checkpoint gives its base model.
    model, processor = P.load_vision_tower(str(mobilenet_folder))
    assert type(model) is MobileNetV2Model
    assert list(processor.image_mean) == pytest.approx(P.IMAGENET_MEAN)


@pytest.mark.slow
def test_dual_encoder_folder_gives_sub_models(tmp_path):
    from transformers import CLIPTextModel, CLIPVisionModel

    _, tokenizer = P.load_minilm()
    folder = _tiny_clip_folder(tmp_path, tokenizer)
    vision, processor = P.load_vision_tower(str(folder))
    text, tok = P.load_text_tower(str(folder))
    assert type(vision) is CLIPVisionModel and type(text) is CLIPTextModel
    with torch.no_grad():
        v = vision(**processor(images=torch.zeros(3, 32, 32, dtype=torch.uint8), return_tensors="pt"))
        t = text(**tok(["the left cup"], return_tensors="pt"))
    assert v.last_hidden_state.shape == (1, 17, 32)
    assert t.last_hidden_state.shape[-1] == 32


# --------------------------------------------------------------------------------------------------
# local paths and folders
# --------------------------------------------------------------------------------------------------


class _NoHub:
    """Stands in for AutoConfig: records that a name went to the Hub path, and fails as an unreachable Hub does."""

    calls: list[str] = []

    @classmethod
    def from_pretrained(cls, name, **kwargs):
        cls.calls.append(name)
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {name}.")


@pytest.fixture
def no_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(_NoHub, "calls", [])
    monkeypatch.setattr(auto, "AutoConfig", _NoHub)
    return _NoHub


def test_relative_path_below_a_local_folder_is_reported_without_asking_the_hub(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpts").mkdir()
    for loader in (P.load_vision_tower, P.load_text_tower):
        start = time.perf_counter()
        with pytest.raises(P.TowerUnavailableError, match="no such folder") as info:
            loader("ckpts/bert")
        assert time.perf_counter() - start < 5
        assert "'ckpts' is a folder in the working directory" in str(info.value)
        # more parts than a hub id's namespace/name can only be a local path
        with pytest.raises(P.TowerUnavailableError, match="no such folder"):
            loader("runs/seed1/bert")
    assert no_hub.calls == []


def test_hub_id_still_goes_to_the_hub_and_the_error_suggests_offline_mode(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)  # no 'google' folder here
    for loader in (P.load_vision_tower, P.load_text_tower):
        with pytest.raises(P.TowerUnavailableError) as info:
            loader("google/vit-base-patch16-224")
        message = str(info.value)
        assert "HF_HUB_OFFLINE=1" in message and "not a local folder" in message
    assert no_hub.calls == ["google/vit-base-patch16-224"] * 2


def _tiny_vision_folder(folder):
    from transformers import MobileNetV2Config, MobileNetV2ImageProcessorPil, MobileNetV2Model

    MobileNetV2Model(MobileNetV2Config(depth_multiplier=0.35, image_size=32)).save_pretrained(folder)
    MobileNetV2ImageProcessorPil().save_pretrained(folder)
    return folder


def _tiny_text_folder(folder):
    from transformers import BertConfig, BertModel

    _, tokenizer = P.load_minilm()
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=tokenizer.vocab_size)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_local_folders_that_lack_a_file_name_it(tmp_path):
    vision = _tiny_vision_folder(tmp_path / "vision")
    model, _ = P.load_vision_tower(str(vision))  # complete: loads
    assert type(model).__name__ == "MobileNetV2Model"
    (vision / "preprocessor_config.json").unlink()
    with pytest.raises(P.TowerUnavailableError) as info:
        P.load_vision_tower(str(vision))
    message = str(info.value)
    assert "no preprocessor_config.json" in message and "image_processor.save_pretrained" in message
    assert "not a local folder" not in message and "Hub" not in message

    (tmp_path / "empty").mkdir()
    with pytest.raises(P.TowerUnavailableError, match=r"no config\.json"):
        P.load_vision_tower(str(tmp_path / "empty"))


@pytest.mark.slow
def test_a_local_text_folder_without_tokenizer_files_is_refused(tmp_path):
    text = _tiny_text_folder(tmp_path / "text")
    model, tokenizer = P.load_text_tower(str(text))
    assert len(tokenizer) == tokenizer.vocab_size == model.config.vocab_size
    for name in auto._TOKENIZER_FILES:
        (text / name).unlink(missing_ok=True)
    # transformers alone would build a 5-token tokenizer that maps every word to [UNK]
    with pytest.raises(P.TowerUnavailableError) as info:
        P.load_text_tower(str(text))
    message = str(info.value)
    assert "no tokenizer files" in message and "tokenizer.save_pretrained" in message
    assert "not a local folder" not in message


def test_a_local_folder_without_weights_is_not_blamed_on_the_hub(tmp_path):
    vision = _tiny_vision_folder(tmp_path / "vision")
    (vision / "model.safetensors").unlink()
    with pytest.raises(P.TowerUnavailableError) as info:
        P.load_vision_tower(str(vision))
    message = str(info.value)
    assert "model weights" in message and str(vision) in message
    assert "not a local folder" not in message
