"""Shared checks for the real-format loaders: box conversion, validation and skip counting.

Every loader converts its source's box convention ONCE, here, into ``[x0, y0, x1, y1]`` absolute
pixel corners, and checks each record. A problem either raises ``RecordError`` (a ``ValueError``
naming the file and record) or, with ``on_error="skip"``, drops the record and counts it under
its reason in a ``LoadReport``. A box may stick out of the image by at most ``BOX_TOLERANCE_PX``
(float rounding in the sources); it is then clipped. Anything larger is an error, never a
silently moved box.

Image files are decoded once at load time and stored so that they decode right (EXIF orientation,
16-bit samples): see ``peft_m2ist.data.image_files``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar

from datasets import Dataset, Features, Image, List, Value
from datasets.utils import tqdm as hf_tqdm

if TYPE_CHECKING:  # image_files imports this module
    from peft_m2ist.data.image_files import ImageHeader

logger = logging.getLogger(__name__)

BoxFormat = Literal["xywh", "xyxy"]
OnError = Literal["raise", "skip"]
BOX_FORMATS: tuple[str, ...] = ("xywh", "xyxy")
BOX_TOLERANCE_PX = 1.0
"""How far (pixels) a box may stick out of its image and still be clipped rather than refused."""

SKIP_REASONS: tuple[str, ...] = (
    "malformed_record", "missing_key", "empty_phrase", "degenerate_box", "box_outside_image", "missing_image",
    "image_size_mismatch",
)

_T = TypeVar("_T")

RECORD_FEATURES = Features(
    {
        "image": Image(mode="RGB"),
        "bbox": List(Value("float64"), length=4),
        "phrase": Value("string"),
        "phrase_type": Value("string"),
        "image_id": Value("string"),
    }
)
"""Columns every real-format loader returns (``image`` decodes lazily from its file path)."""


class RecordError(ValueError):
    """A malformed source record; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"[{reason}] {message}")
        self.reason = reason


class SplitNotFoundError(FileNotFoundError, ValueError):
    """The requested split has no file (TransVG); the message lists the splits that exist.

    Both a ``FileNotFoundError`` (what a missing file used to raise) and a ``ValueError`` (what the
    loaders raise for other wrong split names), like ``io.UnsupportedOperation``.
    """


@dataclass
class LoadReport:
    """What a loader kept and what it skipped (per reason), with ``on_error="skip"``."""

    source: str
    on_error: OnError = "raise"
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")

    def fail(self, error: RecordError) -> None:
        """Raise ``error`` or count it, as ``on_error`` says."""
        if self.on_error == "raise":
            raise error
        self.skipped[error.reason] += 1

    @property
    def num_skipped(self) -> int:
        """Total records skipped."""
        return sum(self.skipped.values())

    def log(self) -> None:
        """Log a one-line summary (a warning when anything was skipped)."""
        if self.num_skipped:
            logger.warning("%s: kept %d records, skipped %d (%s)", self.source, self.kept, self.num_skipped,
                           dict(self.skipped))
        else:
            logger.info("%s: kept %d records", self.source, self.kept)

    def require_records(self, hint: str) -> None:
        """Raise ``ValueError`` when no record was kept; ``hint`` says what the source holds.

        An empty result is a wrong split name or a source whose records were all skipped, never a
        dataset to train or evaluate on.
        """
        if self.kept:
            return
        if self.num_skipped:
            raise ValueError(
                f"{self.source}: every record was skipped ({self.num_skipped}: {dict(self.skipped)}), none kept; "
                f"{hint}. Load with on_error='raise' to see the first problem."
            )
        raise ValueError(f"{self.source}: no records; {hint}")


@dataclass
class LoadResult:
    """A loader's output: ``dataset`` in the internal record format and its ``report``."""

    dataset: Dataset
    report: LoadReport


def progress(iterable: Iterable[_T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[_T]:
    """``iterable`` with a tqdm progress bar (``datasets``' tqdm: ``datasets.disable_progress_bars()``
    or ``HF_DATASETS_DISABLE_PROGRESS_BARS=1`` turn it off, as for ``Dataset.map``)."""
    return iter(hf_tqdm(iterable, desc=desc, total=total, unit=unit))


def to_xyxy(box: Sequence[float], box_format: BoxFormat, where: str) -> tuple[float, float, float, float]:
    """Convert a source box to ``[x0, y0, x1, y1]`` pixels; raise ``RecordError`` if it is not 4 numbers."""
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError) as error:
        raise RecordError("malformed_record", f"{where}: box {box!r} is not a list of numbers") from error
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise RecordError("malformed_record", f"{where}: box {box!r} must be 4 finite numbers")
    x, y, a, b = values
    return (x, y, x + a, y + b) if box_format == "xywh" else (x, y, a, b)


def check_box(box: tuple[float, float, float, float], width: int, height: int, where: str,
              tolerance: float = BOX_TOLERANCE_PX) -> tuple[float, float, float, float]:
    """Validate an ``xyxy`` box on a ``width x height`` image; clip it if within ``tolerance`` px."""
    x0, y0, x1, y1 = box
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        raise RecordError("degenerate_box", f"{where}: box {list(box)} (xyxy) has width or height <= 0")
    if x0 < -tolerance or y0 < -tolerance or x1 > width + tolerance or y1 > height + tolerance:
        raise RecordError(
            "box_outside_image",
            f"{where}: box {list(box)} (xyxy) lies outside the {width}x{height} image by more than {tolerance} px",
        )
    clipped = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
    if clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
        raise RecordError("degenerate_box", f"{where}: box {list(box)} is empty once clipped to the image")
    return clipped


def check_box_on(
    box: tuple[float, float, float, float], header: ImageHeader, where: str
) -> tuple[float, float, float, float]:
    """``check_box`` on the stored frame of ``header``'s image.

    When the box does not fit but would fit the EXIF-rotated (displayed) frame, the error says so:
    the annotation was then probably made on the displayed image, not on the stored pixels.
    """
    try:
        return check_box(box, header.width, header.height, where)
    except RecordError as error:
        if error.reason != "box_outside_image" or header.orientation not in (5, 6, 7, 8):
            raise
        try:
            check_box(box, header.height, header.width, where)
        except RecordError:
            raise error from None
        raise RecordError(
            "box_outside_image",
            f"{where}: box {list(box)} (xyxy) lies outside the stored {header.width}x{header.height} image but fits "
            f"its EXIF-rotated {header.height}x{header.width} view (orientation {header.orientation}); boxes must be "
            f"in the stored pixel frame (as in COCO/RefCOCO, ReferItGame, TransVG)",
        ) from None


def check_phrase(phrase: object, where: str) -> str:
    """The phrase stripped; ``RecordError`` if it is not a non-empty string."""
    if not isinstance(phrase, str):
        raise RecordError("malformed_record", f"{where}: phrase {phrase!r} is not a string")
    if not phrase.strip():
        raise RecordError("empty_phrase", f"{where}: empty phrase")
    try:
        phrase.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate: Arrow cannot store it, no tokenizer can read it
        raise RecordError("malformed_record", f"{where}: phrase {phrase!r} is not valid Unicode text ({error.reason} "
                          f"at position {error.start})") from None
    return phrase.strip()


def records_to_dataset(records: list[dict], extra_features: dict | None = None, split: str | None = None) -> Dataset:
    """Build a ``Dataset`` with ``RECORD_FEATURES`` plus ``extra_features`` (name -> datasets feature)."""
    features = Features({**RECORD_FEATURES, **(extra_features or {})})
    columns = {name: [record[name] for record in records] for name in features}
    return Dataset.from_dict(columns, features=features, split=split)
