"""Loading the pickle-based annotation files without running code from them.

A pickle can name any importable callable (``os.system``, ``builtins.exec`` ...) and have it
called on load. The REC annotation pickles only hold plain containers, so:

- ``load_refs_pickle`` (refer API ``refs(*).p``) uses ``RestrictedUnpickler``, whose
  ``find_class`` refuses every global except a few harmless builtin containers.
- ``load_pth_list`` (TransVG ``*.pth`` split files) uses ``torch.load(..., weights_only=True)``,
  torch's own allow-list unpickler, which accepts lists/tuples/dicts of str/int/float.

Both raise ``UnsafePickleError`` (a ``ValueError`` naming the file and the refused global)
before anything the file names is called.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile
from typing import Any

import torch

SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("builtins", "set"), ("builtins", "frozenset"), ("builtins", "list"), ("builtins", "dict"),
     ("builtins", "tuple")}
)
"""(module, name) pairs a refs pickle may reference: builtin containers only."""

_PY2_MODULES = {"__builtin__": "builtins"}


class UnsafePickleError(ValueError):
    """The file references a global outside the allow-list (or is not a loadable pickle)."""


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
    """Load a refer API ``refs(*).p`` file safely (see module docstring)."""
    with open(path, "rb") as file:
        try:
            return RestrictedUnpickler(file, source=str(path), encoding=encoding).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
            raise UnsafePickleError(f"{path}: not a readable pickle of plain containers ({error})") from error


def _torch_error_detail(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or ["no details"])[0]


def load_pth_list(path: str | os.PathLike) -> Any:
    """Load a TransVG-style ``.pth`` split file without running code from it.

    Tries ``torch.load(weights_only=True)`` (torch's zip format and the legacy format). A file
    that torch cannot read as a torch file (e.g. written with plain ``pickle.dump``) is then read
    with ``RestrictedUnpickler``. Raises ``UnsafePickleError`` if either refuses a global.
    """
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
    # Not a torch file: a plain pickle, read through the restricted unpickler.
    return load_refs_pickle(path)
