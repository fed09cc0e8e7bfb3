"""Tests for peft_m2ist/pretrained/mobilenet_v2.py: torchvision's MobileNetV2 converted to transformers, and the
cut after the stride-16 stage."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_m2ist import pretrained as P
from peft_m2ist.pretrained import mobilenet_v2

# torchvision's ImageNet-1k class indices (no background class).
TABBY, TIGER_CAT, EGYPTIAN_CAT = 281, 282, 285
ESPRESSO, CUP = 967, 968


# --------------------------------------------------------------------------------------------------
# fast tests: no real weights
# --------------------------------------------------------------------------------------------------


def test_key_mapping_covers_every_block_kind():
    m = mobilenet_v2._mobilenet_v2_key
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

    full = MobileNetV2ForImageClassification(mobilenet_v2._mobilenet_v2_config()).eval()
    renamed = P.convert_mobilenet_v2_state_dict(sd, full)
    assert set(renamed) == set(full.state_dict())
    backbone = MobileNetV2Model(mobilenet_v2._mobilenet_v2_config()).eval()
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
        P.convert_mobilenet_v2_state_dict(broken, MobileNetV2ForImageClassification(mobilenet_v2._mobilenet_v2_config()))


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
