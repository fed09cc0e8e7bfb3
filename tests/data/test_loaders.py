"""Real-format readers on tiny fixtures written here: same records, clear errors, counted skips, safe pickles."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict, Features, List, Value
from datasets import Image as HFImage
from PIL import Image, ImageDraw

from peft_m2ist.data import (
    RecordError,
    UnsafePickleError,
    load_hf_rec,
    load_refer,
    load_transvg,
)
from peft_m2ist.data import image_files as image_files_module
from peft_m2ist.data.records import SplitNotFoundError
from peft_m2ist.data.safe_pickle import CorruptFileError, load_pth_list, load_refs_pickle, restricted_loads

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


def test_hf_empty_split_is_a_clear_error_naming_it(tmp_path):
    """A split of no row: in memory, and saved with `save_to_disk` (which `datasets` cannot read back: it raised a
    bare `IndexError` from its table concatenation)."""
    data = DatasetDict({"validation": hf_split(tmp_path).select([]), "train": hf_split(tmp_path)})
    with pytest.raises(ValueError, match=r"\[val\]: no records; its source split holds 0 rows"):
        load_hf_rec(data, "val", split_names={"val": "validation"}, box_format="xywh")
    data.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"saved: split 'validation' is empty \(no row, no data file\)"):
        load_hf_rec(str(tmp_path / "saved"), "train", split_names={}, box_format="xywh")


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


# ---- EXIF orientation: the record's box is on the object in the image the model gets -------------
STORED_SIZE = (200, 100)
OBJECT_XYXY = (120.0, 10.0, 190.0, 90.0)  # in the stored pixels


def write_oriented_jpeg(path: Path, orientation: int) -> Path:
    """A 200x100 grey JPEG with a red block at OBJECT_XYXY (stored frame), tagged with ``orientation``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", STORED_SIZE, (40, 40, 40))
    ImageDraw.Draw(image).rectangle([120, 10, 189, 89], fill=(230, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, format="JPEG", quality=95, exif=exif)
    with Image.open(path) as check:
        assert check.getexif().get(0x0112) == orientation
    return path


def assert_box_is_on_the_object(image: Image.Image, box) -> None:
    """``box`` (xyxy) is the tight box of the red block in ``image``, to JPEG ringing (2 px)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    ys, xs = np.nonzero((pixels[..., 0] > 150) & (pixels[..., 1] < 100))
    found = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert np.allclose(found, box, atol=2), f"object at {found} in the {image.size} image, record box {box}"


def stored_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:  # PIL alone does not apply the EXIF orientation
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_transvg_exif_oriented_image_keeps_its_box_on_the_object(tmp_path, orientation):
    path = write_oriented_jpeg(tmp_path / "images" / "photo.jpg", orientation)
    write_transvg(tmp_path, rows=[("photo.jpg", 1, xywh(OBJECT_XYXY), "the red block", [])])
    row = load_transvg(tmp_path, "unc", "val").dataset[0]
    assert row["image"].size == STORED_SIZE
    assert tuple(row["bbox"]) == OBJECT_XYXY
    assert_box_is_on_the_object(row["image"], row["bbox"])
    assert np.array_equal(np.asarray(row["image"]), stored_pixels(path))  # lossless, stored frame


def test_refer_exif_oriented_image_keeps_its_box_on_the_object(tmp_path):
    path = write_oriented_jpeg(tmp_path / "images" / "photo.jpg", 6)
    write_refer_layout(tmp_path, "photo.jpg", STORED_SIZE, xywh(OBJECT_XYXY))
    result = load_refer(tmp_path, "refcoco", "unc", "val")
    assert len(result.dataset) == 2
    for row in result.dataset:
        assert row["image"].size == STORED_SIZE and tuple(row["bbox"]) == OBJECT_XYXY
        assert_box_is_on_the_object(row["image"], row["bbox"])
        assert np.array_equal(np.asarray(row["image"]), stored_pixels(path))


def test_hf_exif_oriented_image_keeps_its_box_on_the_object(tmp_path):
    path = write_oriented_jpeg(tmp_path / "photo.jpg", 8)
    plain = tmp_path / "plain.jpg"
    Image.new("RGB", (64, 48), (90, 120, 150)).save(plain)
    data = Dataset.from_dict(
        {"image": [{"bytes": plain.read_bytes(), "path": None}, {"bytes": path.read_bytes(), "path": None}],
         "bbox": [[4.0, 6.0, 20.0, 24.0], xywh(OBJECT_XYXY)], "sentences": [["the blue"], ["the red block"]]},
        features=Features({"image": HFImage(), "bbox": List(Value("float64")), "sentences": List(Value("string"))}),
    )
    dataset = load_hf_rec(data, "val", split_names={}, box_format="xywh").dataset
    assert dataset[0]["image"].size == (64, 48)
    row = dataset[1]
    assert row["image"].size == STORED_SIZE and tuple(row["bbox"]) == OBJECT_XYXY
    assert_box_is_on_the_object(row["image"], row["bbox"])
    assert np.array_equal(np.asarray(row["image"]), stored_pixels(path))


def test_box_annotated_on_the_rotated_view_is_refused_with_a_hint(tmp_path):
    write_oriented_jpeg(tmp_path / "images" / "photo.jpg", 6)  # displayed 100x200
    write_transvg(tmp_path, rows=[("photo.jpg", 1, [10.0, 120.0, 70.0, 70.0], "the red block", [])])
    with pytest.raises(RecordError, match=r"\[box_outside_image\].*row #0.*EXIF-rotated 100x200 view"):
        load_transvg(tmp_path, "unc", "val")


# ---- refer API: every image header is read, once ------------------------------------------------
def write_refer_layout(root: Path, file_name: str, size: tuple[int, int], box_xywh, split: str = "val") -> Path:
    """A refer layout with one image (``size`` in instances.json) and one ref of two sentences."""
    base = root / "refcoco"
    base.mkdir(parents=True, exist_ok=True)
    refs = [{"ref_id": 0, "ann_id": 5, "image_id": 7, "split": split,
             "sentences": [{"sent": "the red block", "sent_id": 0}, {"sent": "red thing", "sent_id": 1}]}]
    with open(base / "refs(unc).p", "wb") as file:
        pickle.dump(refs, file, protocol=2)
    (base / "instances.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": file_name, "width": size[0], "height": size[1]}],
        "annotations": [{"id": 5, "image_id": 7, "bbox": box_xywh}],
    }))
    return root


@pytest.mark.parametrize("problem,reason,message", [
    ("garbage", "missing_image", r"img_b\.jpg is not a readable image"),
    ("resized", "image_size_mismatch", r"instances\.json gives the image as 50x80 but .*img_b\.jpg is 25x40.*resized"),
])
def test_refer_refuses_unreadable_or_resized_images(tmp_path, problem, reason, message):
    write_refer(tmp_path)
    image_b = tmp_path / "images" / "img_b.jpg"
    if problem == "garbage":
        image_b.write_bytes(b"this is not a JPEG")
    else:
        Image.new("RGB", (25, 40), (90, 120, 150)).save(image_b, format="JPEG")  # a half-size copy
    with pytest.raises(RecordError, match=rf"\[{reason}\].*refs\(unc\)\.p ref #1.*{message}"):
        load_refer(tmp_path, "refcoco", "unc", "val")
    result = load_refer(tmp_path, "refcoco", "unc", "val", on_error="skip")
    assert dict(result.report.skipped) == {reason: 1}
    assert as_records(result.dataset) == [r for r in EXPECTED_VAL if r[2] != "tall woman"]


def test_refer_size_mismatch_names_a_rotated_view(tmp_path):
    write_oriented_jpeg(tmp_path / "images" / "photo.jpg", 6)
    write_refer_layout(tmp_path, "photo.jpg", (100, 200), [10.0, 120.0, 70.0, 70.0])
    with pytest.raises(RecordError, match=r"\[image_size_mismatch\].*100x200.*200x100 \(stored; EXIF orientation 6\)"
                                          r".*EXIF-rotated view"):
        load_refer(tmp_path, "refcoco", "unc", "val")


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """The names of the image files `inspect_image` decodes during the test, one entry per decode."""
    opened: list[str] = []
    real = image_files_module.inspect_image

    def counting(file):
        opened.append(Path(file).name)
        return real(file)

    monkeypatch.setattr(image_files_module, "inspect_image", counting)
    return opened


def test_refer_reads_each_image_header_once(tmp_path, decoded):
    objects = [*OBJECTS, ("img_a.jpg", 12, [1.0, 1.0, 9.0, 9.0], ["the small thing"], "val")]
    write_refer(tmp_path, objects)
    assert len(load_refer(tmp_path, "refcoco", "unc", "val").dataset) == 4
    assert sorted(decoded) == ["img_a.jpg", "img_b.jpg"]


# ---- nothing kept: a clear error, never an empty dataset ---------------------------------------
def test_refer_wrong_split_names_the_splits_in_the_file(tmp_path):
    write_refer(tmp_path)
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p: no records; 0 refs have split 'testA'.*'train': 1, 'val': 2"):
        load_refer(tmp_path, "refcoco", "unc", "testA")


def test_refer_everything_skipped_is_an_error(tmp_path):
    write_refer(tmp_path)
    for name in IMAGE_SIZES:
        os.remove(tmp_path / "images" / name)
    with pytest.raises(ValueError, match=r"every record was skipped \(2: \{'missing_image': 2\}\)"):
        load_refer(tmp_path, "refcoco", "unc", "val", on_error="skip")


def test_transvg_wrong_split_lists_the_split_files(tmp_path):
    write_transvg(tmp_path)
    torch.save([], tmp_path / "unc" / "unc_testB.pth")
    with pytest.raises(SplitNotFoundError, match=r"unc_testA\.pth not found; splits of 'unc' in .*\['testB', 'val'\]") as error:
        load_transvg(tmp_path, "unc", "testA")
    assert isinstance(error.value, FileNotFoundError) and isinstance(error.value, ValueError)
    with pytest.raises(SplitNotFoundError, match=r"no folder .*gref.*families under .*\['unc'\]"):
        load_transvg(tmp_path, "gref", "val")


def test_transvg_empty_or_fully_skipped_split_is_an_error(tmp_path):
    write_transvg(tmp_path, rows=[])
    with pytest.raises(ValueError, match=r"unc_val\.pth: no records; .*holds 0 rows"):
        load_transvg(tmp_path, "unc", "val")
    write_transvg(tmp_path, rows=[("nowhere.jpg", 1, [1.0, 1.0, 5.0, 5.0], "x", [])])
    with pytest.raises(ValueError, match=r"every record was skipped .*missing_image.*on_error='raise'"):
        load_transvg(tmp_path, "unc", "val", on_error="skip")


def test_hf_empty_or_fully_skipped_split_is_an_error(tmp_path):
    split = hf_split(tmp_path, boxes=[[40.0, 6.0, 50.0, 24.0], [10.0, 20.0, 45.0, 70.0]])  # both outside
    data = DatasetDict({"validation": split, "train": split.select([])})
    with pytest.raises(ValueError, match=r"every record was skipped \(2: \{'box_outside_image': 2\}\)"):
        load_hf_rec(data, "val", split_names={"val": "validation"}, box_format="xywh", on_error="skip")
    with pytest.raises(ValueError, match=r"no records; its source split holds 0 rows .*\['train', 'validation'\]"):
        load_hf_rec(data, "train", split_names={}, box_format="xywh")


# ---- corrupt annotation files: errors that name the file ---------------------------------------
def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage", ["truncated_zip", "truncated_legacy", "truncated_pickle", "empty", "garbage"])
def test_corrupt_pth_names_the_file(tmp_path, damage):
    write_transvg(tmp_path, legacy=damage == "truncated_legacy")
    path = tmp_path / "unc" / "unc_val.pth"
    if damage == "truncated_pickle":
        rows = load_pth_list(path)
        with open(path, "wb") as file:
            pickle.dump(rows, file, protocol=4)
    if damage.startswith("truncated"):
        truncate(path, 0.6)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"hello, this is not a split file" * 4)
    with pytest.raises(CorruptFileError, match=r"unc_val\.pth: .*seems truncated or corrupt"):
        load_transvg(tmp_path, "unc", "val")


def test_corrupt_refer_files_name_the_file(tmp_path):
    write_refer(tmp_path)
    truncate(tmp_path / "refcoco" / "instances.json", 0.5)
    with pytest.raises(CorruptFileError, match=r"instances\.json: not readable as JSON .*seems truncated or corrupt"):
        load_refer(tmp_path, "refcoco", "unc", "val")
    write_refer(tmp_path)
    truncate(tmp_path / "refcoco" / "refs(unc).p", 0.5)
    with pytest.raises(CorruptFileError, match=r"refs\(unc\)\.p: .*seems truncated or corrupt"):
        load_refer(tmp_path, "refcoco", "unc", "val")


# ---- progress bars ------------------------------------------------------------------------------
def test_loaders_show_progress_unless_disabled(tmp_path, capsys):
    write_refer(tmp_path)
    write_transvg(tmp_path)
    data = DatasetDict({"val": hf_split(tmp_path)})
    was_enabled = datasets.is_progress_bar_enabled()
    try:
        datasets.enable_progress_bars()  # whatever HF_DATASETS_DISABLE_PROGRESS_BARS says
        capsys.readouterr()
        load_transvg(tmp_path, "unc", "val")
        load_refer(tmp_path, "refcoco", "unc", "val")
        load_hf_rec(data, "val", split_names={}, box_format="xywh")
        err = capsys.readouterr().err
        assert "unc_val.pth: 100%" in err and "3/3 [" in err
        assert "refcoco refs(unc): 100%" in err
        assert "dataset[val]: 100%" in err
        datasets.disable_progress_bars()
        load_transvg(tmp_path, "unc", "val")
        assert "unc_val.pth" not in capsys.readouterr().err
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()


# ---- damaged and unusual files: decoded once at load time, refused or counted, never a crash mid-epoch ------
BOMB_SIDE = 30000  # a header claiming 30000 x 30000 pixels: PIL's decompression-bomb guard


def damage(path: Path, problem: str) -> None:
    """Overwrite the image at ``path`` (50 x 80 px) with a damaged or unusual file of the same name."""
    if problem == "truncated_jpeg":
        noise = np.random.default_rng(0).integers(0, 256, (80, 50, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noise).save(buffer, format="JPEG", quality=95)
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 6 // 10])
    elif problem == "decompression_bomb":
        buffer = io.BytesIO()
        Image.new("L", (1, 1)).save(buffer, format="PNG")
        data = bytearray(buffer.getvalue())  # IHDR: length, type at 12, width and height at 16 and 20, CRC at 29
        data[16:24] = struct.pack(">II", BOMB_SIDE, BOMB_SIDE)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
        path.write_bytes(bytes(data))
    elif problem == "png16":
        Image.fromarray(np.full((80, 50), 32896, dtype=np.uint16)).save(path, format="PNG")  # 32896 / 257 = 128
    else:
        raise ValueError(problem)


def hf_bytes_split(root: Path) -> Dataset:
    """``hf_split`` with each image cell holding the file's own bytes (as a Hub upload stores them)."""
    val = [o for o in OBJECTS if o[4] == "val"]
    return Dataset.from_dict(
        {"image": [{"bytes": (root / "images" / o[0]).read_bytes(), "path": None} for o in val],
         "bbox": [xywh(o[2]) for o in val], "sentences": [o[3] for o in val]},
        features=Features({"image": HFImage(), "bbox": List(Value("float64")), "sentences": List(Value("string"))}),
    )


def load_damaged(reader: str, root: Path, problem: str, on_error: str = "raise"):
    """Write ``reader``'s fixture with img_b.jpg (the "tall woman" record, val) damaged, and load its val split."""
    if reader == "refer":
        write_refer(root)
    else:
        write_transvg(root)
    damage(root / "images" / "img_b.jpg", problem)
    if reader == "refer":
        return load_refer(root, "refcoco", "unc", "val", on_error=on_error)
    if reader == "transvg":
        return load_transvg(root, "unc", "val", on_error=on_error)
    return load_hf_rec(hf_bytes_split(root), "val", split_names={}, box_format="xywh", on_error=on_error)


READERS = ["refer", "transvg", "hf"]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("problem,message", [
    ("truncated_jpeg", "truncated"),
    ("decompression_bomb", "too large to decode safely|decompression bomb"),
])
def test_damaged_images_are_refused_naming_the_file_or_counted(tmp_path, reader, problem, message):
    where = {"refer": r"refs\(unc\)\.p ref #1.*img_b\.jpg", "transvg": r"unc_val\.pth row #2.*img_b\.jpg",
             "hf": r"row #1"}[reader]
    with pytest.raises(RecordError, match=rf"\[missing_image\].*{where}.*({message})"):
        load_damaged(reader, tmp_path / "raise", problem)
    result = load_damaged(reader, tmp_path / "skip", problem, on_error="skip")
    assert dict(result.report.skipped) == {"missing_image": 1}
    assert [r[2] for r in as_records(result.dataset)] == ["left guy", "the man on the left"]


@pytest.mark.parametrize("reader", READERS)
def test_16_bit_png_is_scaled_to_8_bits_not_whitened(tmp_path, reader):
    dataset = load_damaged(reader, tmp_path, "png16").dataset
    row = next(row for row in dataset if row["phrase"] == "tall woman")
    pixels = np.asarray(row["image"])
    assert row["image"].mode == "RGB" and pixels.shape == (80, 50, 3)
    assert np.all(pixels == 128), np.unique(pixels)  # convert("RGB") alone gives 255 everywhere


@pytest.mark.parametrize("reader", ["refer", "transvg"])  # an Arrow (HF) source cannot hold a lone surrogate
def test_a_phrase_with_a_lone_surrogate_is_refused_or_counted(tmp_path, reader):
    bad = "tall \ud800woman"
    if reader == "refer":
        objects = [(o[0], o[1], o[2], [bad] if o[3] == ["tall woman"] else o[3], o[4]) for o in OBJECTS]
        write_refer(tmp_path, objects)

        def load(on_error):
            return load_refer(tmp_path, "refcoco", "unc", "val", on_error=on_error)
    else:
        rows = [("img_a.jpg", 10, xywh(OBJECTS[0][2]), "left guy", []), ("img_b.jpg", 20, xywh(OBJECTS[1][2]), bad, [])]
        write_transvg(tmp_path, rows=rows)

        def load(on_error):
            return load_transvg(tmp_path, "unc", "val", on_error=on_error)
    with pytest.raises(RecordError, match=r"\[malformed_record\].*is not valid Unicode text \(surrogates not allowed"):
        load("raise")
    result = load("skip")
    assert dict(result.report.skipped) == {"malformed_record": 1}
    assert "tall woman" not in result.dataset["phrase"] and len(result.dataset) >= 1


def test_a_split_decodes_each_image_file_once_on_a_thread_pool(tmp_path, decoded):
    write_transvg(tmp_path)
    assert len(load_transvg(tmp_path, "unc", "val").dataset) == 3
    assert sorted(decoded) == ["img_a.jpg", "img_b.jpg"]
