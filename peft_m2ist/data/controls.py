"""Controls that remove one modality, to show a model needs both.

- ``text_hidden``: every phrase becomes ``""`` (the tokenizer still adds its special tokens).
- ``image_hidden``: every image becomes a constant grey (128, 128, 128) image of the same size.

A model trained and tested under either control should land near ``chance_level`` on the shapes
benchmark; the boxes and all other columns are untouched.
"""

from __future__ import annotations

from datasets import Dataset, DatasetDict
from PIL import Image

CONTROLS: tuple[str, ...] = ("none", "text_hidden", "image_hidden")
GREY = (128, 128, 128)


def _hide_text(phrases: list[str]) -> dict:
    return {"phrase": [""] * len(phrases)}


def _hide_image(images: list[Image.Image]) -> dict:
    return {"image": [Image.new("RGB", image.size, GREY) for image in images]}


def apply_control(dataset: Dataset | DatasetDict, control: str) -> Dataset | DatasetDict:
    """Return ``dataset`` with one modality hidden; ``control`` is one of ``CONTROLS``.

    Works on a ``Dataset`` or every split of a ``DatasetDict`` in the internal record format.
    """
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
    if control == "none":
        return dataset
    if control == "text_hidden":
        return dataset.map(_hide_text, batched=True, input_columns=["phrase"], desc="text_hidden")
    return dataset.map(_hide_image, batched=True, input_columns=["image"], batch_size=256, desc="image_hidden")
