"""``--dataset hf``: a Hugging Face dataset of REC rows (``peft_m2ist.data.hf``), its columns and boxes checked.

``--hf_columns`` names the columns (``HF_COLUMN_KEYS``; ``phrase=`` is another name for ``sentences=``); the check
reads each split's column types and the first ``BOX_CHECK_ROWS`` boxes against their images in ``--hf_box_format``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from peft_m2ist.data.image_files import IMAGE_ERRORS, inspect_image
from peft_m2ist.data.records import BOX_FORMATS, LoadResult, RecordError, check_box, to_xyxy
from peft_m2ist.data.sources.base import DataSource, SourceError, parse_mapping, register

HF_COLUMN_KEYS: tuple[str, ...] = ("image", "bbox", "sentences", "phrase_type", "image_id")
"""The keys of ``--hf_columns`` (``KEY=source column``); ``phrase_type`` and ``image_id`` are optional columns."""
HF_COLUMN_ALIASES: dict[str, str] = {"phrase": "sentences"}
"""Other names of ``--hf_columns`` keys (issue #19 wrote ``phrase=``; the records' field is ``phrase``)."""
REQUIRED_COLUMNS: tuple[str, ...] = ("image", "bbox", "sentences")
"""The keys whose column has a default: the key's own name."""

BOX_CHECK_ROWS = 16
"""Rows of each Hub split whose boxes ``check`` reads against their images before training."""


def parse_hf_columns(text: str | Mapping[str, str] | None) -> dict[str, str]:
    """``--hf_columns`` as key -> source column, its aliases (``HF_COLUMN_ALIASES``) under their key's name."""
    given = parse_mapping(text, "--hf_columns", (*HF_COLUMN_KEYS, *HF_COLUMN_ALIASES))
    columns = {}
    for key, column in given.items():
        name = HF_COLUMN_ALIASES.get(key, key)
        if name in columns:
            names = " and ".join(f"{k}=" for k in (name, *HF_COLUMN_ALIASES) if HF_COLUMN_ALIASES.get(k, k) == name)
            raise SourceError(f"--hf_columns {text}: {names} name the same column key: give one")
        columns[name] = column
    return columns


@register
@dataclass
class HFSource(DataSource):
    """A Hub dataset id, a ``save_to_disk`` folder or a parquet folder, opened once (``hf_data``)."""

    kind = "hf"
    flags = ("hf_path", "hf_name", "hf_columns", "hf_box_format", "hf_split_names")
    standard_eval_splits = {(None, None): ("val",)}

    hf_path: str | None = None
    hf_name: str | None = None
    hf_columns: dict[str, str] = field(default_factory=dict)
    hf_box_format: str = "xywh"
    hf_split_names: dict[str, str] = field(default_factory=dict)
    _hf_data: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_kind_flags(cls, flags: Mapping[str, Any]) -> HFSource:
        """``hf_box_format`` None is ``xywh``."""
        return cls(on_bad_record=flags.get("on_bad_record") or "raise", hf_path=flags.get("hf_path"),
                   hf_name=flags.get("hf_name"), hf_columns=parse_hf_columns(flags.get("hf_columns")),
                   hf_box_format=flags.get("hf_box_format") or "xywh",
                   hf_split_names=parse_mapping(flags.get("hf_split_names"), "--hf_split_names"))

    def check_names(self) -> None:
        if not self.hf_path:
            raise SourceError("--dataset hf needs --hf_path (a Hub dataset id or a local folder)")
        if self.hf_box_format not in BOX_FORMATS:
            raise SourceError(f"--hf_box_format {self.hf_box_format}: choose from {', '.join(BOX_FORMATS)}")

    def describe(self) -> str:
        return f"Hugging Face dataset {self.hf_path}" + (f" ({self.hf_name})" if self.hf_name else "")

    def hf_data(self):
        """The Hub dataset (a ``DatasetDict``), opened once: a ``save_to_disk`` folder, else ``load_dataset``."""
        if self._hf_data is None:
            from datasets import Dataset, DatasetDict

            from peft_m2ist.data.hf import is_saved_folder, open_hf_source

            if self.hf_name and is_saved_folder(self.hf_path):
                raise SourceError(f"--hf_name {self.hf_name}: {self.hf_path} is a save_to_disk folder, which has no "
                                  "configurations: drop --hf_name")
            try:
                data = open_hf_source(self.hf_path, self.hf_name)
            except (FileNotFoundError, ValueError, ConnectionError) as error:
                raise SourceError(f"--hf_path {self.hf_path}: cannot open it ({type(error).__name__}: {error})"
                                  ) from error
            if isinstance(data, Dataset):
                data = DatasetDict({"train": data})
            self._hf_data = data
        return self._hf_data

    def hf_column(self, key: str) -> str | None:
        """The source column of ``key`` (``--hf_columns``; ``image``, ``bbox``, ``sentences`` by default)."""
        return self.hf_columns.get(key, key if key in REQUIRED_COLUMNS else None)

    # ------------------------------------------------------------------------------------------------ files
    def held_splits(self) -> dict[str, int | None]:
        return {name: len(split) for name, split in sorted(self.hf_data().items())}

    def source_split(self, split: str) -> str:
        return self.hf_split_names.get(split, split)

    def missing_split(self, flag: str, name: str, held: Mapping[str, int | None]) -> str:
        source_name = self.source_split(name)
        mapped = f" (mapped by --hf_split_names to {source_name!r})" if source_name != name else ""
        return (f"{flag} {name}: {self.hf_path} has no split {source_name!r}{mapped}; its splits (rows each): "
                f"{self.listed(held)}; map ours to theirs with --hf_split_names, e.g. val=validation,testA=test_a")

    def check_split(self, split: str) -> None:
        """The columns exist and have the types the reader takes; the first boxes fit their images."""
        from datasets import Image, LargeList, List, Sequence, Value

        source_name = self.source_split(split)
        data = self.hf_data()[source_name]
        where = f"{self.hf_path} [{source_name}]"
        features = data.features
        for key in HF_COLUMN_KEYS:
            column = self.hf_column(key)
            if column is not None and column not in features:
                raise SourceError(f"--hf_columns {key}={column}: {where} has no column {column!r}; its columns: "
                                  f"{list(features)}")

        def is_list(feature) -> bool:
            return isinstance(feature, (List, LargeList, Sequence))

        def is_text(feature) -> bool:
            return isinstance(feature, Value) and feature.dtype in ("string", "large_string")

        image, bbox, sentences = (features[self.hf_column(k)] for k in REQUIRED_COLUMNS)
        if not isinstance(image, Image):
            raise SourceError(f"--hf_columns image={self.hf_column('image')}: column of {where} is {image}, not an "
                              "Image feature")
        if not (is_list(bbox) and isinstance(bbox.feature, Value) and (
                bbox.feature.dtype.startswith(("float", "int", "uint")))):
            raise SourceError(f"--hf_columns bbox={self.hf_column('bbox')}: column of {where} is {bbox}, not a "
                              "list of 4 numbers")
        inner = sentences.feature if is_list(sentences) else None
        if not (is_text(sentences) or (inner is not None and (is_text(inner) or (
                isinstance(inner, dict) and is_text(inner.get("sent"))))) or (
                isinstance(sentences, dict) and "sent" in sentences)):
            raise SourceError(f"--hf_columns sentences={self.hf_column('sentences')}: column of {where} is "
                              f"{sentences}, not a string, a list of strings or a list of {{'sent': string}}")
        self._check_boxes(data, where)

    def _check_boxes(self, data, where: str) -> None:
        """The first ``BOX_CHECK_ROWS`` boxes must fit their images in ``--hf_box_format`` (pixels)."""
        from datasets import Image

        rows = data.select(range(min(BOX_CHECK_ROWS, len(data))))
        image_column, bbox_column = self.hf_column("image"), self.hf_column("bbox")
        rows = rows.select_columns([image_column, bbox_column]).cast_column(image_column, Image(decode=False))
        other = "xyxy" if self.hf_box_format == "xywh" else "xywh"
        boxes = [row[bbox_column] for row in rows.select_columns([bbox_column])]
        if boxes and all(isinstance(box, list) and box and all(
                isinstance(v, (int, float)) and abs(v) <= 1 for v in box) for box in boxes):
            raise SourceError(f"--hf_box_format {self.hf_box_format}: the first {len(boxes)} boxes of {where} are all "
                              f"within [0, 1] (row #0: {boxes[0]}): they look normalised, and the reader takes "
                              "absolute pixels; convert them (multiply by the image's width and height) first")
        for index, row in enumerate(rows):
            record = f"{where} row #{index}"
            box, cell = row[bbox_column], row[image_column] or {}
            try:
                header = inspect_image(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell.get("path"))
            except (*IMAGE_ERRORS, TypeError, ValueError) as error:
                raise SourceError(f"--hf_path {self.hf_path}: {record}: unreadable image ({error})") from error
            try:
                check_box(to_xyxy(box, self.hf_box_format, record), header.width, header.height, record)
                continue
            except RecordError as error:
                problem = str(error)
            hint = ""
            try:
                check_box(to_xyxy(box, other, record), header.width, header.height, record)
                hint = f"; it fits the image as {other}: pass --hf_box_format {other}"
            except RecordError:
                pass
            raise SourceError(f"--hf_box_format {self.hf_box_format}: {problem}{hint}")

    # ---------------------------------------------------------------------------------------------- loading
    def load(self, split: str) -> LoadResult:
        from peft_m2ist.data.hf import load_hf_rec

        result = load_hf_rec(self.hf_data(), split, split_names=self.hf_split_names, box_format=self.hf_box_format,
                             image_column=self.hf_column("image"), bbox_column=self.hf_column("bbox"),
                             sentences_column=self.hf_column("sentences"),
                             phrase_type_column=self.hf_column("phrase_type"),
                             image_id_column=self.hf_column("image_id"), on_error=self.on_bad_record)
        result.report.source = f"{self.hf_path} [{self.source_split(split)}]"
        return result
