"""Reader for TransVG-style split files (also used by DARA, M2IST, MaPPER).

Layout::

    {root}/{name}/{name}_{split}.pth    name in unc, unc+, gref, gref_umd, referit
    {image_dir}/{image_file}

Each ``.pth`` holds a list of tuples ``(image_file, mask_or_ann_id, bbox, phrase, attributes)``;
ReferIt rows may have 4 items (no attributes). Box convention: COCO ``xywh`` for the RefCOCO
family (``unc``, ``unc+``, ``gref``, ``gref_umd``), corners ``xyxy`` for ``referit``; converted to
``xyxy`` here. The file is read with ``torch.load(weights_only=True)`` (no code from it runs).
Image sizes are read from the image headers. One record per row.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from peft_m2ist.data.records import (
    BoxFormat,
    LoadReport,
    LoadResult,
    OnError,
    RecordError,
    check_box,
    check_phrase,
    records_to_dataset,
    to_xyxy,
)
from peft_m2ist.data.safe_pickle import load_pth_list

DEFAULT_BOX_FORMATS: dict[str, BoxFormat] = {
    "unc": "xywh", "unc+": "xywh", "gref": "xywh", "gref_umd": "xywh", "referit": "xyxy",
}
"""Box convention of each known split-file family."""


def _image_size(path: Path, cache: dict[Path, tuple[int, int]], where: str) -> tuple[int, int]:
    if path not in cache:
        if not path.is_file():
            raise RecordError("missing_image", f"{where}: image file {path} not found")
        try:
            with Image.open(path) as image:
                cache[path] = image.size
        except (UnidentifiedImageError, OSError) as error:
            raise RecordError("missing_image", f"{where}: image file {path} is not a readable image") from error
    return cache[path]


def load_transvg(
    root: str | os.PathLike,
    name: str = "unc",
    split: str = "val",
    image_dir: str | os.PathLike | None = None,
    *,
    box_format: BoxFormat | None = None,
    on_error: OnError = "raise",
) -> LoadResult:
    """Records of ``{root}/{name}/{name}_{split}.pth``.

    Args:
        root: folder of the split files (TransVG's ``data/``).
        name: ``unc``, ``unc+``, ``gref``, ``gref_umd`` or ``referit``.
        split: e.g. ``train``, ``val``, ``testA``, ``testB``, ``test``.
        image_dir: folder of the images named in the rows (default ``{root}/images``).
        box_format: override the family's box convention (required for unknown names).
        on_error: ``"raise"`` a ``ValueError`` naming the file and row, or ``"skip"`` and count.

    Returns:
        ``LoadResult``: ``dataset`` with ``image`` (decoded lazily), ``bbox`` (``[x0, y0, x1, y1]``
        pixels), ``phrase``, ``phrase_type`` ("unknown"), ``image_id`` (the image file name);
        ``report`` with the skip counts per reason.
    """
    if box_format is None:
        if name not in DEFAULT_BOX_FORMATS:
            raise ValueError(f"unknown split family {name!r}: pass box_format ('xywh' or 'xyxy')")
        box_format = DEFAULT_BOX_FORMATS[name]
    path = Path(root) / name / f"{name}_{split}.pth"
    images_root = Path(image_dir) if image_dir is not None else Path(root) / "images"
    rows = load_pth_list(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of rows, got {type(rows).__name__}")
    report = LoadReport(source=str(path), on_error=on_error)
    sizes: dict[Path, tuple[int, int]] = {}
    records = []
    for index, row in enumerate(rows):
        where = f"{path} row #{index}"
        try:
            if not isinstance(row, (tuple, list)) or len(row) not in (4, 5):
                raise RecordError("malformed_record", f"{where}: expected a tuple of 4 or 5 items, got {row!r:.200}")
            image_file, _, box, phrase = row[:4]
            if not isinstance(image_file, str) or not image_file:
                raise RecordError("malformed_record", f"{where}: image file name {image_file!r} is not a string")
            phrase = check_phrase(phrase, where)
            image_path = images_root / image_file
            width, height = _image_size(image_path, sizes, where)
            xyxy = check_box(to_xyxy(box, box_format, where), width, height, where)
        except RecordError as error:
            report.fail(error)
            continue
        records.append({"image": str(image_path), "bbox": list(xyxy), "phrase": phrase,
                        "phrase_type": "unknown", "image_id": image_file})
    report.kept = len(records)
    report.log()
    return LoadResult(records_to_dataset(records, split=split), report)
