"""DETR checkpoints whose backbone is stored in timm's ResNet layout, loaded without timm.

`facebook/detr-resnet-50` (and -101) store their backbone as a timm ResNet (`backbone.conv_encoder.model.conv1`,
`...layer1.0.downsample.0`, ...) and their config asks transformers to build it with timm (`use_timm_backbone`, a
`timm_backbone` backbone config). Without timm installed, :func:`timm_free_detr` rewrites the config to transformers'
own ResNet backbone of the same architecture and maps the timm keys onto it while the weights load
(`from_pretrained(key_mapping=...)`): the same network (same convolutions and strides, frozen batch norms with the
same statistics), the same weights. With timm installed nothing changes: transformers builds the timm backbone itself.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from .errors import TowerUnavailableError

# timm ResNet name -> (transformers ResNet layer type, blocks per stage, output channels per stage)
TIMM_RESNETS: dict[str, tuple[str, list[int], list[int]]] = {
    "resnet18": ("basic", [2, 2, 2, 2], [64, 128, 256, 512]),
    "resnet34": ("basic", [3, 4, 6, 3], [64, 128, 256, 512]),
    "resnet50": ("bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048]),
    "resnet101": ("bottleneck", [3, 4, 23, 3], [256, 512, 1024, 2048]),
    "resnet152": ("bottleneck", [3, 8, 36, 3], [256, 512, 1024, 2048]),
}
# model types whose backbone is DETR's `DetrConvEncoder` (timm or transformers' backbone, frozen batch norms)
DETR_MODEL_TYPES = ("detr",)
TIMM_HINT = "install the optional `timm` package (`pip install timm`)"


def timm_available() -> bool:
    return importlib.util.find_spec("timm") is not None


def timm_key_mapping(layer_type: str) -> dict[str, str]:
    """Regex -> replacement for every timm ResNet key under a DETR backbone (with or without the `conv_encoder` of
    older checkpoints), onto transformers' `ResNetBackbone` keys (`embedder`, `encoder.stages.S.layers.B`)."""
    prefix = r"backbone\.(?:conv_encoder\.)?model\."
    target = "backbone.model."
    convs = 3 if layer_type == "bottleneck" else 2
    mapping = {
        prefix + r"conv1\.": target + "embedder.embedder.convolution.",
        prefix + r"bn1\.": target + "embedder.embedder.normalization.",
    }
    for stage in range(4):
        block = f"{prefix}layer{stage + 1}\\.(\\d+)\\."
        new_block = f"{target}encoder.stages.{stage}.layers.\\1."
        for k in range(convs):
            mapping[f"{block}conv{k + 1}\\."] = f"{new_block}layer.{k}.convolution."
            mapping[f"{block}bn{k + 1}\\."] = f"{new_block}layer.{k}.normalization."
        mapping[f"{block}downsample\\.0\\."] = f"{new_block}shortcut.convolution."
        mapping[f"{block}downsample\\.1\\."] = f"{new_block}shortcut.normalization."
    return mapping


def uses_timm_backbone(config: Any) -> bool:
    backbone = getattr(config, "backbone_config", None)
    return getattr(backbone, "model_type", None) == "timm_backbone"


def timm_free_detr(config: Any, name_or_path: str) -> tuple[Any, dict[str, str]] | None:
    """For a DETR config with a timm ResNet backbone while timm is missing: `(config with transformers' ResNet
    backbone, key_mapping for from_pretrained)`. `None` when nothing needs changing (timm is installed, or the
    backbone is not timm's). Raises :class:`.TowerUnavailableError` naming the optional extra where the timm backbone
    has no transformers equivalent here."""
    if not uses_timm_backbone(config) or timm_available():
        return None
    backbone = config.backbone_config
    name = str(getattr(backbone, "backbone", "") or "")
    arch = name.split(".")[0]  # timm's pretrained tags: "resnet50.a1_in1k"
    what = f"the vision tower {name_or_path!r} stores its backbone as timm's {name!r}"
    if getattr(config, "model_type", None) not in DETR_MODEL_TYPES or arch not in TIMM_RESNETS:
        raise TowerUnavailableError(
            f"{what}, and timm is not installed: {TIMM_HINT}. (Without timm, peft-m2ist maps only the ResNets "
            f"{', '.join(TIMM_RESNETS)} of DETR checkpoints onto transformers' ResNet.)"
        )
    if getattr(config, "dilation", False) or getattr(backbone, "output_stride", None) not in (None, 32):
        raise TowerUnavailableError(
            f"{what} with a dilated last stage (DC5), which transformers' ResNet backbone does not build; {TIMM_HINT}."
        )
    from transformers import ResNetConfig

    layer_type, depths, hidden_sizes = TIMM_RESNETS[arch]
    out_indices = list(getattr(backbone, "out_indices", None) or [4])
    config.backbone_config = ResNetConfig(
        num_channels=getattr(backbone, "num_channels", 3), embedding_size=64, hidden_sizes=hidden_sizes,
        depths=depths, layer_type=layer_type, out_features=[f"stage{i}" for i in out_indices],
    )
    for attr in ("use_timm_backbone", "backbone", "use_pretrained_backbone"):
        if hasattr(config, attr):
            setattr(config, attr, False if attr != "backbone" else None)
    return config, timm_key_mapping(layer_type)
