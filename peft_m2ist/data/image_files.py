"""Image files of the real-format loaders: each one decoded once at load time, and stored so it decodes right.

A loader must not keep a file that fails later, mid-epoch, with an error that names no file: every image is
decoded in full once while the index is built (``inspect_image``), so a truncated JPEG, a file that is not an
image, or a decompression bomb (a header claiming more pixels than PIL's ``Image.MAX_IMAGE_PIXELS``) is refused or
skipped there, with the file and the record named. ``ImageFiles.prefetch`` decodes a split's files on a thread
pool (PIL releases the GIL while decoding), once per file however many expressions share it.

Boxes are in the STORED pixel frame of the image file: the frame COCO/RefCOCO, ReferItGame and TransVG annotate
in, ignoring any EXIF orientation tag. ``datasets.Image`` decoding would rotate or mirror a tagged image
(``PIL.ImageOps.exif_transpose``), away from its boxes and phrases ("the man on the left"); and it turns 16-bit
greyscale (``I;16``, ``I``) into RGB by clipping at 255, i.e. pure white. So a record whose file carries an
orientation tag other than 1, or has more than 8 bits per sample, holds a lossless RGB PNG copy of the stored
pixels (no tag, 16-bit values scaled to 8 bits) instead of the file path (``ImageFiles.cell``).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, UnidentifiedImageError
from PIL import Image as PILImage

from peft_m2ist.data.records import RecordError, progress

TRANSPOSING_ORIENTATIONS: frozenset[int] = frozenset(range(2, 9))
"""EXIF orientation values for which ``PIL.ImageOps.exif_transpose`` (and so ``datasets.Image``) moves pixels."""
HIGH_BIT_DEPTH_MODES: frozenset[str] = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
"""PIL modes that ``Image.convert("RGB")`` clips at 255 instead of scaling (16-bit PNGs decode to ``I;16``/``I``)."""
IMAGE_ERRORS: tuple[type[Exception], ...] = (UnidentifiedImageError, OSError, PILImage.DecompressionBombError)
"""What opening or decoding a bad image file raises (``DecompressionBombError`` is not an ``OSError``)."""


@dataclass(frozen=True)
class ImageHeader:
    """What decoding an image file found: stored size, EXIF orientation (1 when untagged) and PIL mode."""

    width: int
    height: int
    orientation: int = 1
    mode: str = "RGB"

    @property
    def transposed_on_decode(self) -> bool:
        """Whether ``datasets.Image`` would rotate or mirror the image (EXIF orientation 2-8)."""
        return self.orientation in TRANSPOSING_ORIENTATIONS

    @property
    def needs_stored_copy(self) -> bool:
        """Whether the ``image`` column must hold an RGB PNG copy instead of the path (see module doc)."""
        return self.transposed_on_decode or self.mode in HIGH_BIT_DEPTH_MODES

    def describe(self) -> str:
        """``"WxH"``, plus the orientation tag when it is one that moves pixels."""
        if not self.transposed_on_decode:
            return f"{self.width}x{self.height}"
        return f"{self.width}x{self.height} (stored; EXIF orientation {self.orientation})"


def _open(file: str | Path | BinaryIO) -> PILImage.Image:
    """``PIL.Image.open`` with PIL's decompression-bomb warning (more than ``MAX_IMAGE_PIXELS``) as an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", PILImage.DecompressionBombWarning)
        try:
            return PILImage.open(file)
        except PILImage.DecompressionBombWarning as warning:
            raise PILImage.DecompressionBombError(
                f"{warning}; raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted"
            ) from None


def inspect_image(file: str | Path | BinaryIO) -> ImageHeader:
    """Decode an image file in full and return its stored size, EXIF orientation and mode.

    Raises one of ``IMAGE_ERRORS`` for a file that is not an image, is truncated or damaged, or claims more
    pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (checked from the header, before any pixel is decoded).
    """
    with _open(file) as image:
        orientation = image.getexif().get(ExifTags.Base.Orientation)
        image.load()  # a truncated or damaged file fails here, not mid-epoch
        width, height = image.size
        mode = image.mode
    return ImageHeader(int(width), int(height), orientation if isinstance(orientation, int) else 1, mode)


def to_rgb(image: PILImage.Image) -> PILImage.Image:
    """``image`` as 8-bit RGB; 16-bit and 32-bit greyscale are scaled (``convert("RGB")`` would clip them white).

    ``I;16*`` and ``I`` hold 16-bit samples (what PIL decodes a 16-bit PNG to): divided by 257, so 65535 -> 255.
    ``F`` is taken as [0, 1] when its maximum is at most 1, else as [0, 255]; values outside are clipped.
    """
    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F" and values.size and np.nanmax(values) <= 1.0:
        values = values * 255.0
    elif image.mode != "F":
        values = values / 257.0
    grey = np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
    return PILImage.fromarray(grey).convert("RGB")


def stored_frame_png(file: str | Path | BinaryIO) -> bytes:
    """The stored pixels of an image (EXIF orientation NOT applied) as 8-bit RGB PNG bytes without a tag.

    Lossless for 8-bit files; ``datasets.Image`` decodes it in the stored frame.
    """
    with _open(file) as image:
        pixels = to_rgb(image)
    buffer = io.BytesIO()
    pixels.save(buffer, format="PNG", exif=b"")
    return buffer.getvalue()


class ImageFiles:
    """Each image file decoded once (size, orientation, mode); failures are remembered too.

    ``header(path, where)`` raises ``RecordError("missing_image", ...)`` for a missing, unreadable, truncated or
    oversized file; ``cell(path, where)`` is the value for the ``image`` column: the path, or a PNG copy of the
    stored pixels when decoding the file as it is would move or whiten them (see module doc).
    """

    def __init__(self) -> None:
        self._headers: dict[Path, ImageHeader | str] = {}
        self._cells: dict[Path, str | dict] = {}

    @staticmethod
    def _inspect(path: Path) -> ImageHeader | str:
        if not path.is_file():
            return f"image file {path} not found"
        try:
            return inspect_image(path)
        except PILImage.DecompressionBombError as error:
            return f"image file {path} is too large to decode safely ({error})"
        except IMAGE_ERRORS as error:
            return f"image file {path} is not a readable image ({error})"

    def prefetch(self, paths: Iterable[Path], desc: str = "decoding images") -> None:
        """Decode every file of ``paths`` not seen yet, on a thread pool, with a progress bar."""
        todo = list(dict.fromkeys(p for p in paths if p not in self._headers))
        if not todo:
            return
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for path, header in zip(todo, progress(pool.map(self._inspect, todo), desc=desc, total=len(todo),
                                                   unit="image")):
                self._headers[path] = header

    def header(self, path: Path, where: str) -> ImageHeader:
        """The header of ``path``; ``RecordError`` naming ``where`` and the file if it cannot be decoded."""
        if path not in self._headers:
            self._headers[path] = self._inspect(path)
        header = self._headers[path]
        if isinstance(header, str):
            raise RecordError("missing_image", f"{where}: {header}")
        return header

    def cell(self, path: Path, where: str) -> str | dict:
        """The ``image`` value for ``path`` (see class doc); ``RecordError`` if it cannot be decoded."""
        if path not in self._cells:
            if not self.header(path, where).needs_stored_copy:
                self._cells[path] = str(path)
            else:
                try:
                    # no path: datasets would store a local path instead of the bytes
                    self._cells[path] = {"bytes": stored_frame_png(path), "path": None}
                except IMAGE_ERRORS as error:
                    self._headers[path] = f"image file {path} could not be decoded ({error})"
                    raise RecordError("missing_image", f"{where}: {self._headers[path]}") from error
        return self._cells[path]
