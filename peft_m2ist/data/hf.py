"""Reader for Hugging Face datasets of REC data (rows with an image, a box and sentences).

Uploads differ in split names and box conventions, so both are explicit:
``split_names`` maps our split names to the source's (e.g. ``{"val": "validation",
"testA": "test_a"}``; a split not in the map keeps its name) and ``box_format`` declares the
source's box convention (``xywh`` or ``xyxy``, absolute pixels), converted to ``xyxy`` here.
The sentences column may hold a string, a list of strings, or a list of dicts with a
``sentence_key`` (e.g. refer-style ``{"sent": ..., "raw": ...}``). One record per sentence.
Boxes are in the stored pixel frame of the image; an image with an EXIF orientation tag is kept in
that frame (see ``peft_m2ist.data.records``). A split that yields no record raises ``ValueError``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, Image, load_dataset, load_from_disk

from peft_m2ist.data.image_files import IMAGE_ERRORS, ImageHeader, inspect_image, stored_frame_png
from peft_m2ist.data.records import (
    RECORD_FEATURES,
    BoxFormat,
    LoadReport,
    LoadResult,
    OnError,
    RecordError,
    check_box_on,
    check_phrase,
    progress,
    to_xyxy,
)


def is_saved_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``save_to_disk`` (a ``DatasetDict``'s or a ``Dataset``'s)."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, name))
                                       for name in ("dataset_dict.json", "state.json"))


def _empty_saved_splits(path: str | os.PathLike) -> list[str]:
    """The splits of the ``save_to_disk`` folder ``path`` saved without a data file (those of no row)."""
    root = Path(path)
    listing = root / "dataset_dict.json"
    names = json.loads(listing.read_text())["splits"] if listing.is_file() else [""]
    return [name or root.name for name in names
            if not json.loads((root / name / "state.json").read_text()).get("_data_files")]


def open_hf_source(source: Dataset | DatasetDict | str | os.PathLike, name: str | None = None) -> DatasetDict | Dataset:
    """``source`` itself, its ``save_to_disk`` folder, or ``datasets.load_dataset(source, name)``.

    Raises:
        ValueError: a ``save_to_disk`` folder holding an empty split (``datasets`` cannot read one back: its
            ``IndexError`` said nothing of the split), naming the split.
    """
    if isinstance(source, (Dataset, DatasetDict)):
        return source
    path = str(source)
    if not is_saved_folder(path):
        return load_dataset(path, name)
    try:
        return load_from_disk(path)
    except IndexError as error:
        empty = _empty_saved_splits(path)
        if not empty:
            raise
        raise ValueError(f"{path}: split {empty[0]!r} is empty (no row, no data file), and datasets cannot read back "
                         "a save_to_disk folder with an empty split: drop the split and save it again") from error


def _source_split(data: DatasetDict | Dataset, split: str, split_names: Mapping[str, str]) -> Dataset:
    if isinstance(data, Dataset):
        return data
    name = split_names.get(split, split)
    if name not in data:
        raise ValueError(
            f"split {split!r} maps to source split {name!r}, which does not exist; source splits: "
            f"{sorted(data)}; pass split_names={{{split!r}: <one of them>}}"
        )
    return data[name]


def _image_file(value: dict | None, where: str) -> io.BytesIO | str:
    """What to open for an undecoded image cell (``{"bytes", "path"}``): its bytes or its local file."""
    if value is None:
        raise RecordError("missing_image", f"{where}: no image")
    if value.get("bytes") is not None:
        return io.BytesIO(value["bytes"])
    if value.get("path") and os.path.isfile(value["path"]):
        return value["path"]
    raise RecordError("missing_image", f"{where}: image has neither bytes nor an existing file ({value.get('path')})")


def _image_header(value: dict | None, where: str) -> ImageHeader:
    """Size, EXIF orientation and mode of an undecoded image cell, decoding it in full once."""
    try:
        return inspect_image(_image_file(value, where))
    except IMAGE_ERRORS as error:
        raise RecordError("missing_image", f"{where}: unreadable image ({error})") from error


def _stored_copy_cell(value: dict, where: str) -> dict:
    """The cell as an 8-bit RGB PNG of its stored pixels, so decoding neither applies its EXIF orientation nor
    clips its 16-bit samples."""
    try:
        # no path: datasets would keep a local file's path instead of the bytes
        return {"bytes": stored_frame_png(_image_file(value, where)), "path": None}
    except IMAGE_ERRORS as error:
        raise RecordError("missing_image", f"{where}: image could not be decoded ({error})") from error


def _sentences(value: Any, sentence_key: str, where: str) -> list[Any]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) and sentence_key in value:
        return [value[sentence_key]]
    if not isinstance(value, list):
        raise RecordError("malformed_record", f"{where}: sentences {value!r:.100} are not a string or list")
    out = []
    for item in value:
        if isinstance(item, dict):
            if sentence_key not in item:
                raise RecordError("missing_key", f"{where}: sentence {item!r:.100} has no key {sentence_key!r}")
            out.append(item[sentence_key])
        else:
            out.append(item)
    return out


def load_hf_rec(
    source: Dataset | DatasetDict | str | os.PathLike,
    split: str,
    *,
    split_names: Mapping[str, str],
    box_format: BoxFormat,
    image_column: str = "image",
    bbox_column: str = "bbox",
    sentences_column: str = "sentences",
    sentence_key: str = "sent",
    phrase_type_column: str | None = None,
    image_id_column: str | None = None,
    on_error: OnError = "raise",
) -> LoadResult:
    """Records of one split of a Hugging Face REC dataset.

    Args:
        source: a ``DatasetDict`` / ``Dataset``, a ``save_to_disk`` folder, or anything
            ``datasets.load_dataset`` takes (a local parquet folder, a hub id when online).
        split: our split name (``train``, ``val``, ``testA`` ...).
        split_names: our split name -> source split name; names not in it are used as they are.
        box_format: the source's box convention, ``"xywh"`` or ``"xyxy"`` (absolute pixels).
        image_column, bbox_column, sentences_column: source column names.
        sentence_key: key of the sentence text when sentences are dicts.
        phrase_type_column: optional source column to use as ``phrase_type`` (else "unknown").
        image_id_column: optional source column for ``image_id`` (else the source row index).
        on_error: ``"raise"`` a ``ValueError`` naming the split and row, or ``"skip"`` and count.

    Returns:
        ``LoadResult``: ``dataset`` with ``image`` (RGB), ``bbox`` (``[x0, y0, x1, y1]`` pixels),
        ``phrase``, ``phrase_type``, ``image_id`` (str); ``report`` with skip counts per reason.

    Raises:
        ValueError: an unknown split or column, a bad row (``RecordError``, with ``on_error="raise"``),
            or no record kept (an empty split included).
    """
    opened = open_hf_source(source)
    data = _source_split(opened, split, split_names)
    for column in (image_column, bbox_column, sentences_column, phrase_type_column, image_id_column):
        if column is not None and column not in data.column_names:
            raise ValueError(f"source split for {split!r} has no column {column!r}; columns: {data.column_names}")
    report = LoadReport(source=f"{source if isinstance(source, (str, os.PathLike)) else 'dataset'}[{split}]",
                        on_error=on_error)
    wanted = [c for c in (bbox_column, sentences_column, phrase_type_column, image_id_column) if c is not None]
    meta = data.select_columns(wanted)
    images = data.select_columns([image_column]).cast_column(image_column, Image(decode=False))
    rows, boxes, phrases, types, ids = [], [], [], [], []
    stored_copies: dict[int, dict] = {}  # source row -> PNG cell of an EXIF-oriented or 16-bit image
    for index, (row, image) in enumerate(progress(zip(meta, images), desc=report.source, total=len(data),
                                                  unit="row")):
        where = f"{report.source} row #{index}"
        try:
            header = _image_header(image[image_column], where)
            box = check_box_on(to_xyxy(row[bbox_column], box_format, where), header, where)
            sentences = _sentences(row[sentences_column], sentence_key, where)
            if header.needs_stored_copy:
                stored_copies[index] = _stored_copy_cell(image[image_column], where)
        except RecordError as error:
            report.fail(error)
            continue
        for number, sentence in enumerate(sentences):
            try:
                phrase = check_phrase(sentence, f"{where} sentence #{number}")
            except RecordError as error:
                report.fail(error)
                continue
            rows.append(index)
            boxes.append(list(box))
            phrases.append(phrase)
            types.append(str(row[phrase_type_column]) if phrase_type_column else "unknown")
            ids.append(str(row[image_id_column]) if image_id_column else str(index))
    report.kept = len(rows)
    report.log()
    report.require_records(f"its source split holds {len(data)} rows" + (
        f" (source splits: {sorted(opened)})" if isinstance(opened, DatasetDict) else ""))
    out = data.select_columns([image_column]).select(rows).flatten_indices()
    if image_column != "image":
        out = out.rename_column(image_column, "image")
    out = out.cast_column("image", Image(decode=False))
    if stored_copies:
        # EXIF-oriented images stay in their stored frame (the boxes' frame), 16-bit ones are scaled to 8 bits:
        # RGB PNG copies without the tag
        out = out.map(lambda cell, i: {"image": stored_copies.get(rows[i], cell)}, input_columns=["image"],
                      with_indices=True, features=out.features, desc="stored-pixel copies of images")
    out = out.cast_column("image", Image(mode="RGB"))
    for name, values in (("bbox", boxes), ("phrase", phrases), ("phrase_type", types), ("image_id", ids)):
        out = out.add_column(name, values, feature=RECORD_FEATURES[name])
    return LoadResult(out.cast(RECORD_FEATURES), report)
