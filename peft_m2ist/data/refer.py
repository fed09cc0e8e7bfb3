"""Reader for the refer API layout (RefCOCO, RefCOCO+, RefCOCOg as distributed with ``refer``).

Layout::

    {root}/{dataset}/refs({split_by}).p   pickle: list of refs, each a dict with
                                          ref_id, ann_id, image_id, split, sentences=[{sent, raw, ...}]
    {root}/{dataset}/instances.json       COCO: images [{id, file_name, width, height}],
                                          annotations [{id, image_id, bbox=[x, y, w, h]}]
    {image_dir}/{file_name}               the images (COCO train2014)

Boxes are COCO ``xywh`` pixels in the stored frame of the image file; they become ``xyxy``
here. One record per sentence. Each image's header is read once: a missing or unreadable file,
or one whose size differs from ``instances.json`` (a resized copy), is refused per ref; an image
with an EXIF orientation tag is kept in the stored frame (see ``peft_m2ist.data.records``).
The refs pickle is read with a restricted unpickler (no code from the file runs). A split that
yields no record raises ``ValueError`` naming the split values the file holds.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from datasets import Value

from peft_m2ist.data.image_files import ImageFiles, ImageHeader
from peft_m2ist.data.records import (
    LoadReport,
    LoadResult,
    OnError,
    RecordError,
    check_box_on,
    check_phrase,
    progress,
    records_to_dataset,
    to_xyxy,
)
from peft_m2ist.data.safe_pickle import corrupt_file_error, load_refs_pickle

EXTRA_FEATURES = {"ref_id": Value("int64"), "ann_id": Value("int64"), "sent_id": Value("int64")}


def _required(mapping: object, key: str, where: str):
    if not isinstance(mapping, dict):
        raise RecordError("malformed_record", f"{where}: expected a dict, got {type(mapping).__name__}")
    if key not in mapping:
        raise RecordError("missing_key", f"{where}: missing key {key!r}")
    return mapping[key]


def _index_instances(path: Path) -> tuple[dict, dict]:
    """``images`` and ``annotations`` of a COCO file, keyed by id."""
    with open(path, encoding="utf-8") as file:
        try:
            coco = json.load(file)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise corrupt_file_error(path, "not readable as JSON", error) from error
    if not isinstance(coco, dict):
        raise ValueError(f"{path}: expected a COCO JSON object with 'images' and 'annotations', "
                         f"got a {type(coco).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(coco.get(key), list):
            raise ValueError(f"{path}: missing top-level list {key!r} (is this a COCO instances file?)")
    images = {image["id"]: image for image in coco["images"] if isinstance(image, dict) and "id" in image}
    annotations = {ann["id"]: ann for ann in coco["annotations"] if isinstance(ann, dict) and "id" in ann}
    return images, annotations


def load_refer(
    root: str | os.PathLike,
    dataset: str = "refcoco",
    split_by: str = "unc",
    split: str = "val",
    image_dir: str | os.PathLike | None = None,
    *,
    sentence_key: str = "sent",
    on_error: OnError = "raise",
) -> LoadResult:
    """Records of one split of a refer API dataset.

    Args:
        root: folder holding ``{dataset}/refs({split_by}).p`` and ``{dataset}/instances.json``.
        dataset: ``refcoco``, ``refcoco+`` or ``refcocog``.
        split_by: ``unc``, ``google`` or ``umd`` (as in the file name).
        split: the refs' ``split`` value: ``train``, ``val``, ``test``, ``testA``, ``testB``.
        image_dir: folder of the COCO images (default ``{root}/images``).
        sentence_key: ``sent`` (lower-cased, tokenised) or ``raw``.
        on_error: ``"raise"`` a ``ValueError`` naming the file and record, or ``"skip"`` and count.

    Returns:
        ``LoadResult``: ``dataset`` with ``image`` (decoded lazily from the file), ``bbox``
        (``[x0, y0, x1, y1]`` pixels), ``phrase``, ``phrase_type`` ("unknown"), ``image_id``,
        ``ref_id``, ``ann_id``, ``sent_id``; ``report`` with the skip counts per reason.

    Raises:
        ValueError: a corrupt refs pickle or instances.json, a bad record (``RecordError``, with
            ``on_error="raise"``), or no record kept (e.g. a split value the file does not hold).
    """
    base = Path(root) / dataset
    refs_path = base / f"refs({split_by}).p"
    images_root = Path(image_dir) if image_dir is not None else Path(root) / "images"
    refs = load_refs_pickle(refs_path)
    if not isinstance(refs, list):
        raise ValueError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
    images, annotations = _index_instances(base / "instances.json")
    report = LoadReport(source=str(refs_path), on_error=on_error)
    files = ImageFiles()
    files.prefetch(_image_paths(refs, split, images, images_root), desc=f"{dataset} {split} images")
    records: list[dict] = []
    splits: Counter = Counter()
    for index, ref in enumerate(progress(refs, desc=f"{dataset} refs({split_by})", unit="ref")):
        where = f"{refs_path} ref #{index}"
        try:
            ref_split = _required(ref, "split", where)
            splits[str(ref_split)] += 1
            if ref_split != split:
                continue
            records.extend(_ref_records(ref, where, images, annotations, images_root, sentence_key, report, files))
        except RecordError as error:
            report.fail(error)
    report.kept = len(records)
    report.log()
    report.require_records(
        f"{splits[split]} refs have split {split!r}; split values in the file (refs each): {dict(sorted(splits.items()))}"
    )
    return LoadResult(records_to_dataset(records, EXTRA_FEATURES, split=split), report)


def _image_paths(refs: list, split: str, images: dict, images_root: Path) -> list[Path]:
    """The image files of ``split``'s refs, to decode before the records are built (malformed refs are left to
    the record loop, which names them)."""
    paths = []
    for ref in refs:
        try:
            if ref.get("split") == split:
                paths.append(images_root / images[ref["image_id"]]["file_name"])
        except (AttributeError, KeyError, TypeError):
            continue
    return paths


def _check_size(image: dict, header: ImageHeader, path: Path, where: str) -> None:
    """``RecordError`` unless ``instances.json``'s ``width``/``height`` match the file's stored size."""
    width, height = _required(image, "width", where), _required(image, "height", where)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (width, height)):
        raise RecordError("malformed_record", f"{where}: image width/height {width!r}/{height!r} are not numbers")
    if (width, height) == (header.width, header.height):
        return
    hint = "its boxes are in the instances.json frame: use the original (not resized) images"
    if header.transposed_on_decode and (width, height) == (header.height, header.width):
        hint = (f"instances.json matches the file's EXIF-rotated view (orientation {header.orientation}), "
                f"but boxes are read in the stored pixel frame: check which frame the annotations use")
    raise RecordError(
        "image_size_mismatch",
        f"{where}: instances.json gives the image as {width}x{height} but {path} is {header.describe()}; {hint}",
    )


def _ref_records(ref: dict, where: str, images: dict, annotations: dict, images_root: Path,
                 sentence_key: str, report: LoadReport, files: ImageFiles) -> list[dict]:
    """Records of one ref (one per sentence); whole-ref problems raise ``RecordError``."""
    ref_id, ann_id = _required(ref, "ref_id", where), _required(ref, "ann_id", where)
    image_id, sentences = _required(ref, "image_id", where), _required(ref, "sentences", where)
    where = f"{where} (ref_id={ref_id})"
    if image_id not in images:
        raise RecordError("missing_key", f"{where}: image_id {image_id} not in instances.json")
    if ann_id not in annotations:
        raise RecordError("missing_key", f"{where}: ann_id {ann_id} not in instances.json")
    image = images[image_id]
    file_name = _required(image, "file_name", f"{where} image {image_id}")
    path = images_root / file_name
    header = files.header(path, where)
    _check_size(image, header, path, where)
    box = check_box_on(to_xyxy(_required(annotations[ann_id], "bbox", where), "xywh", where), header, where)
    cell = files.cell(path, where)
    if not isinstance(sentences, list):
        raise RecordError("malformed_record", f"{where}: 'sentences' is not a list")
    out = []
    for number, sentence in enumerate(sentences):
        sentence_where = f"{where} sentence #{number}"
        try:
            phrase = check_phrase(_required(sentence, sentence_key, sentence_where), sentence_where)
        except RecordError as error:
            report.fail(error)
            continue
        out.append({
            "image": cell, "bbox": list(box), "phrase": phrase, "phrase_type": "unknown",
            "image_id": str(image_id), "ref_id": int(ref_id), "ann_id": int(ann_id),
            "sent_id": int(sentence.get("sent_id", -1)),
        })
    return out
