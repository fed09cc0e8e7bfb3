"""Real photographs with referring expressions, for tests, examples and the demo, in every format the readers take.

The photographs are scikit-image's sample images (``skimage.data``, shipped inside the PyPI package, so nothing is
downloaded); the boxes and phrases were written for this project by looking at them: several expressions per
object, several objects per photo, left/right phrases. Boxes are ``[x0, y0, x1, y1]`` pixels on the stored image.

``write_refer_layout``, ``write_transvg_layout`` and ``sample_hf_dataset`` write them in the layouts
``load_refer``, ``load_transvg`` and ``load_hf_rec`` read (docs/data.md), split by photo as RefCOCO is.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class SampleObject:
    """One object of a photo: its box (``[x0, y0, x1, y1]`` pixels) and the phrases that name it."""

    box: tuple[float, float, float, float]
    phrases: tuple[str, ...]


@dataclass(frozen=True)
class SamplePhoto:
    """A scikit-image sample photograph (``skimage.data.<name>``), its split and its annotated objects."""

    name: str
    split: str
    objects: tuple[SampleObject, ...]
    size: tuple[int, int] | None = None
    """``(width, height)`` to resize the photograph to (boxes are given at that size); ``None``: as shipped."""
    copy: int | None = None
    """A copy number, for several files of one photo (``{name}_{copy:03d}.jpg``)."""

    @property
    def file_name(self) -> str:
        return f"{self.name}.jpg" if self.copy is None else f"{self.name}_{self.copy:03d}.jpg"

    def image(self) -> Image.Image:
        """The photograph as an RGB ``PIL.Image`` (greyscale samples are repeated over the channels)."""
        import skimage.data

        image = Image.fromarray(np.asarray(getattr(skimage.data, self.name)())).convert("RGB")
        return image if self.size is None or image.size == self.size else image.resize(self.size)

    def resized(self, width: int, height: int, copy: int | None = None) -> SamplePhoto:
        """The same photo at ``width x height`` pixels, its boxes scaled with it."""
        old_width, old_height = self.image().size
        sx, sy = width / old_width, height / old_height
        objects = tuple(SampleObject((o.box[0] * sx, o.box[1] * sy, o.box[2] * sx, o.box[3] * sy), o.phrases)
                        for o in self.objects)
        return replace(self, objects=objects, size=(width, height), copy=copy)


SAMPLE_PHOTOS: tuple[SamplePhoto, ...] = (
    SamplePhoto("astronaut", "train", (
        SampleObject((20.0, 15.0, 365.0, 512.0), ("the woman in the orange suit", "the smiling astronaut")),
        SampleObject((0.0, 0.0, 100.0, 500.0), ("the flag on the left", "american flag")),
        SampleObject((355.0, 0.0, 472.0, 280.0), ("the space shuttle model on the right", "the white shuttle")),
        SampleObject((275.0, 345.0, 500.0, 512.0), ("the helmet in the bottom right corner", "black helmet")),
    )),
    SamplePhoto("rocket", "train", (
        SampleObject((300.0, 125.0, 340.0, 410.0), ("the rocket in the middle", "white rocket")),
        SampleObject((0.0, 0.0, 90.0, 410.0), ("the tower on the far left", "left tower")),
        SampleObject((555.0, 0.0, 640.0, 427.0), ("the tower on the far right", "right tower")),
    )),
    SamplePhoto("coins", "val", (
        SampleObject((20.0, 33.0, 68.0, 77.0), ("the coin in the top left corner", "top left coin")),
        SampleObject((303.0, 12.0, 365.0, 98.0), ("the big coin in the top right corner",)),
        SampleObject((335.0, 248.0, 383.0, 290.0), ("the coin in the bottom right corner", "bottom right coin")),
    )),
    SamplePhoto("chelsea", "testA", (
        SampleObject((135.0, 85.0, 205.0, 150.0), ("the cat's eye on the left", "left eye")),
        SampleObject((295.0, 105.0, 345.0, 165.0), ("the eye on the right",)),
        SampleObject((240.0, 220.0, 295.0, 265.0), ("the pink nose", "cat nose")),
    )),
    SamplePhoto("coffee", "testB", (
        SampleObject((172.0, 18.0, 420.0, 305.0), ("the cup of coffee", "white and red cup")),
        SampleObject((325.0, 65.0, 425.0, 325.0), ("the spoon on the right", "silver spoon")),
        SampleObject((75.0, 70.0, 480.0, 390.0), ("the red saucer",)),
    )),
)
"""Five photographs, 16 objects, 28 expressions; splits ``train``, ``val``, ``testA``, ``testB``."""


def _photos(photos: Iterable[SamplePhoto] | None) -> tuple[SamplePhoto, ...]:
    return tuple(SAMPLE_PHOTOS if photos is None else photos)


def write_images(folder: str | Path, photos: Iterable[SamplePhoto] | None = None) -> Path:
    """Write each photo as ``{folder}/{name}.jpg`` (quality 95); returns ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for photo in _photos(photos):
        photo.image().save(folder / photo.file_name, format="JPEG", quality=95)
    return folder


def _xywh(box: tuple[float, float, float, float]) -> list[float]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def write_refer_layout(root: str | Path, dataset: str = "refcoco", split_by: str = "unc",
                       photos: Iterable[SamplePhoto] | None = None) -> Path:
    """The refer API layout: ``{root}/images/*.jpg``, ``{root}/{dataset}/refs({split_by}).p`` and
    ``{root}/{dataset}/instances.json`` (COCO ``xywh`` boxes). One ref per object; returns ``root``."""
    root = Path(root)
    photos = _photos(photos)
    write_images(root / "images", photos)
    refs, images, annotations = [], [], []
    for image_id, photo in enumerate(photos, start=1):
        width, height = photo.image().size
        images.append({"id": image_id, "file_name": photo.file_name, "width": width, "height": height})
        for obj in photo.objects:
            ann_id = len(annotations) + 1
            annotations.append({"id": ann_id, "image_id": image_id, "bbox": _xywh(obj.box), "category_id": 1})
            refs.append({
                "ref_id": len(refs), "ann_id": ann_id, "image_id": image_id, "split": photo.split, "category_id": 1,
                "sentences": [{"sent": phrase, "raw": phrase, "sent_id": 100 * len(refs) + k}
                              for k, phrase in enumerate(obj.phrases)],
            })
    base = root / dataset
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f"refs({split_by}).p", "wb") as file:
        pickle.dump(refs, file, protocol=2)
    (base / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


def write_transvg_layout(root: str | Path, name: str = "unc", photos: Iterable[SamplePhoto] | None = None) -> Path:
    """TransVG split files: ``{root}/images/*.jpg`` and ``{root}/{name}/{name}_{split}.pth``, one row per phrase
    (``(image_file, ann_id, box, phrase, attributes)``, ``xywh``; ``referit``: 4 items, ``xyxy``; ``flickr``:
    ``(image_file, box, phrase)``, ``xyxy``)."""
    import torch

    root = Path(root)
    photos = _photos(photos)
    write_images(root / "images", photos)
    rows: dict[str, list] = {}
    ann_id = 0
    for photo in photos:
        for obj in photo.objects:
            ann_id += 1
            for phrase in obj.phrases:
                if name == "flickr":
                    rows.setdefault(photo.split, []).append((photo.file_name, list(obj.box), phrase))
                elif name == "referit":
                    rows.setdefault(photo.split, []).append((photo.file_name, f"{ann_id}.mat", list(obj.box), phrase))
                else:
                    rows.setdefault(photo.split, []).append((photo.file_name, ann_id, _xywh(obj.box), phrase, []))
    (root / name).mkdir(parents=True, exist_ok=True)
    for split, split_rows in rows.items():
        torch.save(split_rows, root / name / f"{name}_{split}.pth")
    return root


HF_SPLIT_NAMES = {"train": "train", "val": "validation", "testA": "test_a", "testB": "test_b"}
"""Our split names -> the split names ``sample_hf_dataset`` uses (as uploads name them differently)."""


def sample_hf_dataset(photos: Iterable[SamplePhoto] | None = None):
    """A ``datasets.DatasetDict`` as a Hub REC upload looks: one row per object with ``image`` (JPEG bytes),
    ``bbox`` (``xywh`` pixels), ``sentences`` (a list of strings) and ``file``; splits named as in
    ``HF_SPLIT_NAMES``."""
    import io

    from datasets import Dataset, DatasetDict, Features, List, Value
    from datasets import Image as HFImage

    features = Features({"image": HFImage(), "bbox": List(Value("float64")), "sentences": List(Value("string")),
                         "file": Value("string")})
    columns: dict[str, dict[str, list]] = {}
    for photo in _photos(photos):
        buffer = io.BytesIO()
        photo.image().save(buffer, format="JPEG", quality=95)
        split = columns.setdefault(HF_SPLIT_NAMES.get(photo.split, photo.split),
                                   {"image": [], "bbox": [], "sentences": [], "file": []})
        for obj in photo.objects:
            split["image"].append({"bytes": buffer.getvalue(), "path": None})
            split["bbox"].append(_xywh(obj.box))
            split["sentences"].append(list(obj.phrases))
            split["file"].append(photo.file_name)
    return DatasetDict({name: Dataset.from_dict(data, features=features) for name, data in columns.items()})
