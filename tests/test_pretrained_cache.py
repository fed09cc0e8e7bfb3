"""Tests for peft_m2ist/pretrained/cache.py, the converted-MobileNetV2 cache: where it is, the folder it holds, several
processes building it at once, stale staging folders, unwritable caches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from peft_m2ist import pretrained as P
from peft_m2ist.pretrained import cache, mobilenet_v2, offline

MARKER = "written_by_the_other_process"


def _complete_folder(folder: Path) -> None:
    """What another process's finished conversion looks like to `_folder_is_current`, plus a marker file."""
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (folder / name).write_text("{}")
    (folder / cache._CONVERSION_RECORD).write_text(json.dumps({"conversion_version": mobilenet_v2._CONVERSION_VERSION}))
    (folder / MARKER).write_text("")


def _staging_folders(root: Path) -> list[Path]:
    return sorted(root.glob(f".{cache._MOBILENET_FOLDER}-*"))


def _no_conversion() -> Path:
    raise AssertionError("converted again although another process had just finished the folder")


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(P.CACHE_ENV, str(root))
    return root


def test_a_process_waiting_for_the_lock_keeps_the_folder_the_holder_finished(cache_root, monkeypatch):
    """Another process holds the cache lock while it converts; this one finds no folder, waits, then must use the
    other's folder instead of converting again and replacing it under the readers."""
    folder = cache_root / cache._MOBILENET_FOLDER
    cache_root.mkdir()
    holder = textwrap.dedent(f"""
        import json, pathlib, sys, time
        from filelock import FileLock
        root = pathlib.Path(sys.argv[1])
        with FileLock(str(root / ".{cache._MOBILENET_FOLDER}.lock")):
            (root / "holding").write_text("")
            time.sleep(1.5)
            folder = root / {cache._MOBILENET_FOLDER!r}
            staging = root / ".{cache._MOBILENET_FOLDER}-other"
            staging.mkdir()
            for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
                (staging / name).write_text("{{}}")
            (staging / {cache._CONVERSION_RECORD!r}).write_text(json.dumps({{"conversion_version": {mobilenet_v2._CONVERSION_VERSION}}}))
            (staging / {MARKER!r}).write_text("")
            staging.rename(folder)
    """)
    other = subprocess.Popen([sys.executable, "-c", holder, str(cache_root)])
    try:
        deadline = time.monotonic() + 60
        while not (cache_root / "holding").exists():
            assert other.poll() is None, "the lock-holding process ended early"
            assert time.monotonic() < deadline, "the lock-holding process did not start"
            time.sleep(0.05)
        assert not folder.exists()
        monkeypatch.setattr(offline, "mobilenet_v2_weights_file", _no_conversion)
        assert P.mobilenet_v2_imagenet_path() == folder
        assert (folder / MARKER).is_file()
    finally:
        assert other.wait(timeout=60) == 0


@pytest.mark.slow
def test_a_folder_finished_by_another_process_during_the_conversion_is_kept(cache_root, monkeypatch):
    """The other process (one not sharing the lock) moves its complete folder in while this one converts: the
    complete folder is kept, never deleted and replaced, and this process's staging copy is discarded."""
    folder = cache_root / cache._MOBILENET_FOLDER
    real_weights_file = P.mobilenet_v2_weights_file

    def other_process_finishes_now() -> Path:
        _complete_folder(folder)
        return real_weights_file()

    monkeypatch.setattr(offline, "mobilenet_v2_weights_file", other_process_finishes_now)
    assert P.mobilenet_v2_imagenet_path() == folder
    assert (folder / MARKER).is_file()
    assert (folder / "model.safetensors").read_text() == "{}"  # not overwritten by this process's conversion
    assert _staging_folders(cache_root) == []


def test_a_current_folder_is_read_without_writing_to_the_cache(cache_root, monkeypatch):
    # readers of a complete (possibly read-only, shared) cache take no lock and write nothing
    _complete_folder(cache_root / cache._MOBILENET_FOLDER)
    monkeypatch.setattr(offline, "mobilenet_v2_weights_file", _no_conversion)
    before = sorted(p.name for p in cache_root.iterdir())
    assert P.mobilenet_v2_imagenet_path() == cache_root / cache._MOBILENET_FOLDER
    assert sorted(p.name for p in cache_root.iterdir()) == before


@pytest.mark.slow
def test_stale_staging_folders_of_killed_conversions_are_removed(cache_root):
    old = cache_root / f".{cache._MOBILENET_FOLDER}-killed"
    fresh = cache_root / f".{cache._MOBILENET_FOLDER}-running"
    for staging in (old, fresh):
        staging.mkdir(parents=True)
        (staging / "model.safetensors").write_bytes(b"half written")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))

    folder = P.mobilenet_v2_imagenet_path()
    assert cache._folder_is_current(folder)
    assert not old.exists()
    assert fresh.is_dir()  # may belong to a conversion still running elsewhere
    assert _staging_folders(cache_root) == [fresh]


def test_a_cache_below_a_regular_file_names_the_variable_to_set(tmp_path, monkeypatch):
    regular_file = tmp_path / "not_a_folder"
    regular_file.write_text("")
    monkeypatch.setenv(P.CACHE_ENV, str(regular_file / "cache"))
    with pytest.raises(P.TowerUnavailableError) as info:
        P.load_vision_tower(P.DEFAULT_VISION_TOWER)
    message = str(info.value)
    assert "PEFT_M2IST_CACHE" in message and "export" in message
    assert str(regular_file / "cache") in message
    assert isinstance(info.value.__cause__, NotADirectoryError)


@pytest.mark.slow
def test_a_failed_write_into_the_cache_names_the_variable_and_leaves_no_staging_folder(cache_root, monkeypatch):
    class _UnwritableProcessor:
        def save_pretrained(self, folder):
            raise PermissionError(13, "Permission denied", str(Path(folder) / "preprocessor_config.json"))

    monkeypatch.setattr(mobilenet_v2, "_mobilenet_v2_image_processor", _UnwritableProcessor)
    with pytest.raises(P.TowerUnavailableError, match="PEFT_M2IST_CACHE") as info:
        P.mobilenet_v2_imagenet_path()
    assert isinstance(info.value.__cause__, PermissionError)
    assert "cache_dir" in str(info.value)
    assert _staging_folders(cache_root) == []
    assert not (cache_root / cache._MOBILENET_FOLDER).exists()


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(P.CACHE_ENV, str(tmp_path / "c"))
    assert P.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(P.CACHE_ENV)
    assert P.default_cache_dir().parts[-2:] == (".cache", "peft_m2ist")


@pytest.fixture(scope="module")
def mobilenet_folder(tmp_path_factory):
    return P.mobilenet_v2_imagenet_path(tmp_path_factory.mktemp("m2ist_cache"))


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
