"""Reader for TransVG-style split files (also used by DARA, M2IST, MaPPER).

Layout::

    {root}/{name}/{name}_{split}.pth    name in unc, unc+, gref, gref_umd, referit, flickr
    {image_dir}/{image_file}

Each ``.pth`` holds a list of tuples ``(image_file, mask_or_ann_id, bbox, phrase, attributes)``;
ReferIt rows may have 4 items (no attributes), Flickr30k Entities rows 3 (``(image_file, bbox, phrase)``, as
TransVG's loader reads them). Box convention: COCO ``xywh`` for the RefCOCO family (``unc``, ``unc+``, ``gref``,
``gref_umd``), corners ``xyxy`` for ``referit`` and ``flickr``; converted to ``xyxy`` here. The file is read with ``torch.load(weights_only=True)`` (no code from it runs).
Image sizes are read from the image headers (once per file). One record per row. Boxes are in
the stored pixel frame; an image with an EXIF orientation tag is kept in that frame (see
``peft_m2ist.data.records``). A wrong split raises ``SplitNotFoundError`` listing the split files
that exist; a split that yields no record raises ``ValueError``.
"""

from __future__ import annotations

import os
from pathlib import Path

from peft_m2ist.data.image_files import ImageFiles
from peft_m2ist.data.records import (
    BoxFormat,
    LoadReport,
    LoadResult,
    OnError,
    RecordError,
    SplitNotFoundError,
    check_box_on,
    check_phrase,
    progress,
    records_to_dataset,
    to_xyxy,
)
from peft_m2ist.data.safe_pickle import load_pth_list

DEFAULT_BOX_FORMATS: dict[str, BoxFormat] = {
    "unc": "xywh", "unc+": "xywh", "gref": "xywh", "gref_umd": "xywh", "referit": "xyxy", "flickr": "xyxy",
}
"""Box convention of each known split-file family."""


def _split_file(root: Path, name: str, split: str) -> Path:
    """``{root}/{name}/{name}_{split}.pth``; ``SplitNotFoundError`` listing what exists if it is missing."""
    folder = root / name
    path = folder / f"{name}_{split}.pth"
    if path.is_file():
        return path
    if not folder.is_dir():
        folders = root.iterdir() if root.is_dir() else []
        families = sorted(p.name for p in folders if p.is_dir() and any(p.glob(f"{p.name}_*.pth")))
        raise SplitNotFoundError(
            f"{path} not found: no folder {folder}; split-file families under {root}: {families or 'none'}; "
            f"pass name= one of them (and root= TransVG's data/ folder)"
        )
    splits = sorted(p.name[len(name) + 1:-len(".pth")] for p in folder.glob(f"{name}_*.pth"))
    raise SplitNotFoundError(
        f"{path} not found; splits of {name!r} in {folder}: {splits or 'none'}; pass split= one of them"
    )


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
        name: ``unc``, ``unc+``, ``gref``, ``gref_umd``, ``referit`` or ``flickr``.
        split: e.g. ``train``, ``val``, ``testA``, ``testB``, ``test``.
        image_dir: folder of the images named in the rows (default ``{root}/images``).
        box_format: override the family's box convention (required for unknown names).
        on_error: ``"raise"`` a ``ValueError`` naming the file and row, or ``"skip"`` and count.

    Returns:
        ``LoadResult``: ``dataset`` with ``image`` (decoded lazily), ``bbox`` (``[x0, y0, x1, y1]``
        pixels), ``phrase``, ``phrase_type`` ("unknown"), ``image_id`` (the image file name);
        ``report`` with the skip counts per reason.

    Raises:
        SplitNotFoundError: no ``{name}_{split}.pth`` (the message lists the splits present).
        ValueError: a corrupt split file, a bad row (``RecordError``, with ``on_error="raise"``), or no
            record kept.
    """
    if box_format is None:
        if name not in DEFAULT_BOX_FORMATS:
            raise ValueError(f"unknown split family {name!r}: pass box_format ('xywh' or 'xyxy')")
        box_format = DEFAULT_BOX_FORMATS[name]
    path = _split_file(Path(root), name, split)
    images_root = Path(image_dir) if image_dir is not None else Path(root) / "images"
    rows = load_pth_list(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of rows, got {type(rows).__name__}")
    report = LoadReport(source=str(path), on_error=on_error)
    files = ImageFiles()
    files.prefetch((images_root / row[0] for row in rows
                    if isinstance(row, (tuple, list)) and row and isinstance(row[0], str) and row[0]),
                   desc=f"{name}_{split} images")
    records = []
    for index, row in enumerate(progress(rows, desc=f"{name}_{split}.pth", unit="row")):
        where = f"{path} row #{index}"
        try:
            if not isinstance(row, (tuple, list)) or len(row) not in (3, 4, 5):
                raise RecordError("malformed_record",
                                  f"{where}: expected a tuple of 3 (Flickr30k), 4 or 5 items, got {row!r:.200}")
            image_file, box, phrase = (row[0], row[1], row[2]) if len(row) == 3 else (row[0], row[2], row[3])
            if not isinstance(image_file, str) or not image_file:
                raise RecordError("malformed_record", f"{where}: image file name {image_file!r} is not a string")
            phrase = check_phrase(phrase, where)
            image_path = images_root / image_file
            header = files.header(image_path, where)
            xyxy = check_box_on(to_xyxy(box, box_format, where), header, where)
            image = files.cell(image_path, where)
        except RecordError as error:
            report.fail(error)
            continue
        records.append({"image": image, "bbox": list(xyxy), "phrase": phrase,
                        "phrase_type": "unknown", "image_id": image_file})
    report.kept = len(records)
    report.log()
    report.require_records(f"{path} holds {len(rows)} rows")
    return LoadResult(records_to_dataset(records, split=split), report)
