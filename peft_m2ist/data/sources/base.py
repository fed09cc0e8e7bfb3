"""The registry of ``--dataset`` kinds and what every kind shares: ``DataSource`` and its checks.

``DataSource.from_flags`` picks the registered class of ``--dataset`` (``SOURCES``; a class joins it with
``@register``), refuses another kind's flags, and builds it from the parsed flags. Each kind says which flags it
reads (``flags``), its standard splits (``standard_eval_splits``), how its names are checked (``check_names``), which
splits its files hold (``held_splits``), what to say of a missing one (``missing_split``) and how to ``load`` one.
``FileSource`` is what the kinds read from a ``--data_root`` folder (refer, transvg) share.

Every problem raises ``SourceError``, a ``ValueError`` whose message starts with the flag to fix and names the file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from peft_m2ist.data.records import LoadReport, LoadResult

SOURCES: dict[str, type[DataSource]] = {}
"""``--dataset`` kind -> its ``DataSource`` class, in the order the kinds registered."""


class SourceError(ValueError):
    """A data flag that does not fit the files; the message starts with the flag."""


def register(source_class: type[DataSource]) -> type[DataSource]:
    """Class decorator: ``source_class`` is the ``--dataset`` kind ``source_class.kind``."""
    SOURCES[source_class.kind] = source_class
    return source_class


def source_flags() -> tuple[str, ...]:
    """Every kind's source flags, each once, in registration order."""
    return tuple(dict.fromkeys(flag for source_class in SOURCES.values() for flag in source_class.flags))


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
    """The data flags of one run of one ``--dataset`` kind; ``check`` them against the files, then ``load`` split by
    split. Subclasses are the kinds (``@register``)."""

    kind: ClassVar[str]
    """The ``--dataset`` value."""
    flags: ClassVar[tuple[str, ...]] = ()
    """The source flags this kind reads; giving another kind's is an error."""
    standard_eval_splits: ClassVar[dict[tuple[str | None, str | None], tuple[str, ...]]] = {}
    """(``--dataset_name``, ``--split_by``) -> the default ``--eval_splits`` (the splits papers report; the best
    adapter is chosen on the first); None where the kind has no such flag."""

    on_bad_record: str = "raise"

    @property
    def dataset(self) -> str:
        """The ``--dataset`` kind."""
        return self.kind

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> DataSource:
        """From the parsed flags (``vars(args)``): checks the kind, the names and the flags' syntax, not the files."""
        dataset = flags.get("dataset") or "shapes"
        if dataset not in SOURCES:
            raise SourceError(f"--dataset {dataset}: choose from {', '.join(SOURCES)}")
        source_class = SOURCES[dataset]
        foreign = [f for f in source_flags() if flags.get(f) not in (None, "", {}) and f not in source_class.flags]
        if foreign:
            owners = {f: [kind for kind, c in SOURCES.items() if f in c.flags] for f in foreign}
            detail = "; ".join(f"--{f} is read by --dataset {' / '.join(owners[f])}" for f in foreign)
            raise SourceError(f"--dataset {dataset} reads no {', '.join('--' + f for f in foreign)} ({detail}): "
                              "drop it or pick that --dataset")
        source = source_class.from_kind_flags(flags)
        source.check_names()
        return source

    @classmethod
    def from_kind_flags(cls, flags: Mapping[str, Any]) -> DataSource:
        """This kind from the parsed flags (``from_flags`` has checked that no other kind's flag is given)."""
        raise NotImplementedError

    def check_names(self) -> None:
        """Check the names the flags give (no file read); fill the kind's defaults."""

    def standard_key(self) -> tuple[str | None, str | None]:
        """This run's key of ``standard_eval_splits``."""
        return None, None

    def standard_splits(self) -> tuple[str, tuple[str, ...]]:
        """The training split and the evaluation splits of this dataset (``standard_eval_splits``)."""
        return "train", self.standard_eval_splits[self.standard_key()]

    def describe(self) -> str:
        """One line naming the data, for results.json and the results table."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ files
    def check(self, splits: Mapping[str, Sequence[str]]) -> None:
        """Check the files hold every split of ``splits`` (flag -> split names), before anything loads.

        ``SourceError`` names the flag, the file and what it holds (``check_split`` adds a kind's own checks).
        """
        held = self.held_splits()
        for flag, names in splits.items():
            for name in names:
                if self.source_split(name) not in held:
                    raise SourceError(self.missing_split(flag, name, held))
        for name in dict.fromkeys(n for names in splits.values() for n in names):
            self.check_split(name)

    def held_splits(self) -> dict[str, int | None]:
        """The splits the files hold, with their size where known (None where not)."""
        raise NotImplementedError

    def source_split(self, split: str) -> str:
        """The files' name of our ``split``."""
        return split

    def missing_split(self, flag: str, name: str, held: Mapping[str, int | None]) -> str:
        """The message of a ``flag`` naming a split ``name`` that the files do not hold."""
        raise NotImplementedError

    def check_split(self, split: str) -> None:
        """A kind's checks of one split the files hold (none by default)."""

    @staticmethod
    def listed(held: Mapping[str, int | None]) -> str:
        """``held`` as ``name (count), ...``."""
        return ", ".join(split if count is None else f"{split} ({count})" for split, count in held.items())

    # ---------------------------------------------------------------------------------------------- loading
    def load(self, split: str) -> LoadResult:
        """The records of ``split`` and the reader's report (skipped records per reason, with ``on_bad_record``)."""
        raise NotImplementedError


@dataclass
class FileSource(DataSource):
    """A kind read from files under ``--data_root`` (``--dataset_name`` picks them) with images in ``--image_dir``."""

    folder_hint: ClassVar[str] = ""
    """What ``--data_root`` holds, for the message when it is missing."""

    data_root: str | None = None
    dataset_name: str | None = None
    image_dir: str | None = None

    def check_names(self) -> None:
        if not self.data_root:
            raise SourceError(f"--dataset {self.kind} needs --data_root ({self.folder_hint})")

    def check(self, splits: Mapping[str, Sequence[str]]) -> None:
        if not Path(self.data_root).is_dir():
            raise SourceError(f"--data_root {self.data_root}: no such folder")
        if self.image_dir is not None and not Path(self.image_dir).is_dir():
            raise SourceError(f"--image_dir {self.image_dir}: no such folder")
        super().check(splits)


def load_report(report: LoadReport) -> dict[str, Any]:
    """A reader's report as JSON: the file, records kept, and records skipped per reason."""
    return {"source": report.source, "kept": report.kept, "skipped": dict(sorted(report.skipped.items())),
            "num_skipped": report.num_skipped}
