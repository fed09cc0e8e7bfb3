"""Batching REC records into model inputs.

Output of ``RECCollator(records)`` for a batch of B records, canvas side S, L text tokens:

- ``pixel_values``: float32 (B, 3, S, S), normalised with ``image_mean``/``image_std``; padding is 0.
- ``pixel_mask``: int64 (B, S, S), 1 on image pixels, 0 on padding (DETR convention).
- ``input_ids``, ``attention_mask``: int64 (B, L), padded to ``max_text_tokens`` and truncated.
- ``labels``: float32 (B, 4), the target box as ``cxcywh`` normalised to [0, 1] of the S x S canvas;
  only when the records have a ``bbox`` (a batch for prediction, of records without one, has no ``labels``).
- ``phrase_type``: list of B str, metadata for per-type scores (the model accepts it and ignores it, so
  ``model(**batch)`` takes the batch as it is).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers.image_transforms import corners_to_center_format
from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from peft_m2ist.data.canvas import CanvasBatch
from peft_m2ist.data.records import BOX_TOLERANCE_PX
from peft_m2ist.data.tensor_augment import render, rgb_array
from peft_m2ist.data.transforms import Box, CanvasSample, TrainAugment, resize_and_pad

_TRAIN_NEEDS_BOXES = (
    "RECCollator(train=True) needs a `bbox` in every record: the augmentation crops around the target box and "
    "moves it with the image. Batch records without a box with train=False (prediction)."
)


class RenderedRecord(NamedTuple):
    """A record on its way into the batch: ``planes`` float32 ``(3, h, w)`` of levels 0..255 (RGB), ``offset``
    ``(x, y)`` on the canvas, ``bbox`` ``[x0, y0, x1, y1]`` canvas pixels (``None`` without a box), ``phrase``."""

    planes: torch.Tensor
    offset: tuple[int, int]
    bbox: Box | None
    phrase: str


class RECCollator:
    """Turn records (``image``, ``bbox`` xyxy pixels, ``phrase``, ``phrase_type``) into a batch.

    ``bbox`` is optional for prediction: a record may lack the key or hold ``None``. A batch in which no
    record has a box has no ``labels``; a batch that mixes records with and without a box raises
    ``ValueError`` (their ``labels`` could not be stacked). With ``train=True`` every record needs a box:
    the augmentation crops around the target box and moves it with the image, so a box-less record raises
    ``ValueError`` there. ``phrase_type`` is optional too (``"unknown"``).

    Args:
        tokenizer: a Hugging Face tokenizer (called with ``padding="max_length"``, ``truncation=True``).
        image_size: canvas side S (640 for real data; the shapes benchmark uses its native 128).
        max_text_tokens: L (20 by default; 40 for RefCOCOg).
        image_mean, image_std: per-channel normalisation (default ImageNet; see ``from_image_processor``).
        train: apply ``TrainAugment`` (``augment`` overrides its defaults), else ``resize_and_pad``.
        seed: with a seed the collator owns a numpy generator (reproducible in one process);
            without one, each batch draws its seed from torch's global generator, which DataLoader
            seeds differently per worker.
        augment: a custom ``TrainAugment`` (its ``size`` must equal ``image_size``).
    """

    def __init__(
        self,
        tokenizer,
        image_size: int = 640,
        max_text_tokens: int = 20,
        image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
        train: bool = False,
        seed: int | None = None,
        augment: TrainAugment | None = None,
    ) -> None:
        if augment is not None and augment.size != image_size:
            raise ValueError(f"augment.size ({augment.size}) must equal image_size ({image_size})")
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_text_tokens = max_text_tokens
        self.image_mean = np.asarray(image_mean, dtype=np.float32).reshape(1, 1, 3)
        self.image_std = np.asarray(image_std, dtype=np.float32).reshape(1, 1, 3)
        self.train = train
        self.augment = augment if augment is not None else TrainAugment(image_size)
        self._rng = np.random.default_rng(seed) if seed is not None else None

    @classmethod
    def from_image_processor(cls, tokenizer, image_processor, **kwargs) -> RECCollator:
        """Take ``image_mean``/``image_std`` from a transformers image processor."""
        return cls(tokenizer, image_mean=image_processor.image_mean, image_std=image_processor.image_std, **kwargs)

    def _generator(self) -> np.random.Generator:
        if self._rng is not None:
            return self._rng
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))

    def transform(self, record: dict[str, Any], rng: np.random.Generator | None = None) -> CanvasSample:
        """One record onto the canvas (augmented when ``train``).

        For a record without a box (inference only) the returned sample's ``bbox`` is ``None``.
        """
        box = _record_box(record)
        image, phrase = record["image"], record["phrase"]
        if self.train:
            if box is None:
                raise ValueError(_TRAIN_NEEDS_BOXES)
            return self.augment(image, box, phrase, rng if rng is not None else self._generator())
        if box is None:  # place the image as usual; the whole-image box only drives the resize and is dropped
            sample = resize_and_pad(image, (0.0, 0.0, *map(float, image.size)), phrase, self.image_size)
            return dataclasses.replace(sample, bbox=None)
        return resize_and_pad(image, box, phrase, self.image_size)

    def render(self, record: dict[str, Any], rng: np.random.Generator | None = None) -> RenderedRecord:
        """One record's canvas content, as ``__call__`` batches it: float32 levels ``(3, h, w)``, offset, box, phrase.

        With ``train=False`` the pixels are those of ``transform`` (``resize_and_pad``, PIL). With ``train=True`` the
        random decisions are ``TrainAugment``'s (``augment.plan``: the same draws, boxes and phrases as
        ``transform``) and the pixel work runs on tensors (``tensor_augment.render``), which matches PIL's to a grey
        level on a few pixels (the resize); ``transform`` keeps the PIL rendering.
        """
        if not self.train:
            sample = self.transform(record)
            planes = torch.from_numpy(rgb_array(sample.image)).permute(2, 0, 1).to(torch.float32)
            return RenderedRecord(planes, sample.offset, sample.bbox, sample.phrase)
        box = _record_box(record)
        if box is None:
            raise ValueError(_TRAIN_NEEDS_BOXES)
        image = record["image"]
        plan = self.augment.plan(*image.size, box, record["phrase"], rng if rng is not None else self._generator())
        return RenderedRecord(render(image, plan), plan.offset, plan.bbox, plan.phrase)

    def __call__(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Batch of records -> model inputs (see module docstring for names, shapes and formats).

        Raises:
            ValueError: some records have a box and others do not, or ``train`` and a record has no box.
        """
        missing = [i for i, record in enumerate(records) if _record_box(record) is None]
        if missing and self.train:
            raise ValueError(f"records {missing} of this batch have no `bbox` (missing or None): {_TRAIN_NEEDS_BOXES}")
        if missing and len(missing) < len(records):
            raise ValueError(
                f"records {missing} of this batch have no `bbox` (missing or None) but the others have one: "
                "batch records with boxes (training, evaluation: the batch has `labels`) apart from records "
                "without (prediction: no `labels`)."
            )
        rng = self._generator() if self.train else None
        canvas = CanvasBatch(len(records), self.image_size, self.image_mean.ravel().tolist(),
                             self.image_std.ravel().tolist())
        samples = []
        for index, record in enumerate(records):
            sample = self.render(record, rng)
            canvas.paste(index, sample.planes, sample.offset)
            samples.append(sample)
        text = self.tokenizer(
            [sample.phrase for sample in samples],
            padding="max_length",
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
        )
        batch = {
            "pixel_values": canvas.pixel_values,
            "pixel_mask": canvas.pixel_mask,
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
        }
        if not missing:
            corners = torch.tensor([sample.bbox for sample in samples], dtype=torch.float32) / self.image_size
            batch["labels"] = corners_to_center_format(corners.clamp(0.0, 1.0))
        batch["phrase_type"] = [str(record.get("phrase_type", "unknown")) for record in records]
        return batch


def _record_box(record: dict[str, Any]) -> tuple[float, float, float, float] | None:
    """The record's ``bbox`` as 4 floats, or ``None`` when it has none (no ``bbox`` key, or ``None``).

    Raises ``ValueError`` for a box that is not 4 finite numbers ``[x0, y0, x1, y1]`` with ``x0 < x1``, ``y0 < y1``,
    inside the record's image (to ``BOX_TOLERANCE_PX``, as the loaders allow): the labels would otherwise be
    clamped onto the canvas silently.
    """
    box = record.get("bbox")
    if box is None:
        return None
    values = tuple(float(c) for c in box)
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"`bbox` must be 4 numbers [x0, y0, x1, y1] (pixels), all finite, got {box!r}")
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"`bbox` {list(box)} must have x0 < x1 and y0 < y1 ([x0, y0, x1, y1] pixels)")
    width, height = record["image"].size
    tolerance = BOX_TOLERANCE_PX
    if x0 < -tolerance or y0 < -tolerance or x1 > width + tolerance or y1 > height + tolerance:
        raise ValueError(
            f"`bbox` {list(box)} lies outside its {width}x{height} image; records hold [x0, y0, x1, y1] boxes in "
            "the image's pixels (not cxcywh, not normalised)"
        )
    return values
