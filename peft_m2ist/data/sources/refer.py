"""``--dataset refer``: RefCOCO, RefCOCO+ and RefCOCOg from the refer API's files (``peft_m2ist.data.refer``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft_m2ist.data.records import LoadResult
from peft_m2ist.data.sources.base import FileSource, SourceError, register

REFER_SPLIT_BY: dict[str, tuple[str, ...]] = {
    "refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google"),
}
"""The refer API's annotation files: ``refs({split_by}).p`` of each dataset (the first is the standard one)."""


@register
@dataclass
class ReferSource(FileSource):
    """``DATA_ROOT/{dataset_name}/refs({split_by}).p`` and ``instances.json``; images in ``--image_dir`` (default
    ``DATA_ROOT/images``)."""

    kind = "refer"
    flags = ("data_root", "dataset_name", "split_by", "image_dir")
    standard_eval_splits = {
        ("refcoco", "unc"): ("val", "testA", "testB"),
        ("refcoco+", "unc"): ("val", "testA", "testB"),
        ("refcocog", "umd"): ("val", "test"),
        ("refcoco", "google"): ("val",),
        ("refcocog", "google"): ("val",),
    }
    folder_hint = "the folder holding refcoco/, refcoco+/, refcocog/"

    split_by: str | None = None

    @classmethod
    def from_kind_flags(cls, flags: Mapping[str, Any]) -> ReferSource:
        return cls(on_bad_record=flags.get("on_bad_record") or "raise", data_root=flags.get("data_root"),
                   dataset_name=flags.get("dataset_name"), image_dir=flags.get("image_dir"),
                   split_by=flags.get("split_by"))

    def check_names(self) -> None:
        """``--dataset_name`` one of ``REFER_SPLIT_BY``, ``--split_by`` (default its first) one of its files."""
        super().check_names()
        if self.dataset_name not in REFER_SPLIT_BY:
            raise SourceError(f"--dataset_name {self.dataset_name}: --dataset refer reads {', '.join(REFER_SPLIT_BY)}")
        self.split_by = self.split_by or REFER_SPLIT_BY[self.dataset_name][0]
        if self.split_by not in REFER_SPLIT_BY[self.dataset_name]:
            pairs = "; ".join(f"{name}: {', '.join(splits)}" for name, splits in REFER_SPLIT_BY.items())
            raise SourceError(f"--split_by {self.split_by}: {self.dataset_name} has no {self.split_by} split "
                              f"(the refer API's files, --dataset_name: --split_by: {pairs})")

    def standard_key(self) -> tuple[str | None, str | None]:
        return self.dataset_name, self.split_by

    def describe(self) -> str:
        return f"{self.dataset_name} ({self.split_by}) from the refer API files in {self.data_root}"

    def refs_path(self) -> Path:
        return Path(self.data_root) / self.dataset_name / f"refs({self.split_by}).p"

    def held_splits(self) -> dict[str, int | None]:
        """The refs of each split in the refs pickle (read with the restricted unpickler, as the reader does)."""
        from peft_m2ist.data.safe_pickle import load_refs_pickle

        refs_path = self.refs_path()
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

    def missing_split(self, flag: str, name: str, held: Mapping[str, int | None]) -> str:
        return (f"{flag} {name}: {self.refs_path()} holds no ref of split {name!r}; its splits (refs each): "
                f"{self.listed(held)}")

    def load(self, split: str) -> LoadResult:
        from peft_m2ist.data.refer import load_refer

        return load_refer(self.data_root, self.dataset_name, self.split_by, split, self.image_dir,
                          on_error=self.on_bad_record)
