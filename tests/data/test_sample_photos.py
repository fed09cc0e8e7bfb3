"""The sample photographs read back through every reader with the boxes and phrases written for them."""

from __future__ import annotations

import pytest

from peft_m2ist.data import load_hf_rec, load_refer, load_transvg
from peft_m2ist.data.sample_photos import (
    HF_SPLIT_NAMES,
    SAMPLE_PHOTOS,
    sample_hf_dataset,
    write_refer_layout,
    write_transvg_layout,
)


def expected(split: str) -> list[tuple[str, tuple[float, ...], str]]:
    return sorted((photo.file_name, obj.box, phrase) for photo in SAMPLE_PHOTOS if photo.split == split
                  for obj in photo.objects for phrase in obj.phrases)


def test_the_photos_are_real_rgb_images_and_every_box_lies_on_its_photo():
    assert len({photo.name for photo in SAMPLE_PHOTOS}) == 5
    for photo in SAMPLE_PHOTOS:
        image = photo.image()
        assert image.mode == "RGB" and min(image.size) >= 300
        for obj in photo.objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height, (photo.name, obj.box)
    phrases = [p for photo in SAMPLE_PHOTOS for obj in photo.objects for p in obj.phrases]
    assert any("left" in p for p in phrases) and any("right" in p for p in phrases)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_photos")
    write_transvg_layout(root / "transvg", "flickr")  # 3-item rows with xyxy boxes, as TransVG's loader reads
    return write_refer_layout(root / "refer"), write_transvg_layout(root / "transvg")


@pytest.mark.parametrize("split", ["train", "val", "testA", "testB"])
def test_every_reader_returns_the_written_records(layouts, split):
    refer_root, transvg_root = layouts
    hf = sample_hf_dataset()
    by_file = {photo.file_name: photo for photo in SAMPLE_PHOTOS}
    results = {
        "refer": load_refer(refer_root, "refcoco", "unc", split).dataset,
        "transvg": load_transvg(transvg_root, "unc", split).dataset,
        "flickr": load_transvg(transvg_root, "flickr", split).dataset,
        "hf": load_hf_rec(hf, split, split_names=HF_SPLIT_NAMES, box_format="xywh", image_id_column="file").dataset,
    }
    for reader, dataset in results.items():
        records = []
        for row in dataset:
            name = row["image_id"] if reader != "refer" else next(
                p.file_name for i, p in enumerate(SAMPLE_PHOTOS, start=1) if str(i) == row["image_id"])
            assert row["image"].size == by_file[name].image().size
            records.append((name, tuple(row["bbox"]), row["phrase"]))
        assert sorted(records) == expected(split), reader
