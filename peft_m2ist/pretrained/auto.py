"""Towers from any Hugging Face Hub id or local folder, through the ``Auto*`` classes of transformers.

:func:`_load_tower` gives ``(model, image processor)`` or ``(model, tokenizer)``: a dual-encoder checkpoint (CLIP,
SigLIP, ...) gives its vision or text sub-model, anything else goes to ``AutoModel``. Extra keyword arguments (e.g.
``dtype``, ``revision``) go to ``from_pretrained``. Offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``) is
read at call time. Names that can only be local paths, and local folders that lack a file, are reported at once,
naming what is missing, instead of after the Hub's retries; failures are :class:`.TowerUnavailableError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import huggingface_hub.constants
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

from .errors import TowerUnavailableError
from .offline import DEFAULT_TEXT_TOWER, DEFAULT_VISION_TOWER, OFFLINE_TEXT_TOWERS, OFFLINE_VISION_TOWERS
from .timm_resnet import timm_free_detr

# Files that hold a tokenizer in a folder saved with save_pretrained(); any one of them will do.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
# Files that hold an image processor in such a folder.
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")

# Dual-encoder checkpoints: (vision sub-model class, text sub-model class), by config.model_type.
_DUAL_ENCODER_TOWERS = {
    "clip": ("CLIPVisionModel", "CLIPTextModel"),
    "siglip": ("SiglipVisionModel", "SiglipTextModel"),
    "siglip2": ("Siglip2VisionModel", "Siglip2TextModel"),
    "chinese_clip": ("ChineseCLIPVisionModel", "ChineseCLIPTextModel"),
    "clipseg": ("CLIPSegVisionModel", "CLIPSegTextModel"),
    "owlvit": ("OwlViTVisionModel", "OwlViTTextModel"),
    "owlv2": ("Owlv2VisionModel", "Owlv2TextModel"),
}


def _env_offline() -> bool:
    """Offline mode as requested by the environment *now* (huggingface_hub reads it only at import)."""
    return any(
        os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_offline() -> bool:
    """Whether hub downloads are switched off, by the environment now or by huggingface_hub at import."""
    return _env_offline() or huggingface_hub.is_offline_mode()


def _default_for(kind: str) -> str:
    """The offline default tower of ``kind`` (``"vision"`` or ``"text"``), which error messages suggest."""
    return DEFAULT_VISION_TOWER if kind == "vision" else DEFAULT_TEXT_TOWER


def _unavailable(kind: str, name_or_path: str, err: BaseException) -> TowerUnavailableError:
    """The error for a hub id that could not be loaded: why (offline mode or no Hub), and the alternatives."""
    if _hub_offline():
        hub = (
            "the Hugging Face Hub is switched off (offline mode: HF_HUB_OFFLINE=1) and the checkpoint is not in "
            "the HF cache"
        )
    else:
        hub = (
            "the Hugging Face Hub could not be reached or has no such checkpoint (without network, set "
            "HF_HUB_OFFLINE=1 so that hub ids fail at once instead of after about 20 s of retries)"
        )
    return TowerUnavailableError(
        f"could not load the {kind} tower {name_or_path!r}: it is not a local folder, and {hub}. "
        f"Either pass a local folder saved with save_pretrained() (model config, weights, and "
        f"{'preprocessor_config.json' if kind == 'vision' else 'tokenizer files'}), pre-download the "
        f"checkpoint into the HF cache on a machine with internet, or use the offline default "
        f"{_default_for(kind)!r} (offline towers: {', '.join(OFFLINE_VISION_TOWERS + OFFLINE_TEXT_TOWERS)}). "
        f"Original error: {type(err).__name__}: {err}"
    )


def _hub_kwargs(name_or_path: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus ``local_files_only=True`` for a hub id while the environment asks for offline mode now."""
    kwargs = dict(kwargs)
    if not Path(name_or_path).expanduser().is_dir() and _env_offline():
        kwargs.setdefault("local_files_only", True)
    return kwargs


def _missing_local_folder(kind: str, name_or_path: str) -> TowerUnavailableError | None:
    """The error for a name that can only be a local path, yet no such folder exists; ``None`` for a folder or a
    name that may be a hub id.

    A local path is a name that starts with ``/``, ``.`` or ``~``, has more parts than a hub id's
    ``namespace/name``, or whose first part is a folder in the working directory (``ckpts/bert`` with a ``ckpts``
    folder here). Reporting these at once saves the ~20 s that huggingface_hub spends retrying without network.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return None
    parts = Path(name_or_path).parts
    if name_or_path.startswith(("/", ".", "~")) or len(parts) > 2:
        why, hub_hint = "looks like a local path,", "a hub id"
    elif len(parts) == 2 and Path(parts[0]).is_dir():
        why = f"is taken as a local path, as {parts[0]!r} is a folder in the working directory {os.getcwd()!r},"
        hub_hint = "a hub id (for the hub id of that very name, run from another directory)"
    else:
        return None
    missing = path  # the outermost part that does not exist
    for parent in path.parents:
        if parent.is_dir():
            break
        missing = parent
    return TowerUnavailableError(
        f"the {kind} tower {name_or_path!r} {why} but no such folder exists ({str(missing)!r} is missing); "
        f"pass a folder saved with save_pretrained(), {hub_hint}, or the offline default {_default_for(kind)!r}"
    )


def _check_local_folder(kind: str, folder: Path, name_or_path: str) -> None:
    """Name the file a local tower folder lacks, before transformers fails with a hub-flavoured message (or, for a
    tokenizer, silently builds one that maps every word to [UNK])."""
    if not (folder / "config.json").is_file():
        raise TowerUnavailableError(
            f"the local folder {name_or_path!r} has no config.json, so it holds no checkpoint saved with "
            "save_pretrained(); save the model into it with `model.save_pretrained(folder)`"
        )
    if kind == "vision" and not any((folder / f).is_file() for f in _IMAGE_PROCESSOR_FILES):
        raise TowerUnavailableError(
            f"the local folder {name_or_path!r} has config.json but no preprocessor_config.json, so the vision "
            "tower has no image processor; save one into it with `image_processor.save_pretrained(folder)` "
            "(e.g. the AutoImageProcessor of the checkpoint the model came from)"
        )
    if kind == "text" and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise TowerUnavailableError(
            f"the local folder {name_or_path!r} has config.json but no tokenizer files (none of "
            f"{', '.join(_TOKENIZER_FILES)}); save the tokenizer into it with `tokenizer.save_pretrained(folder)` "
            "(without them transformers builds a tokenizer that maps every word to [UNK])"
        )


def _load_tower(kind: str, name_or_path: str, model_kwargs: dict[str, Any]):
    """Load the ``kind`` (``"vision"`` or ``"text"``) tower ``name_or_path``, a hub id or a local folder.

    Returns ``(model in eval mode, image processor or tokenizer)``. ``model_kwargs`` go to the model's
    ``from_pretrained``; of them, ``local_files_only``, ``revision``, ``token`` and ``cache_dir`` also go to the
    config's and the processor's. Raises :class:`.TowerUnavailableError` when anything fails to load.
    """
    import transformers

    missing = _missing_local_folder(kind, name_or_path)
    if missing is not None:
        raise missing
    path = Path(name_or_path).expanduser()
    local = path.is_dir()
    if local and "subfolder" not in model_kwargs:
        _check_local_folder(kind, path, name_or_path)
    model_kwargs = _hub_kwargs(name_or_path, model_kwargs)
    hub_only = {
        k: model_kwargs[k]
        for k in ("local_files_only", "revision", "token", "cache_dir")
        if k in model_kwargs
    }
    step = "config"
    try:
        config = AutoConfig.from_pretrained(name_or_path, **hub_only)
        sub_models = _DUAL_ENCODER_TOWERS.get(getattr(config, "model_type", ""))
        cls_name = sub_models and sub_models[0 if kind == "vision" else 1]
        cls = getattr(transformers, cls_name, None) if cls_name else None
        step = "model weights"
        if kind == "vision" and cls is None:
            timm_free = timm_free_detr(config, name_or_path)
            if timm_free is not None:  # a timm ResNet in a DETR checkpoint, and no timm: transformers' ResNet
                config, key_mapping = timm_free
                model_kwargs = {"config": config, "key_mapping": key_mapping, **model_kwargs}
        if cls is not None:
            model = cls.from_pretrained(name_or_path, **model_kwargs)
        else:
            model = AutoModel.from_pretrained(name_or_path, **model_kwargs)
        step = "image processor" if kind == "vision" else "tokenizer"
        if kind == "vision":
            processor = AutoImageProcessor.from_pretrained(name_or_path, **hub_only)
        else:
            processor = AutoTokenizer.from_pretrained(name_or_path, **hub_only)
    except TowerUnavailableError:
        raise
    except OSError as err:  # transformers turns hub/network/missing-file failures into OSError
        if local:
            raise TowerUnavailableError(
                f"could not load the {step} of the {kind} tower from the local folder {name_or_path!r}: "
                f"{type(err).__name__}: {err}. Check that the folder was written by save_pretrained() of the "
                "model and of its " + ("image processor" if kind == "vision" else "tokenizer")
            ) from err
        raise _unavailable(kind, name_or_path, err) from err
    return model.eval(), processor
