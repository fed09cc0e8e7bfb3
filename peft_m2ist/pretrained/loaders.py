"""The two public entry points, :func:`load_vision_tower` and :func:`load_text_tower`.

An ``offline:*`` name (:mod:`.offline`) loads the offline tower it names; any other name, a hub id or a local folder,
goes to :mod:`.auto`. :data:`TOWER_DTYPES` lists the dtypes the returned towers may be kept in.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoImageProcessor

from .auto import _load_tower
from .cache import load_mobilenet_v2_imagenet, mobilenet_v2_imagenet_path
from .mobilenet_v2 import truncate_mobilenet_v2
from .offline import (
    DEFAULT_TEXT_TOWER,
    DEFAULT_VISION_TOWER,
    MOBILENET_V2_STRIDE16_TOWER,
    OFFLINE_TEXT_TOWERS,
    OFFLINE_VISION_TOWERS,
    _check_offline_name,
    load_minilm,
)

__all__ = ["TOWER_DTYPES", "load_text_tower", "load_vision_tower"]

# dtypes the frozen towers can be kept in (the adapter stays float32): the scripts' `--tower_dtype` choices
TOWER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_vision_tower(name_or_path: str = DEFAULT_VISION_TOWER, **model_kwargs: Any):
    """Load a frozen-to-be vision tower and its image processor: ``(model, image_processor)``.

    * :data:`DEFAULT_VISION_TOWER` (``"offline:mobilenet_v2"``): the converted ImageNet MobileNetV2 backbone
      (``MobileNetV2Model``, 1280 channels at stride 32); ``model_kwargs`` may hold ``cache_dir`` for the
      converted folder.
    * :data:`MOBILENET_V2_STRIDE16_TOWER` (``"offline:mobilenet_v2-stride16"``): the same backbone cut after its
      stride-16 stage by :func:`truncate_mobilenet_v2` (96 channels at stride 16).
    * a dual-encoder checkpoint (CLIP, SigLIP, ...): its vision sub-model, e.g. ``CLIPVisionModel``;
    * anything else: ``AutoModel.from_pretrained`` (a ``*ForImageClassification`` checkpoint gives its
      base model) and ``AutoImageProcessor.from_pretrained``.

    The offline towers' ``config._name_or_path`` is set to the offline name, so that saved adapters and model
    cards record it (not the local cache folder). A hub id that cannot be reached, a local path that does not
    exist, or a local folder without ``preprocessor_config.json`` raises :class:`TowerUnavailableError` naming
    the problem and the alternatives. The model is returned in eval mode; freezing it is the caller's business.
    """
    _check_offline_name("vision", name_or_path, OFFLINE_VISION_TOWERS)
    if name_or_path in OFFLINE_VISION_TOWERS:
        cache_dir = model_kwargs.pop("cache_dir", None)
        if model_kwargs:
            raise TypeError(f"{name_or_path!r} takes only cache_dir, got {sorted(model_kwargs)}")
        folder = mobilenet_v2_imagenet_path(cache_dir)
        model = load_mobilenet_v2_imagenet(with_classifier=False, cache_dir=cache_dir)
        if name_or_path == MOBILENET_V2_STRIDE16_TOWER:
            model = truncate_mobilenet_v2(model)
        # Saved adapters record the tower by this name (adapter_config.json's base_model_name_or_path, the model
        # card): the offline name, which loads the same tower anywhere and tells the stride-16 cut from the full
        # network, not the machine-local cache folder.
        model.config._name_or_path = name_or_path
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        return model, processor
    return _load_tower("vision", name_or_path, model_kwargs)


def load_text_tower(name_or_path: str = DEFAULT_TEXT_TOWER, **model_kwargs: Any):
    """Load a frozen-to-be text tower and its tokenizer: ``(model, tokenizer)``.

    * :data:`DEFAULT_TEXT_TOWER` (``"offline:minilm-l6"``): all-MiniLM-L6-v2 (``BertModel``, hidden 384);
    * a dual-encoder checkpoint (CLIP, SigLIP, ...): its text sub-model, e.g. ``CLIPTextModel``;
    * anything else: ``AutoModel.from_pretrained`` and ``AutoTokenizer.from_pretrained``.

    The offline tower's ``config._name_or_path`` is ``"offline:minilm-l6"``. A hub id that cannot be reached, a
    local path that does not exist, or a local folder without tokenizer files raises
    :class:`TowerUnavailableError` naming the problem and the alternatives.
    """
    _check_offline_name("text", name_or_path, OFFLINE_TEXT_TOWERS)
    if name_or_path == DEFAULT_TEXT_TOWER:
        model, tokenizer = load_minilm(**model_kwargs)
        model.config._name_or_path = name_or_path  # the offline name, not the package's folder; see load_vision_tower
        return model, tokenizer
    return _load_tower("text", name_or_path, model_kwargs)
