"""``--dataset transvg``: TransVG's split files (``peft_m2ist.data.transvg``), ``DATA_ROOT/{name}/{name}_{split}.pth``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft_m2ist.data.records import LoadResult
from peft_m2ist.data.sources.base import FileSource, SourceError, register

TRANSVG_NAMES: tuple[str, ...] = ("unc", "unc+", "gref", "gref_umd", "referit", "flickr")
"""TransVG's split-file families (``{name}/{name}_{split}.pth``)."""


@register
@dataclass
class TransVGSource(FileSource):
    """A family of TransVG split files; its images in ``--image_dir`` (required: TransVG keeps them apart)."""

    kind = "transvg"
    flags = ("data_root", "dataset_name", "image_dir")
    standard_eval_splits = {
        ("unc", None): ("val", "testA", "testB"),
        ("unc+", None): ("val", "testA", "testB"),
        ("gref", None): ("val",),
        ("gref_umd", None): ("val", "test"),
        ("referit", None): ("val", "test"),
        ("flickr", None): ("val", "test"),
    }
    folder_hint = "TransVG's data/ folder, holding unc/, unc+/, gref/, gref_umd/, referit/, flickr/"

    @classmethod
    def from_kind_flags(cls, flags: Mapping[str, Any]) -> TransVGSource:
        return cls(on_bad_record=flags.get("on_bad_record") or "raise", data_root=flags.get("data_root"),
                   dataset_name=flags.get("dataset_name"), image_dir=flags.get("image_dir"))

    def check_names(self) -> None:
        """``--dataset_name`` one of ``TRANSVG_NAMES``; ``--image_dir`` given."""
        super().check_names()
        if self.dataset_name not in TRANSVG_NAMES:
            raise SourceError(f"--dataset_name {self.dataset_name}: --dataset transvg reads {', '.join(TRANSVG_NAMES)}")
        if not self.image_dir:
            raise SourceError("--dataset transvg needs --image_dir (the images its split files name: COCO "
                              "train2014 for unc/unc+/gref/gref_umd, SAIAPR for referit, Flickr30k for flickr)")

    def standard_key(self) -> tuple[str | None, str | None]:
        return self.dataset_name, None

    def describe(self) -> str:
        return f"TransVG split files {self.dataset_name} in {self.data_root}"

    def held_splits(self) -> dict[str, int | None]:
        """The split files of the family (their sizes unread)."""
        folder = Path(self.data_root) / self.dataset_name
        prefix = f"{self.dataset_name}_"
        files = sorted(folder.glob(f"{prefix}*.pth")) if folder.is_dir() else []
        if not files:
            families = sorted(p.name for p in Path(self.data_root).iterdir() if p.is_dir() and any(
                p.glob(f"{p.name}_*.pth")))
            raise SourceError(f"--dataset_name {self.dataset_name}: no {folder}/{prefix}*.pth; the split-file "
                              f"folders in --data_root {self.data_root}: {families or 'none'}")
        return {p.name[len(prefix):-len(".pth")]: None for p in files}

    def missing_split(self, flag: str, name: str, held: Mapping[str, int | None]) -> str:
        folder = Path(self.data_root) / self.dataset_name
        return (f"{flag} {name}: no {folder / f'{self.dataset_name}_{name}.pth'}; the splits of the files in "
                f"{folder}: {self.listed(held)}")

    def load(self, split: str) -> LoadResult:
        from peft_m2ist.data.transvg import load_transvg

        return load_transvg(self.data_root, self.dataset_name, split, self.image_dir, on_error=self.on_bad_record)
