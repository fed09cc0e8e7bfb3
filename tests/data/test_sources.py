"""peft_m2ist.data.sources: one class per `--dataset` kind in a registry; the `--hf_columns` key `phrase=`."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from peft_m2ist.data.records import LoadReport, LoadResult
from peft_m2ist.data.sample_photos import sample_hf_dataset
from peft_m2ist.data.sources import (
    DATASETS,
    SOURCE_FLAGS,
    SOURCES,
    STANDARD_EVAL_SPLITS,
    DataSource,
    HFSource,
    ReferSource,
    ShapesSource,
    SourceError,
    TransVGSource,
    parse_hf_columns,
    register,
    source_flags,
)


def test_each_kind_is_one_registered_class():
    assert {"shapes": ShapesSource, "refer": ReferSource, "transvg": TransVGSource, "hf": HFSource} == SOURCES
    assert DATASETS == ("shapes", "refer", "transvg", "hf")
    assert STANDARD_EVAL_SPLITS[("refer", "refcocog", "umd")] == ("val", "test")
    assert STANDARD_EVAL_SPLITS[("transvg", "referit", None)] == ("val", "test")
    assert STANDARD_EVAL_SPLITS[("shapes", None, None)] == STANDARD_EVAL_SPLITS[("hf", None, None)] == ("val",)
    source = DataSource.from_flags({"dataset": "refer", "data_root": "r", "dataset_name": "refcocog"})
    assert isinstance(source, ReferSource) and (source.dataset, source.split_by) == ("refer", "umd")
    assert source.standard_splits() == ("train", ("val", "test"))
    assert isinstance(DataSource.from_flags({}), ShapesSource)


def test_a_fifth_kind_is_one_class(monkeypatch):
    """Registered, it is a `--dataset` value with its own flag; the other kinds refuse that flag, and it theirs."""
    monkeypatch.setattr("peft_m2ist.data.sources.base.SOURCES", dict(SOURCES))

    @register
    @dataclass
    class ListSource(DataSource):
        kind = "list"
        flags = ("list_rows",)
        standard_eval_splits = {(None, None): ("val",)}
        list_rows: int = 0

        @classmethod
        def from_kind_flags(cls, flags):
            return cls(list_rows=int(flags.get("list_rows") or 0))

        def held_splits(self):
            return {"train": self.list_rows, "val": self.list_rows}

        def missing_split(self, flag, name, held):
            return f"{flag} {name}: the list holds {self.listed(held)}"

        def load(self, split):
            return LoadResult(None, LoadReport(source=f"list [{split}]", kept=self.list_rows))

    source = DataSource.from_flags({"dataset": "list", "list_rows": "3"})
    assert isinstance(source, ListSource) and source.standard_splits() == ("train", ("val",))
    with pytest.raises(SourceError, match=r"--eval_splits test: the list holds train \(3\), val \(3\)"):
        source.check({"--train_split": ["train"], "--eval_splits": ["val", "test"]})
    assert "list_rows" in source_flags() and "list_rows" not in SOURCE_FLAGS  # the module-level tuple: built-ins
    with pytest.raises(SourceError, match="--dataset shapes reads no --list_rows"):
        DataSource.from_flags({"dataset": "shapes", "list_rows": "3"})
    with pytest.raises(SourceError, match=r"--dataset list reads no --hf_path \(--hf_path is read by --dataset hf\)"):
        DataSource.from_flags({"dataset": "list", "hf_path": "x"})


def test_hf_columns_phrase_is_another_name_for_sentences(tmp_path):
    """Issue #19 wrote `--hf_columns phrase=COLUMN`: the same as `sentences=COLUMN`."""
    assert parse_hf_columns("image=img,phrase=refs") == {"image": "img", "sentences": "refs"}
    assert parse_hf_columns({"phrase": "refs"}) == parse_hf_columns("sentences=refs")
    with pytest.raises(SourceError, match="sentences= and phrase= name the same column key: give one"):
        parse_hf_columns("phrase=a,sentences=b")
    data = sample_hf_dataset()
    data = data.rename_column("sentences", "expressions")
    data.save_to_disk(str(tmp_path / "hf"))
    flags = {"dataset": "hf", "hf_path": str(tmp_path / "hf"), "hf_split_names": "val=validation"}
    with pytest.raises(SourceError, match=r"--hf_columns sentences=sentences: .* has no column 'sentences'"):
        DataSource.from_flags(flags).check({"--eval_splits": ["val"]})
    source = DataSource.from_flags({**flags, "hf_columns": "phrase=expressions"})
    source.check({"--eval_splits": ["val"]})
    by_alias = source.load("val").dataset
    by_key = DataSource.from_flags({**flags, "hf_columns": "sentences=expressions"}).load("val").dataset
    assert len(by_alias) == len(by_key) > 0 and by_alias["phrase"] == by_key["phrase"]
