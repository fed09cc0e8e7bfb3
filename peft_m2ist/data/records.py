"""Shared checks for the real-format loaders: box conversion, validation and skip counting.

Every loader converts its source's box convention ONCE, here, into ``[x0, y0, x1, y1]`` absolute
pixel corners, and checks each record. A problem either raises ``RecordError`` (a ``ValueError``
naming the file and record) or, with ``on_error="skip"``, drops the record and counts it under
its reason in a ``LoadReport``. A box may stick out of the image by at most ``BOX_TOLERANCE_PX``
(float rounding in the sources); it is then clipped. Anything larger is an error, never a
silently moved box.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from datasets import Dataset, Features, Image, List, Value

logger = logging.getLogger(__name__)

BoxFormat = Literal["xywh", "xyxy"]
OnError = Literal["raise", "skip"]
BOX_FORMATS: tuple[str, ...] = ("xywh", "xyxy")
BOX_TOLERANCE_PX = 1.0
"""How far (pixels) a box may stick out of its image and still be clipped rather than refused."""

SKIP_REASONS: tuple[str, ...] = (
    "malformed_record", "missing_key", "empty_phrase", "degenerate_box", "box_outside_image", "missing_image",
)

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


@dataclass
class LoadResult:
    """A loader's output: ``dataset`` in the internal record format and its ``report``."""

    dataset: Dataset
    report: LoadReport


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


def check_phrase(phrase: object, where: str) -> str:
    """The phrase stripped; ``RecordError`` if it is not a non-empty string."""
    if not isinstance(phrase, str):
        raise RecordError("malformed_record", f"{where}: phrase {phrase!r} is not a string")
    if not phrase.strip():
        raise RecordError("empty_phrase", f"{where}: empty phrase")
    return phrase.strip()


def records_to_dataset(records: list[dict], extra_features: dict | None = None, split: str | None = None) -> Dataset:
    """Build a ``Dataset`` with ``RECORD_FEATURES`` plus ``extra_features`` (name -> datasets feature)."""
    features = Features({**RECORD_FEATURES, **(extra_features or {})})
    columns = {name: [record[name] for record in records] for name in features}
    return Dataset.from_dict(columns, features=features, split=split)
