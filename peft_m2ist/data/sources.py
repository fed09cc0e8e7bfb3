"""Where a training run's records come from: the ``--dataset`` modes of ``examples/train_rec.py``.

``DataSource`` holds the data flags of one run (``shapes``, ``refer``, ``transvg`` or ``hf``), knows each dataset's
standard splits (``standard_splits``: the table below, stated once here and in docs/real-data.md), checks the flags
against the files before anything is loaded (``check``: a wrong name, a missing file, a split the files do not
hold, a Hub column that is missing or of the wrong type, boxes that do not fit the declared format), and loads one
split (``load``) through the readers (``load_shapes_benchmark``, ``load_refer``, ``load_transvg``, ``load_hf_rec``).

Every problem ``check`` finds raises ``SourceError``, a ``ValueError`` whose message starts with the flag to fix
and names the file (and, for boxes, the record).
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft_m2ist.data.image_files import IMAGE_ERRORS, inspect_image
from peft_m2ist.data.records import BOX_FORMATS, LoadReport, LoadResult, RecordError, check_box, to_xyxy

DATASETS: tuple[str, ...] = ("shapes", "refer", "transvg", "hf")
"""The ``--dataset`` modes."""

REFER_SPLIT_BY: dict[str, tuple[str, ...]] = {
    "refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google"),
}
"""The refer API's annotation files: ``refs({split_by}).p`` of each dataset (the first is the standard one)."""

TRANSVG_NAMES: tuple[str, ...] = ("unc", "unc+", "gref", "gref_umd", "referit", "flickr")
"""TransVG's split-file families (``{name}/{name}_{split}.pth``)."""

SHAPES_SPLITS: tuple[str, ...] = ("train", "val", "test", "test_heldout")

STANDARD_EVAL_SPLITS: dict[tuple[str, str | None, str | None], tuple[str, ...]] = {
    ("shapes", None, None): ("val",),
    ("refer", "refcoco", "unc"): ("val", "testA", "testB"),
    ("refer", "refcoco+", "unc"): ("val", "testA", "testB"),
    ("refer", "refcocog", "umd"): ("val", "test"),
    ("refer", "refcoco", "google"): ("val",),
    ("refer", "refcocog", "google"): ("val",),
    ("transvg", "unc", None): ("val", "testA", "testB"),
    ("transvg", "unc+", None): ("val", "testA", "testB"),
    ("transvg", "gref", None): ("val",),
    ("transvg", "gref_umd", None): ("val", "test"),
    ("transvg", "referit", None): ("val", "test"),
    ("transvg", "flickr", None): ("val", "test"),
    ("hf", None, None): ("val",),
}
"""Default ``--eval_splits`` of each dataset (the splits papers report); the training split is always ``train``.
The first is the one the best adapter is chosen on."""

HF_COLUMN_KEYS: tuple[str, ...] = ("image", "bbox", "sentences", "phrase_type", "image_id")
"""The keys of ``--hf_columns`` (``KEY=source column``); ``phrase_type`` and ``image_id`` are optional columns."""

MODE_FLAGS: dict[str, tuple[str, ...]] = {
    "shapes": (),
    "refer": ("data_root", "dataset_name", "split_by", "image_dir"),
    "transvg": ("data_root", "dataset_name", "image_dir"),
    "hf": ("hf_path", "hf_name", "hf_columns", "hf_box_format", "hf_split_names"),
}
"""The source flags each ``--dataset`` mode reads; giving another mode's flag is an error."""
SOURCE_FLAGS: tuple[str, ...] = ("data_root", "dataset_name", "split_by", "image_dir", "hf_path", "hf_name",
                                 "hf_columns", "hf_box_format", "hf_split_names")

BOX_CHECK_ROWS = 16
"""Rows of each Hub split whose boxes ``check`` reads against their images before training."""


class SourceError(ValueError):
    """A data flag that does not fit the files; the message starts with the flag."""


def parse_mapping(text: str | Mapping[str, str] | None, flag: str, keys: Sequence[str] | None = None) -> dict:
    """``"a=b,c=d"`` (or a YAML mapping) as a dict; ``SourceError`` naming ``flag`` if malformed or a key unknown."""
    if text is None:
        return {}
    if isinstance(text, Mapping):
        pairs = [(str(k), str(v)) for k, v in text.items()]
    else:
        pairs = []
        for item in filter(None, (part.strip() for part in str(text).split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise SourceError(f"{flag} {text}: {item!r} is not KEY=VALUE (pairs separated by commas)")
            pairs.append((key.strip(), value.strip()))
    out = dict(pairs)
    if len(out) != len(pairs):
        raise SourceError(f"{flag} {text}: a key is given twice")
    if keys is not None and (unknown := sorted(set(out) - set(keys))):
        raise SourceError(f"{flag} {text}: unknown keys {unknown}; the keys are {list(keys)}")
    return out


def parse_split_list(text: str | Sequence[str], flag: str) -> list[str]:
    """``"val,testA"`` (or a YAML list) as a list of split names, non-empty, without repeats."""
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else map(str, text))]
    names = [n for n in names if n]
    if not names:
        raise SourceError(f"{flag}: no split named")
    if len(set(names)) != len(names):
        raise SourceError(f"{flag} {text}: a split is named twice")
    return names


@dataclass
class DataSource:
    """The data flags of one run; ``check`` them against the files, then ``load`` split by split."""

    dataset: str = "shapes"
    data_root: str | None = None
    dataset_name: str | None = None
    split_by: str | None = None
    image_dir: str | None = None
    hf_path: str | None = None
    hf_name: str | None = None
    hf_columns: dict[str, str] = field(default_factory=dict)
    hf_box_format: str = "xywh"
    hf_split_names: dict[str, str] = field(default_factory=dict)
    on_bad_record: str = "raise"
    data_seed: int = 0
    cache_dir: str | None = None
    _hf_data: Any = field(default=None, repr=False, compare=False)
    _shapes: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> DataSource:
        """From the parsed flags (``vars(args)``): checks the mode, the names and the flags' syntax, not the files.

        ``split_by`` None becomes the dataset's standard one, ``hf_box_format`` None ``xywh``.
        """
        dataset = flags.get("dataset") or "shapes"
        if dataset not in DATASETS:
            raise SourceError(f"--dataset {dataset}: choose from {', '.join(DATASETS)}")
        given = [f for f in SOURCE_FLAGS if flags.get(f) not in (None, "", {})]
        foreign = [f for f in given if f not in MODE_FLAGS[dataset]]
        if foreign:
            owners = {f: [m for m, fs in MODE_FLAGS.items() if f in fs] for f in foreign}
            detail = "; ".join(f"--{f} is read by --dataset {' / '.join(owners[f])}" for f in foreign)
            raise SourceError(f"--dataset {dataset} reads no {', '.join('--' + f for f in foreign)} ({detail}): "
                              "drop it or pick that --dataset")
        source = cls(
            dataset=dataset, data_root=flags.get("data_root"), dataset_name=flags.get("dataset_name"),
            split_by=flags.get("split_by"), image_dir=flags.get("image_dir"), hf_path=flags.get("hf_path"),
            hf_name=flags.get("hf_name"),
            hf_columns=parse_mapping(flags.get("hf_columns"), "--hf_columns", HF_COLUMN_KEYS),
            hf_box_format=flags.get("hf_box_format") or "xywh",
            hf_split_names=parse_mapping(flags.get("hf_split_names"), "--hf_split_names"),
            on_bad_record=flags.get("on_bad_record") or "raise", data_seed=flags.get("data_seed") or 0,
            cache_dir=flags.get("cache_dir"),
        )
        source._check_names()
        return source

    # ------------------------------------------------------------------------------------------------ names
    def _check_names(self) -> None:
        if self.dataset in ("refer", "transvg") and not self.data_root:
            where = ("the folder holding refcoco/, refcoco+/, refcocog/" if self.dataset == "refer"
                     else "TransVG's data/ folder, holding unc/, unc+/, gref/, gref_umd/, referit/, flickr/")
            raise SourceError(f"--dataset {self.dataset} needs --data_root ({where})")
        if self.dataset == "refer":
            if self.dataset_name not in REFER_SPLIT_BY:
                raise SourceError(f"--dataset_name {self.dataset_name}: --dataset refer reads "
                                  f"{', '.join(REFER_SPLIT_BY)}")
            self.split_by = self.split_by or REFER_SPLIT_BY[self.dataset_name][0]
            if self.split_by not in REFER_SPLIT_BY[self.dataset_name]:
                pairs = "; ".join(f"{name}: {', '.join(splits)}" for name, splits in REFER_SPLIT_BY.items())
                raise SourceError(f"--split_by {self.split_by}: {self.dataset_name} has no {self.split_by} split "
                                  f"(the refer API's files, --dataset_name: --split_by: {pairs})")
        if self.dataset == "transvg":
            if self.dataset_name not in TRANSVG_NAMES:
                raise SourceError(f"--dataset_name {self.dataset_name}: --dataset transvg reads "
                                  f"{', '.join(TRANSVG_NAMES)}")
            if not self.image_dir:
                raise SourceError("--dataset transvg needs --image_dir (the images its split files name: COCO "
                                  "train2014 for unc/unc+/gref/gref_umd, SAIAPR for referit, Flickr30k for flickr)")
        if self.dataset == "hf":
            if not self.hf_path:
                raise SourceError("--dataset hf needs --hf_path (a Hub dataset id or a local folder)")
            if self.hf_box_format not in BOX_FORMATS:
                raise SourceError(f"--hf_box_format {self.hf_box_format}: choose from {', '.join(BOX_FORMATS)}")

    def standard_splits(self) -> tuple[str, tuple[str, ...]]:
        """The training split and the evaluation splits of this dataset (``STANDARD_EVAL_SPLITS``)."""
        key = (self.dataset, self.dataset_name if self.dataset in ("refer", "transvg") else None,
               self.split_by if self.dataset == "refer" else None)
        return "train", STANDARD_EVAL_SPLITS[key]

    def describe(self) -> str:
        """One line naming the data, for results.json and the results table."""
        if self.dataset == "shapes":
            return f"shapes benchmark (seed {self.data_seed})"
        if self.dataset == "refer":
            return f"{self.dataset_name} ({self.split_by}) from the refer API files in {self.data_root}"
        if self.dataset == "transvg":
            return f"TransVG split files {self.dataset_name} in {self.data_root}"
        return f"Hugging Face dataset {self.hf_path}" + (f" ({self.hf_name})" if self.hf_name else "")

    # ------------------------------------------------------------------------------------------------ files
    def check(self, splits: Mapping[str, Sequence[str]]) -> None:
        """Check the files hold every split of ``splits`` (flag -> split names), before anything loads.

        ``SourceError`` names the flag, the file and what it holds (for Hub data also the columns and, for a box
        that does not fit the declared ``--hf_box_format``, the row).
        """
        if self.dataset == "shapes":
            for flag, names in splits.items():
                for name in names:
                    if name not in SHAPES_SPLITS:
                        raise SourceError(f"{flag} {name}: the shapes benchmark has the splits "
                                          f"{', '.join(SHAPES_SPLITS)}")
            return
        if self.dataset in ("refer", "transvg"):
            if not Path(self.data_root).is_dir():
                raise SourceError(f"--data_root {self.data_root}: no such folder")
            if self.image_dir is not None and not Path(self.image_dir).is_dir():
                raise SourceError(f"--image_dir {self.image_dir}: no such folder")
        held = {"refer": self._refer_splits, "transvg": self._transvg_splits, "hf": self._hf_splits}[self.dataset]()
        for flag, names in splits.items():
            for name in names:
                source_name = self.hf_split_names.get(name, name) if self.dataset == "hf" else name
                if source_name not in held:
                    raise SourceError(self._missing_split(flag, name, source_name, held))
        if self.dataset == "hf":
            for name in dict.fromkeys(n for names in splits.values() for n in names):
                self._check_hf_split(name)

    def _missing_split(self, flag: str, name: str, source_name: str, held: Mapping[str, int | None]) -> str:
        listed = ", ".join(split if count is None else f"{split} ({count})" for split, count in held.items())
        if self.dataset == "refer":
            return (f"{flag} {name}: {self._refs_path()} holds no ref of split {name!r}; its splits (refs each): "
                    f"{listed}")
        if self.dataset == "transvg":
            folder = Path(self.data_root) / self.dataset_name
            return (f"{flag} {name}: no {folder / f'{self.dataset_name}_{name}.pth'}; the splits of the files in "
                    f"{folder}: {listed}")
        mapped = f" (mapped by --hf_split_names to {source_name!r})" if source_name != name else ""
        return (f"{flag} {name}: {self.hf_path} has no split {source_name!r}{mapped}; its splits (rows each): "
                f"{listed}; map ours to theirs with --hf_split_names, e.g. val=validation,testA=test_a")

    def _refs_path(self) -> Path:
        return Path(self.data_root) / self.dataset_name / f"refs({self.split_by}).p"

    def _refer_splits(self) -> dict[str, int]:
        from peft_m2ist.data.safe_pickle import load_refs_pickle

        refs_path = self._refs_path()
        folder = refs_path.parent
        if not refs_path.is_file():
            files = sorted(p.name for p in folder.glob("refs(*).p")) if folder.is_dir() else []
            raise SourceError(f"--data_root {self.data_root}: {refs_path} not found (refs files in {folder}: "
                              f"{files or 'none'}); --data_root is the folder holding {self.dataset_name}/")
        if not (folder / "instances.json").is_file():
            raise SourceError(f"--data_root {self.data_root}: {folder / 'instances.json'} not found (the COCO "
                              "instances file that comes with the refs file)")
        image_dir = Path(self.image_dir) if self.image_dir else Path(self.data_root) / "images"
        if not image_dir.is_dir():
            raise SourceError(f"--image_dir: {image_dir} not found (the COCO train2014 images; default "
                              "{data_root}/images)")
        refs = load_refs_pickle(refs_path)
        if not isinstance(refs, list):
            raise SourceError(f"--data_root {self.data_root}: {refs_path} holds a {type(refs).__name__}, not a "
                              "list of refs")
        return dict(sorted(Counter(str(ref.get("split")) for ref in refs if isinstance(ref, dict)).items()))

    def _transvg_splits(self) -> dict[str, int | None]:
        folder = Path(self.data_root) / self.dataset_name
        prefix = f"{self.dataset_name}_"
        files = sorted(folder.glob(f"{prefix}*.pth")) if folder.is_dir() else []
        if not files:
            families = sorted(p.name for p in Path(self.data_root).iterdir() if p.is_dir() and any(
                p.glob(f"{p.name}_*.pth")))
            raise SourceError(f"--dataset_name {self.dataset_name}: no {folder}/{prefix}*.pth; the split-file "
                              f"folders in --data_root {self.data_root}: {families or 'none'}")
        return {p.name[len(prefix):-len(".pth")]: None for p in files}

    # --------------------------------------------------------------------------------------------- Hub data
    def hf_data(self):
        """The Hub dataset (a ``DatasetDict``), opened once: a ``save_to_disk`` folder, else ``load_dataset``."""
        if self._hf_data is None:
            from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

            path = self.hf_path
            saved = os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                                for f in ("dataset_dict.json", "state.json"))
            if saved and self.hf_name:
                raise SourceError(f"--hf_name {self.hf_name}: {path} is a save_to_disk folder, which has no "
                                  "configurations: drop --hf_name")
            try:
                data = load_from_disk(path) if saved else load_dataset(path, self.hf_name)
            except (FileNotFoundError, ValueError, ConnectionError) as error:
                raise SourceError(f"--hf_path {path}: cannot open it ({type(error).__name__}: {error})") from error
            if isinstance(data, Dataset):
                data = DatasetDict({"train": data})
            self._hf_data = data
        return self._hf_data

    def _hf_splits(self) -> dict[str, int]:
        return {name: len(split) for name, split in sorted(self.hf_data().items())}

    def hf_column(self, key: str) -> str | None:
        """The source column of ``key`` (``--hf_columns``; ``image``, ``bbox``, ``sentences`` by default)."""
        return self.hf_columns.get(key, key if key in ("image", "bbox", "sentences") else None)

    def _check_hf_split(self, split: str) -> None:
        from datasets import Image, LargeList, List, Sequence, Value

        source_name = self.hf_split_names.get(split, split)
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

        image, bbox, sentences = (features[self.hf_column(k)] for k in ("image", "bbox", "sentences"))
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
        self._check_hf_boxes(data, where)

    def _check_hf_boxes(self, data, where: str) -> None:
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
        """The records of ``split`` and the reader's report (skipped records per reason, with ``on_bad_record``)."""
        if self.dataset == "shapes":
            from peft_m2ist.data.benchmark import load_shapes_benchmark

            if self._shapes is None:
                self._shapes = load_shapes_benchmark(seed=self.data_seed, cache_dir=self.cache_dir)
            data = self._shapes[split]
            return LoadResult(data, LoadReport(source=f"shapes benchmark [{split}]", kept=len(data)))
        if self.dataset == "refer":
            from peft_m2ist.data.refer import load_refer

            return load_refer(self.data_root, self.dataset_name, self.split_by, split, self.image_dir,
                              on_error=self.on_bad_record)
        if self.dataset == "transvg":
            from peft_m2ist.data.transvg import load_transvg

            return load_transvg(self.data_root, self.dataset_name, split, self.image_dir,
                                on_error=self.on_bad_record)
        from peft_m2ist.data.hf import load_hf_rec

        result = load_hf_rec(self.hf_data(), split, split_names=self.hf_split_names, box_format=self.hf_box_format,
                           image_column=self.hf_column("image"), bbox_column=self.hf_column("bbox"),
                           sentences_column=self.hf_column("sentences"),
                           phrase_type_column=self.hf_column("phrase_type"),
                           image_id_column=self.hf_column("image_id"), on_error=self.on_bad_record)
        result.report.source = f"{self.hf_path} [{self.hf_split_names.get(split, split)}]"
        return result


def load_report(report: LoadReport) -> dict[str, Any]:
    """A reader's report as JSON: the file, records kept, and records skipped per reason."""
    return {"source": report.source, "kept": report.kept, "skipped": dict(sorted(report.skipped.items())),
            "num_skipped": report.num_skipped}
