"""Crash-safe writes: a JSON file or a folder is replaced whole, or not at all.

Each writer puts the new version next to the old one first and then renames it over it (a rename within one
folder is atomic), so a process killed at any moment leaves the old version or the new one, never a half-written
one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_json(path: str | os.PathLike, data: Any, *, default: Callable[[Any], Any] | None = None) -> None:
    """Write `data` as indented JSON to `path` atomically: a temporary sibling, flushed to disk, then `os.replace`d.

    `default` is `json.dump`'s (None: an object JSON cannot hold raises `TypeError`, and `path` keeps its old
    content). The parent folder is created if needed; the temporary file is removed when writing fails.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # one per process; the file mode follows the umask
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, default=default)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: str | os.PathLike, hint: str = "") -> Any:
    """The JSON value in `path`; a file that is not valid JSON raises a `ValueError` naming it (then `hint`)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the file is damaged{hint}") from error


def fresh_tmp_dir(folder: str | os.PathLike) -> Path:
    """`folder`'s temporary sibling `<name>.tmp`, emptied of what an interrupted write left there (not created)."""
    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def replace_dir(tmp: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Move the complete folder `tmp` to `folder`, replacing what is there.

    The old folder is first renamed to `<name>.old`, then `tmp` to `folder`, then `<name>.old` deleted: each step
    is one rename, so `folder` is always absent, the old folder or the new one, never half written.
    """
    tmp, folder = Path(tmp), Path(folder)
    old = folder.with_name(f"{folder.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)
