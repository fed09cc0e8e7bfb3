"""peft_m2ist.training.atomic: JSON files and folders are replaced whole or not at all."""

from __future__ import annotations

import json
import os

import pytest

from peft_m2ist.training.atomic import fresh_tmp_dir, read_json, replace_dir, write_json


def test_json_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "best.json"
    write_json(path, {"accuracy": 0.5})

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"accuracy": 0.75, "history": list(range(10000))})
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["best.json"]  # the temporary file is gone


def test_json_that_cannot_be_encoded_leaves_the_old_file_unless_a_default_is_given(tmp_path):
    path = tmp_path / "sub" / "boxes.json"  # the parent folder is created
    write_json(path, [{"phrase": "a"}])
    with pytest.raises(TypeError):
        write_json(path, [{"phrase": object()}])
    assert json.loads(path.read_text()) == [{"phrase": "a"}]
    assert [p.name for p in path.parent.iterdir()] == ["boxes.json"]
    write_json(path, {"path": tmp_path}, default=str)
    assert path.read_text() == json.dumps({"path": str(tmp_path)}, indent=2) + "\n"


def test_a_damaged_json_file_is_named_in_the_error(tmp_path):
    path = tmp_path / "run_state.json"
    path.write_text('{"step": 1')
    with pytest.raises(ValueError, match=r"run_state\.json is not valid JSON .*damaged: start over"):
        read_json(path, hint=": start over")
    path.write_text('{"step": 1}')
    assert read_json(path) == {"step": 1}


def test_a_folder_is_replaced_by_a_complete_one(tmp_path):
    folder = tmp_path / "best_adapter"
    folder.mkdir()
    (folder / "old.bin").write_text("old")
    tmp = fresh_tmp_dir(folder)
    assert tmp == tmp_path / "best_adapter.tmp" and not tmp.exists()
    tmp.mkdir()
    (tmp / "new.bin").write_text("new")
    replace_dir(tmp, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_adapter"]
    assert [p.name for p in folder.iterdir()] == ["new.bin"]


def test_leftovers_of_an_interrupted_replace_are_cleared(tmp_path):
    """Killed after `folder` became `folder.old` and before `tmp` became `folder`; and a half-written `tmp`."""
    folder = tmp_path / "best_adapter"
    old = tmp_path / "best_adapter.old"
    old.mkdir()
    (old / "old.bin").write_text("old")
    half = fresh_tmp_dir(folder)
    half.mkdir()
    (half / "half.bin").write_text("half")
    tmp = fresh_tmp_dir(folder)
    assert not tmp.exists()  # the half-written folder is emptied away
    tmp.mkdir()
    (tmp / "new.bin").write_text("new")
    replace_dir(tmp, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_adapter"]
    assert [p.name for p in folder.iterdir()] == ["new.bin"]
