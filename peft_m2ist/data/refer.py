"""Reader for the refer API layout (RefCOCO, RefCOCO+, RefCOCOg as distributed with ``refer``).

Layout::

    {root}/{dataset}/refs({split_by}).p   pickle: list of refs, each a dict with
                                          ref_id, ann_id, image_id, split, sentences=[{sent, raw, ...}]
    {root}/{dataset}/instances.json       COCO: images [{id, file_name, width, height}],
                                          annotations [{id, image_id, bbox=[x, y, w, h]}]
    {image_dir}/{file_name}               the images (COCO train2014)

Boxes are COCO ``xywh`` pixels; they become ``xyxy`` here. One record per sentence.
The refs pickle is read with a restricted unpickler (no code from the file runs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from datasets import Value

from peft_m2ist.data.records import (
    LoadReport,
    LoadResult,
    OnError,
    RecordError,
    check_box,
    check_phrase,
    records_to_dataset,
    to_xyxy,
)
from peft_m2ist.data.safe_pickle import load_refs_pickle

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
        coco = json.load(file)
    for key in ("images", "annotations"):
        if key not in coco:
            raise ValueError(f"{path}: missing top-level key {key!r}")
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
    """
    base = Path(root) / dataset
    refs_path = base / f"refs({split_by}).p"
    images_root = Path(image_dir) if image_dir is not None else Path(root) / "images"
    refs = load_refs_pickle(refs_path)
    if not isinstance(refs, list):
        raise ValueError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
    images, annotations = _index_instances(base / "instances.json")
    report = LoadReport(source=str(refs_path), on_error=on_error)
    records: list[dict] = []
    for index, ref in enumerate(refs):
        where = f"{refs_path} ref #{index}"
        try:
            if _required(ref, "split", where) != split:
                continue
            records.extend(_ref_records(ref, where, images, annotations, images_root, sentence_key, report))
        except RecordError as error:
            report.fail(error)
    report.kept = len(records)
    report.log()
    return LoadResult(records_to_dataset(records, EXTRA_FEATURES, split=split), report)


def _ref_records(ref: dict, where: str, images: dict, annotations: dict, images_root: Path,
                 sentence_key: str, report: LoadReport) -> list[dict]:
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
    width, height = _required(image, "width", where), _required(image, "height", where)
    path = images_root / file_name
    if not path.is_file():
        raise RecordError("missing_image", f"{where}: image file {path} not found")
    box = check_box(to_xyxy(_required(annotations[ann_id], "bbox", where), "xywh", where), width, height, where)
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
            "image": str(path), "bbox": list(box), "phrase": phrase, "phrase_type": "unknown",
            "image_id": str(image_id), "ref_id": int(ref_id), "ann_id": int(ann_id),
            "sent_id": int(sentence.get("sent_id", -1)),
        })
    return out
