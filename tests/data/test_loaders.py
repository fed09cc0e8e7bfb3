"""Real-format readers on tiny fixtures written here: same records, clear errors, counted skips, safe pickles."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from PIL import Image

from peft_m2ist.data import (
    RecordError,
    UnsafePickleError,
    load_hf_rec,
    load_refer,
    load_transvg,
)
from peft_m2ist.data.safe_pickle import load_pth_list, load_refs_pickle, restricted_loads

IMAGE_SIZES = {"img_a.jpg": (64, 48), "img_b.jpg": (50, 80)}
IMAGE_IDS = {"img_a.jpg": 1, "img_b.jpg": 2}
# (image file, ann id, xyxy box, sentences, split)
OBJECTS = [
    ("img_a.jpg", 10, [4.0, 6.0, 24.0, 30.0], ["the man on the left", "left guy"], "val"),
    ("img_b.jpg", 20, [10.5, 20.25, 49.5, 79.0], ["tall woman"], "val"),
    ("img_a.jpg", 11, [30.0, 5.0, 60.0, 45.0], ["the dog"], "train"),
]
EXPECTED_VAL = sorted([
    ("img_a.jpg", (4.0, 6.0, 24.0, 30.0), "the man on the left"),
    ("img_a.jpg", (4.0, 6.0, 24.0, 30.0), "left guy"),
    ("img_b.jpg", (10.5, 20.25, 49.5, 79.0), "tall woman"),
])


def xywh(box):
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def write_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in IMAGE_SIZES.items():
        Image.new("RGB", size, (90, 120, 150)).save(folder / name, format="JPEG")
    return folder


def as_records(dataset) -> list[tuple]:
    return sorted(
        (Path(row["image"].filename).name if row["image"].filename else row["image_id"], tuple(row["bbox"]), row["phrase"])
        for row in dataset
    )


# ---- refer API -------------------------------------------------------------------------------
def write_refer(root: Path, objects=OBJECTS, annotation_boxes=None) -> Path:
    write_images(root / "images")
    base = root / "refcoco"
    base.mkdir(parents=True, exist_ok=True)
    refs, annotations = [], []
    for number, (file_name, ann_id, box, sentences, split) in enumerate(objects):
        refs.append({"ref_id": number, "ann_id": ann_id, "image_id": IMAGE_IDS[file_name], "split": split,
                     "category_id": 1, "sentences": [{"sent": s, "raw": s.capitalize(), "sent_id": 100 * number + k}
                                                     for k, s in enumerate(sentences)]})
        annotations.append({"id": ann_id, "image_id": IMAGE_IDS[file_name],
                            "bbox": (annotation_boxes or {}).get(ann_id, xywh(box)), "category_id": 1})
    images = [{"id": IMAGE_IDS[n], "file_name": n, "width": w, "height": h} for n, (w, h) in IMAGE_SIZES.items()]
    with open(base / "refs(unc).p", "wb") as file:
        pickle.dump(refs, file, protocol=2)
    (base / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


def test_refer_reads_one_record_per_sentence(tmp_path):
    result = load_refer(write_refer(tmp_path), "refcoco", "unc", "val")
    assert as_records(result.dataset) == EXPECTED_VAL
    assert result.report.kept == 3 and result.report.num_skipped == 0
    row = result.dataset[0]
    assert row["phrase_type"] == "unknown" and row["image"].mode == "RGB"
    assert row["image_id"] == "1" and row["ann_id"] == 10
    raw = load_refer(tmp_path, "refcoco", "unc", "val", sentence_key="raw").dataset
    assert "The man on the left" in raw["phrase"]


# ---- TransVG split files ------------------------------------------------------------------------
def write_transvg(root: Path, name: str = "unc", rows=None, legacy: bool = False) -> Path:
    write_images(root / "images")
    (root / name).mkdir(parents=True, exist_ok=True)
    if rows is None:
        rows = []
        for file_name, ann_id, box, sentences, split in OBJECTS:
            if split != "val":
                continue
            for sentence in sentences:
                if name == "referit":
                    rows.append((file_name, f"{ann_id}.mat", list(box), sentence))
                else:
                    rows.append((file_name, ann_id, xywh(box), sentence, [["man"], [], []]))
    torch.save(rows, root / name / f"{name}_val.pth", _use_new_zipfile_serialization=not legacy)
    return root


@pytest.mark.parametrize("name,legacy", [("unc", False), ("unc", True), ("gref_umd", False), ("referit", False)])
def test_transvg_reads_the_same_records(tmp_path, name, legacy):
    result = load_transvg(write_transvg(tmp_path, name, legacy=legacy), name, "val")
    assert as_records(result.dataset) == EXPECTED_VAL
    assert result.dataset[0]["image_id"] in IMAGE_SIZES


def test_transvg_plain_pickle_file_is_read_safely(tmp_path):
    write_transvg(tmp_path)
    rows = load_pth_list(tmp_path / "unc" / "unc_val.pth")
    with open(tmp_path / "unc" / "unc_val.pth", "wb") as file:
        pickle.dump(rows, file, protocol=4)
    assert as_records(load_transvg(tmp_path, "unc", "val").dataset) == EXPECTED_VAL


def test_transvg_unknown_family_needs_box_format(tmp_path):
    write_transvg(tmp_path, "mine")
    with pytest.raises(ValueError, match="box_format"):
        load_transvg(tmp_path, "mine", "val")
    assert as_records(load_transvg(tmp_path, "mine", "val", box_format="xywh").dataset) == EXPECTED_VAL


# ---- Hugging Face datasets ----------------------------------------------------------------------
def hf_split(root: Path, box_format: str = "xywh", sentences=None, boxes=None) -> Dataset:
    write_images(root / "images")
    val = [o for o in OBJECTS if o[4] == "val"]
    return Dataset.from_dict({
        "image": [Image.open(root / "images" / o[0]).copy() for o in val],
        "bbox": boxes or [xywh(o[2]) if box_format == "xywh" else o[2] for o in val],
        "sentences": sentences or [[{"sent": s, "raw": s} for s in o[3]] for o in val],
        "file": [o[0] for o in val],
    })


def test_hf_reads_the_same_records_with_split_mapping(tmp_path):
    data = DatasetDict({"validation": hf_split(tmp_path), "train": hf_split(tmp_path)})
    result = load_hf_rec(data, "val", split_names={"val": "validation"}, box_format="xywh", image_id_column="file")
    assert as_records(result.dataset) == EXPECTED_VAL
    xyxy = DatasetDict({"validation": hf_split(tmp_path, "xyxy")})
    same = load_hf_rec(xyxy, "val", split_names={"val": "validation"}, box_format="xyxy", image_id_column="file")
    assert as_records(same.dataset) == EXPECTED_VAL


def test_hf_reads_local_parquet_and_plain_sentence_lists(tmp_path):
    split = hf_split(tmp_path, sentences=[["the man on the left", "left guy"], ["tall woman"]])
    (tmp_path / "parquet").mkdir()
    split.to_parquet(str(tmp_path / "parquet" / "validation-00000-of-00001.parquet"))
    result = load_hf_rec(str(tmp_path / "parquet"), "val", split_names={"val": "validation"},
                         box_format="xywh", image_id_column="file")
    assert as_records(result.dataset) == EXPECTED_VAL


def test_hf_unknown_split_is_a_clear_error(tmp_path):
    data = DatasetDict({"validation": hf_split(tmp_path)})
    with pytest.raises(ValueError, match="validation"):
        load_hf_rec(data, "val", split_names={}, box_format="xywh")


# ---- malformed input: raise or count ------------------------------------------------------------
def refer_case(root: Path, reason: str) -> dict:
    """Write a refer fixture with one problem; return load_refer kwargs."""
    objects = [list(o) for o in OBJECTS]
    boxes = {}
    if reason == "empty_phrase":
        objects[0][3] = ["the man on the left", "  "]
    elif reason == "box_outside_image":
        boxes[20] = [10.5, 20.25, 39.0, 70.0]  # x1 = 49.5, y1 = 90.25 > 80
    elif reason == "degenerate_box":
        boxes[20] = [10.5, 20.25, 0.0, 10.0]
    write_refer(root, [tuple(o) for o in objects], boxes)
    if reason == "missing_image":
        os.remove(root / "images" / "img_b.jpg")
    if reason == "missing_key":
        with open(root / "refcoco" / "refs(unc).p", "rb") as file:
            refs = pickle.load(file)
        del refs[1]["ann_id"]
        with open(root / "refcoco" / "refs(unc).p", "wb") as file:
            pickle.dump(refs, file, protocol=2)
    return {}


REASONS = ["missing_key", "box_outside_image", "degenerate_box", "empty_phrase", "missing_image"]


@pytest.mark.parametrize("reason", REASONS)
def test_refer_malformed_raises_or_counts(tmp_path, reason):
    refer_case(tmp_path, reason)
    with pytest.raises(ValueError, match=rf"\[{reason}\].*refs\(unc\)\.p"):
        load_refer(tmp_path, "refcoco", "unc", "val")
    result = load_refer(tmp_path, "refcoco", "unc", "val", on_error="skip")
    assert dict(result.report.skipped) == {reason: 1}
    lost = "left guy" if reason == "empty_phrase" else "tall woman"
    expected = [r for r in EXPECTED_VAL if r[2] != lost]
    assert as_records(result.dataset) == expected


def transvg_rows(reason: str) -> list:
    good = [("img_a.jpg", 10, [4.0, 6.0, 20.0, 24.0], "the man on the left", [])]
    bad = {
        "malformed_record": ("img_a.jpg", 10, [4.0, 6.0, 20.0]),
        "box_outside_image": ("img_a.jpg", 10, [50.0, 6.0, 20.0, 24.0], "the man", []),
        "degenerate_box": ("img_a.jpg", 10, [4.0, 6.0, -1.0, 24.0], "the man", []),
        "empty_phrase": ("img_a.jpg", 10, [4.0, 6.0, 20.0, 24.0], "", []),
        "missing_image": ("nowhere.jpg", 10, [4.0, 6.0, 20.0, 24.0], "the man", []),
    }[reason]
    return [*good, bad]


@pytest.mark.parametrize("reason", ["malformed_record", "box_outside_image", "degenerate_box", "empty_phrase",
                                    "missing_image"])
def test_transvg_malformed_raises_or_counts(tmp_path, reason):
    write_transvg(tmp_path, rows=transvg_rows(reason))
    with pytest.raises(RecordError, match=rf"\[{reason}\].*unc_val\.pth row #1"):
        load_transvg(tmp_path, "unc", "val")
    result = load_transvg(tmp_path, "unc", "val", on_error="skip")
    assert dict(result.report.skipped) == {reason: 1} and result.report.kept == 1
    assert result.dataset["phrase"] == ["the man on the left"]


def test_hf_malformed_raises_or_counts(tmp_path):
    split = hf_split(tmp_path, boxes=[[4.0, 6.0, 20.0, 24.0], [10.0, 20.0, 45.0, 70.0]],
                     sentences=[[{"sent": "the man"}, {"sent": ""}], [{"sent": "tall woman"}]])
    data = DatasetDict({"val": split})
    with pytest.raises(ValueError, match=r"\[empty_phrase\].*row #0 sentence #1"):
        load_hf_rec(data, "val", split_names={}, box_format="xywh")
    result = load_hf_rec(data, "val", split_names={}, box_format="xywh", on_error="skip")
    assert dict(result.report.skipped) == {"box_outside_image": 1, "empty_phrase": 1}
    assert result.dataset["phrase"] == ["the man"]


def test_box_within_tolerance_is_clipped(tmp_path):
    write_transvg(tmp_path, rows=[("img_a.jpg", 1, [-0.5, 2.0, 64.8, 40.0], "all of it", [])])  # 64x48 image
    assert load_transvg(tmp_path, "unc", "val").dataset["bbox"] == [[0.0, 2.0, 64.0, 42.0]]


def test_bad_on_error_flag(tmp_path):
    write_transvg(tmp_path)
    with pytest.raises(ValueError, match="on_error"):
        load_transvg(tmp_path, "unc", "val", on_error="ignore")


# ---- pickles that would run code ----------------------------------------------------------------
class Exploit:
    """Unpickling this calls os.system: it must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_refs_pickle_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned"
    write_refer(tmp_path)
    with open(tmp_path / "refcoco" / "refs(unc).p", "wb") as file:
        pickle.dump([{"ref_id": 0, "payload": Exploit(marker)}], file, protocol=2)
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p.*(posix|os)\.system"):
        load_refer(tmp_path, "refcoco", "unc", "val")
    with pytest.raises(UnsafePickleError):
        restricted_loads(pickle.dumps(Exploit(marker)))
    assert not marker.exists()


def test_malicious_pth_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned"
    write_transvg(tmp_path)
    torch.save([("img_a.jpg", 0, [1, 2, 3, 4], "x", []), Exploit(marker)], tmp_path / "unc" / "unc_val.pth")
    with pytest.raises(UnsafePickleError, match=r"unc_val\.pth.*system"):
        load_transvg(tmp_path, "unc", "val")
    with open(tmp_path / "plain.pth", "wb") as file:
        pickle.dump([Exploit(marker)], file)
    with pytest.raises(UnsafePickleError):
        load_pth_list(tmp_path / "plain.pth")
    assert not marker.exists()


def test_refs_pickle_allows_plain_containers(tmp_path):
    path = tmp_path / "refs.p"
    content = [{"a": [1, 2.5, "x"], "b": (1, 2), "c": {3, 4}, "d": frozenset({5})}]
    with open(path, "wb") as file:
        pickle.dump(content, file, protocol=2)
    assert load_refs_pickle(path) == content
