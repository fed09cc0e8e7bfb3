"""Loading the pickle-based annotation files without running code from them.

A pickle can name any importable callable (``os.system``, ``builtins.exec`` ...) and have it
called on load. The REC annotation pickles only hold plain containers, so:

- ``load_refs_pickle`` (refer API ``refs(*).p``) uses ``RestrictedUnpickler``, whose
  ``find_class`` refuses every global except a few harmless builtin containers.
- ``load_pth_list`` (TransVG ``*.pth`` split files) uses ``torch.load(..., weights_only=True)``,
  torch's own allow-list unpickler, which accepts lists/tuples/dicts of str/int/float.

Both raise ``UnsafePickleError`` (a ``ValueError`` naming the file and the refused global)
before anything the file names is called. A file that cannot be read at all (empty, truncated,
not a pickle) raises ``CorruptFileError`` (a ``ValueError`` naming the file).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
import zipfile
from typing import Any

import torch
from torch.serialization import MAGIC_NUMBER as _TORCH_LEGACY_MAGIC

SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("builtins", "set"), ("builtins", "frozenset"), ("builtins", "list"), ("builtins", "dict"),
     ("builtins", "tuple")}
)
"""(module, name) pairs a refs pickle may reference: builtin containers only."""

_PY2_MODULES = {"__builtin__": "builtins"}


class UnsafePickleError(ValueError):
    """The file references a global outside the allow-list."""


class CorruptFileError(ValueError):
    """An annotation file that cannot be parsed at all: empty, truncated or otherwise corrupt."""


def corrupt_file_error(path: str | os.PathLike, what: str, detail: object) -> CorruptFileError:
    """A ``CorruptFileError`` naming ``path``, saying what could not read it and what to do."""
    return CorruptFileError(
        f"{path}: {what} ({detail}); the file seems truncated or corrupt: download or regenerate it"
    )


_READ_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                struct.error, UnicodeDecodeError)
"""What unpickling a truncated or garbled file raises (besides ``UnsafePickleError``)."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves no global outside ``SAFE_GLOBALS``.

    Python 2 pickles (the original refer API files) are read with ``encoding="latin1"`` by
    default so byte strings survive; pass ``encoding="utf-8"`` if the file stores UTF-8 bytes.
    """

    def __init__(self, file, *, source: str = "<pickle>", encoding: str = "latin1") -> None:
        super().__init__(file, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (_PY2_MODULES.get(module, module), name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self.source}: refusing to load global {module}.{name}; annotation pickles may only hold "
            f"lists, dicts, tuples, sets, strings and numbers (the file may be corrupt or malicious)"
        )


def restricted_loads(data: bytes, source: str = "<bytes>", encoding: str = "latin1") -> Any:
    """``pickle.loads`` through ``RestrictedUnpickler``."""
    return RestrictedUnpickler(io.BytesIO(data), source=source, encoding=encoding).load()


def load_refs_pickle(path: str | os.PathLike, encoding: str = "latin1") -> Any:
    """Load a refer API ``refs(*).p`` file safely (see module docstring).

    Raises ``UnsafePickleError`` for a refused global, ``CorruptFileError`` for an unreadable file.
    """
    with open(path, "rb") as file:
        try:
            return RestrictedUnpickler(file, source=str(path), encoding=encoding).load()
        except UnsafePickleError:
            raise
        except _READ_ERRORS as error:
            detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            raise corrupt_file_error(path, "not a readable pickle of plain containers", detail) from error


def _torch_error_detail(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or ["no details"])[0]


def _looks_like_zip(path: str | os.PathLike) -> bool:
    """Whether the file starts like a zip archive (torch's default format), even a truncated one."""
    with open(path, "rb") as file:
        return file.read(4) == b"PK\x03\x04"


def load_pth_list(path: str | os.PathLike) -> Any:
    """Load a TransVG-style ``.pth`` split file without running code from it.

    Tries ``torch.load(weights_only=True)`` (torch's zip format and the legacy format). A file
    that torch cannot read as a torch file (e.g. written with plain ``pickle.dump``) is then read
    with ``RestrictedUnpickler``. Raises ``UnsafePickleError`` if either refuses a global, and
    ``CorruptFileError`` naming the file if it is empty, truncated or otherwise unreadable.
    """
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise corrupt_file_error(path, "the file is empty", "0 bytes")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write; a plain pickle is expected here.
            warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = _torch_error_detail(error)
        if "GLOBAL" in detail or zipfile.is_zipfile(path):
            raise UnsafePickleError(
                f"{path}: refused by torch.load(weights_only=True); the split file holds objects other than "
                f"lists/tuples/dicts of str/int/float (corrupt or malicious?): {detail}"
            ) from error
        torch_error: Exception = error
    except OSError:  # missing file, permissions: the message names the path
        raise
    except Exception as error:  # torch's zip reader (RuntimeError), a truncated legacy file (EOFError, ...)
        if _looks_like_zip(path):
            raise corrupt_file_error(path, "torch.load cannot read this zip-format .pth",
                                     _torch_error_detail(error)) from error
        torch_error = error
    # Not a torch file: a plain pickle, read through the restricted unpickler.
    try:
        value = load_refs_pickle(path)
    except CorruptFileError as error:
        raise corrupt_file_error(
            path, "neither torch.load nor the restricted unpickler can read it",
            f"torch: {type(torch_error).__name__}: {_torch_error_detail(torch_error)}; pickle: {error.__cause__!r}",
        ) from error
    if isinstance(value, int) and value == _TORCH_LEGACY_MAGIC:
        # only the header of a legacy-format torch file could be read
        raise corrupt_file_error(path, "torch.load cannot read this legacy-format .pth",
                                 f"{type(torch_error).__name__}: {_torch_error_detail(torch_error)}")
    return value
