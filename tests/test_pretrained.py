"""Tests for peft_m2ist.pretrained: offline towers, the MobileNetV2 conversion, and hub fallbacks."""

from __future__ import annotations

import json
import time

import huggingface_hub.constants
import pytest
import torch
from torch import nn

from peft_m2ist import pretrained as P

# torchvision's ImageNet-1k class indices (no background class).
TABBY, TIGER_CAT, EGYPTIAN_CAT = 281, 282, 285
ESPRESSO, CUP = 967, 968


# --------------------------------------------------------------------------------------------------
# fast tests: no real weights
# --------------------------------------------------------------------------------------------------


def test_default_names_are_exported_and_offline():
    assert P.DEFAULT_VISION_TOWER in P.OFFLINE_VISION_TOWERS
    assert P.DEFAULT_TEXT_TOWER in P.OFFLINE_TEXT_TOWERS
    assert P.DEFAULT_VISION_TOWER.startswith("offline:")
    assert P.DEFAULT_TEXT_TOWER.startswith("offline:")


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(P.CACHE_ENV, str(tmp_path / "c"))
    assert P.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(P.CACHE_ENV)
    assert P.default_cache_dir().parts[-2:] == (".cache", "peft_m2ist")


def test_key_mapping_covers_every_block_kind():
    m = P._mobilenet_v2_key
    assert m("features.0.0.weight") == "mobilenet_v2.conv_stem.first_conv.convolution.weight"
    assert m("features.0.1.running_var") == "mobilenet_v2.conv_stem.first_conv.normalization.running_var"
    assert m("features.1.conv.0.0.weight") == "mobilenet_v2.conv_stem.conv_3x3.convolution.weight"
    assert m("features.1.conv.1.weight") == "mobilenet_v2.conv_stem.reduce_1x1.convolution.weight"
    assert m("features.1.conv.2.bias") == "mobilenet_v2.conv_stem.reduce_1x1.normalization.bias"
    assert m("features.2.conv.0.1.weight") == "mobilenet_v2.layer.0.expand_1x1.normalization.weight"
    assert m("features.17.conv.1.0.weight") == "mobilenet_v2.layer.15.conv_3x3.convolution.weight"
    assert m("features.17.conv.3.num_batches_tracked") == (
        "mobilenet_v2.layer.15.reduce_1x1.normalization.num_batches_tracked"
    )
    assert m("features.18.0.weight") == "mobilenet_v2.conv_1x1.convolution.weight"
    assert m("classifier.1.bias") == "classifier.bias"
    for bad in ("features.2.conv.4.weight", "classifier.0.weight", "head.weight"):
        with pytest.raises(KeyError):
            m(bad)


def test_unknown_offline_name_is_rejected():
    with pytest.raises(ValueError, match=r"offline:minilm-l6"):
        P.load_text_tower("offline:bert-huge")
    with pytest.raises(ValueError, match=r"offline:mobilenet_v2"):
        P.load_vision_tower("offline:resnet")


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


class _TorchvisionLayoutMobileNetV2(nn.Module):
    """An independent MobileNetV2 in torchvision's module layout, written here as a reference."""

    _SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    class _Block(nn.Module):
        def __init__(self, cin, cout, stride, t):
            super().__init__()
            hidden = cin * t
            layers = []
            if t != 1:
                layers.append(_conv_bn_relu6(cin, hidden, 1))
            layers += [
                _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                nn.Conv2d(hidden, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            ]
            self.conv = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    def __init__(self):
        super().__init__()
        features = [_conv_bn_relu6(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in self._SETTINGS:
            for i in range(n):
                features.append(self._Block(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(_conv_bn_relu6(cin, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

    def forward(self, x):
        feats = self.features(x)
        return feats, self.classifier(feats.mean(dim=(2, 3)))


def _conv_bn_relu6(cin, cout, k, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(),
    )


@pytest.fixture(scope="module")
def mobilenet_folder(tmp_path_factory):
    return P.mobilenet_v2_imagenet_path(tmp_path_factory.mktemp("m2ist_cache"))


@pytest.fixture(scope="module")
def torchvision_state_dict():
    return torch.load(P.mobilenet_v2_weights_file(), map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_conversion_is_strict_and_matches_torchvision_layout(torchvision_state_dict):
    from transformers import MobileNetV2ForImageClassification, MobileNetV2Model

    sd = torchvision_state_dict
    assert len(sd) == 314 and sum(not k.startswith("classifier.") for k in sd) == 312

    reference = _TorchvisionLayoutMobileNetV2().eval()
    reference.load_state_dict(sd, strict=True)

    full = MobileNetV2ForImageClassification(P._mobilenet_v2_config()).eval()
    renamed = P.convert_mobilenet_v2_state_dict(sd, full)
    assert set(renamed) == set(full.state_dict())
    backbone = MobileNetV2Model(P._mobilenet_v2_config()).eval()
    assert len(P.convert_mobilenet_v2_state_dict(sd, backbone)) == 312

    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_feats, ref_logits = reference(x)
        out = full(pixel_values=x, output_hidden_states=False)
        feats = backbone(pixel_values=x).last_hidden_state
    assert feats.shape == (2, 1280, 3, 4)
    torch.testing.assert_close(feats, ref_feats, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits, ref_logits, rtol=0, atol=1e-4)

    # A wrong key set must not load silently.
    broken = dict(sd)
    broken.pop("features.5.conv.1.0.weight")
    with pytest.raises(RuntimeError, match="missing"):
        P.convert_mobilenet_v2_state_dict(broken, MobileNetV2ForImageClassification(P._mobilenet_v2_config()))


@pytest.mark.slow
def test_cached_folder_is_a_normal_hf_checkpoint(mobilenet_folder):
    from transformers import AutoImageProcessor, AutoModelForImageClassification, MobileNetV2Model

    names = {p.name for p in mobilenet_folder.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= names
    record = json.loads((mobilenet_folder / "peft_m2ist_conversion.json").read_text())
    assert record["source_sha256"].startswith("b0353104")
    config = json.loads((mobilenet_folder / "config.json").read_text())
    assert config["tf_padding"] is False and config["layer_norm_eps"] == 1e-5
    assert len(config["id2label"]) == 1000

    processor = AutoImageProcessor.from_pretrained(mobilenet_folder)
    assert list(processor.image_mean) == pytest.approx(P.IMAGENET_MEAN)
    assert list(processor.image_std) == pytest.approx(P.IMAGENET_STD)

    ours = P.load_mobilenet_v2_imagenet(cache_dir=mobilenet_folder.parent)
    plain = MobileNetV2Model.from_pretrained(mobilenet_folder).eval()
    auto = AutoModelForImageClassification.from_pretrained(mobilenet_folder).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(pixel_values=x).last_hidden_state
        b = plain(pixel_values=x).last_hidden_state
        logits = auto(pixel_values=x).logits
    assert torch.equal(a, b)
    assert logits.shape == (1, 1000)

    # A second call reuses the folder instead of converting again.
    mtime = (mobilenet_folder / "model.safetensors").stat().st_mtime_ns
    assert P.mobilenet_v2_imagenet_path(mobilenet_folder.parent) == mobilenet_folder
    assert (mobilenet_folder / "model.safetensors").stat().st_mtime_ns == mtime


def _top5(model, processor, image):
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224)
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits[0]
    return logits.topk(5).indices.tolist()


@pytest.mark.slow
def test_converted_classifier_recognises_real_photos(mobilenet_folder):
    from skimage import data
    from transformers import AutoImageProcessor

    model = P.load_mobilenet_v2_imagenet(with_classifier=True, cache_dir=mobilenet_folder.parent)
    processor = AutoImageProcessor.from_pretrained(mobilenet_folder)

    cat = _top5(model, processor, data.chelsea())
    assert cat[0] in {TABBY, TIGER_CAT, EGYPTIAN_CAT}
    assert {TABBY, TIGER_CAT, EGYPTIAN_CAT} <= set(cat)

    coffee = _top5(model, processor, data.coffee())
    assert coffee[0] in {ESPRESSO, CUP}
    assert {ESPRESSO, CUP} <= set(coffee)


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


def test_truncation_keeps_the_first_blocks_and_checks_its_argument():
    from transformers import MobileNetV2Config, MobileNetV2Model

    model = MobileNetV2Model(MobileNetV2Config(depth_multiplier=0.35, image_size=64)).eval()
    with torch.no_grad():
        expected = model(pixel_values=torch.ones(1, 3, 64, 64), output_hidden_states=True).hidden_states[4]
    P.truncate_mobilenet_v2(model, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=torch.ones(1, 3, 64, 64)).last_hidden_state, expected)
    with pytest.raises(ValueError, match="num_blocks"):
        P.truncate_mobilenet_v2(model, 0)


@pytest.mark.slow
def test_local_folder_goes_through_auto_classes(mobilenet_folder):
    from transformers import MobileNetV2Model

    # A *ForImageClassification checkpoint gives its base model.
    model, processor = P.load_vision_tower(str(mobilenet_folder))
    assert type(model) is MobileNetV2Model
    assert list(processor.image_mean) == pytest.approx(P.IMAGENET_MEAN)


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
# names recorded for the offline towers; local paths and folders
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
    assert "Towers (frozen): offline:mobilenet_v2-stride16, offline:minilm-l6" in card
    assert "base_model:" in card and "- offline:mobilenet_v2-stride16" in card
    for machine_local in (str(tmp_path / "cache"), str(P.minilm_path()), P._MOBILENET_FOLDER):
        assert machine_local not in card and machine_local not in json.dumps(saved)


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
    monkeypatch.setattr(P, "AutoConfig", _NoHub)
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
    for name in P._TOKENIZER_FILES:
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
