"""The training loader as it was before the tensor rendering (issue #29 item 5), kept as the "before" of a comparison.

``PILRECCollator`` is ``RECCollator`` with the batch assembly of commit 209c2b8: each record through
``RECCollator.transform`` (``TrainAugment.__call__`` on PIL images in training, ``resize_and_pad`` otherwise), each
canvas normalised in its own float32 numpy array, the batch stacked with ``torch.stack``. Same outputs (names,
shapes, dtypes, formats; see ``peft_m2ist.data.collator``); used by ``benchmarks/data_scale.py --compare-reference``
and by tests/data/test_fast_augment.py, which pin the new loader to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers.image_transforms import corners_to_center_format

from peft_m2ist.data.collator import RECCollator, _record_box
from peft_m2ist.data.transforms import CanvasSample


class PILRECCollator(RECCollator):
    """``RECCollator`` with the PIL augmentation and the per-record numpy normalisation of commit 209c2b8."""

    def _normalise(self, sample: CanvasSample) -> tuple[torch.Tensor, torch.Tensor]:
        """Canvas tensor (3, S, S) and mask (S, S) for one sample."""
        size = self.image_size
        pixels = np.zeros((size, size, 3), dtype=np.float32)
        mask = np.zeros((size, size), dtype=np.int64)
        array = (np.asarray(sample.image, dtype=np.float32) / 255.0 - self.image_mean) / self.image_std
        x, y = sample.offset
        height, width = array.shape[:2]
        pixels[y : y + height, x : x + width] = array
        mask[y : y + height, x : x + width] = 1
        return torch.from_numpy(pixels).permute(2, 0, 1), torch.from_numpy(mask)

    def __call__(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Batch of records -> model inputs, the old way (the same checks as ``RECCollator.__call__``)."""
        missing = [i for i, record in enumerate(records) if _record_box(record) is None]
        if missing and (self.train or len(missing) < len(records)):
            return super().__call__(records)  # raises the collator's own ValueError
        rng = self._generator() if self.train else None
        samples = [self.transform(record, rng) for record in records]
        pixel_values, pixel_mask = zip(*(self._normalise(sample) for sample in samples))
        text = self.tokenizer(
            [sample.phrase for sample in samples],
            padding="max_length",
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
        )
        batch = {
            "pixel_values": torch.stack(pixel_values),
            "pixel_mask": torch.stack(pixel_mask),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
        }
        if not missing:
            corners = torch.tensor([sample.bbox for sample in samples], dtype=torch.float32) / self.image_size
            batch["labels"] = corners_to_center_format(corners.clamp(0.0, 1.0))
        batch["phrase_type"] = [str(record.get("phrase_type", "unknown")) for record in records]
        return batch
