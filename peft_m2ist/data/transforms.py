"""Image + box + phrase transforms onto the square input canvas.

All boxes here are ``[x0, y0, x1, y1]`` absolute pixel corners. A transform returns a
``CanvasSample``: the resized (and, in training, augmented) image, its top-left ``offset`` on the
``canvas_size x canvas_size`` canvas, and the box in *canvas* pixels. The collator pastes the
image at ``offset``, normalises it and marks it in the pixel mask; the rest of the canvas is
padding.

- ``resize_and_pad``: inference. Long side -> ``size``, image at the top-left corner.
- ``TrainAugment``: training. Random crop that keeps the whole target box (p=0.5, skipped when
  the phrase names a position), random long side in ``size * scale_range``, colour jitter
  (brightness/contrast/saturation 0.4, p=0.8), horizontal flip (p=0.5) that swaps left/right
  words of the phrase, random placement inside the padding.

Implemented with PIL + numpy (see docs/data.md for why no augmentation library).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

Box = tuple[float, float, float, float]

POSITION_WORDS: frozenset[str] = frozenset(
    {
        "left", "right", "top", "bottom", "middle", "center", "centre", "leftmost", "rightmost",
        "topmost", "bottommost", "upper", "lower", "above", "below", "under", "over", "beneath",
        "highest", "lowest", "furthest", "farthest", "closest", "nearest", "far", "front", "behind",
        "first", "second", "third", "fourth", "fifth", "last", "next", "between",
    }
)
"""Whole words that make a phrase depend on where things are; such phrases skip the random crop."""

_FLIP_WORDS = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
_FLIP_PATTERN = re.compile(r"\b(" + "|".join(_FLIP_WORDS) + r")\b", flags=re.IGNORECASE)
_WORD_PATTERN = re.compile(r"[a-z]+")


def flip_phrase(phrase: str) -> str:
    """Swap left/right (and leftmost/rightmost) as whole words, keeping case.

    ``"the cup left of the left-most plate"`` -> ``"the cup right of the right-most plate"``;
    ``"leftover"`` and ``"righteous"`` are unchanged.
    """

    def swap(match: re.Match) -> str:
        word = match.group(0)
        new = _FLIP_WORDS[word.lower()]
        if word.isupper():
            return new.upper()
        return new.capitalize() if word[0].isupper() else new

    return _FLIP_PATTERN.sub(swap, phrase)


def names_position(phrase: str) -> bool:
    """Whether ``phrase`` contains a whole word of ``POSITION_WORDS`` (case-insensitive)."""
    return any(word in POSITION_WORDS for word in _WORD_PATTERN.findall(phrase.lower()))


@dataclass(frozen=True)
class CanvasSample:
    """A transformed record before normalisation.

    ``image``: RGB PIL image of ``(w, h)`` with ``max(w, h) <= canvas_size``;
    ``offset``: ``(x, y)`` of its top-left pixel on the canvas;
    ``bbox``: ``[x0, y0, x1, y1]`` in canvas pixels (inside the pasted image);
    ``phrase``: the phrase, with left/right swapped if the image was flipped.
    """

    image: Image.Image
    bbox: Box
    phrase: str
    offset: tuple[int, int]
    canvas_size: int


@dataclass(frozen=True)
class AugmentPlan:
    """The random decisions of one ``TrainAugment`` call, drawn without touching pixels (``TrainAugment.plan``).

    ``source_size``: ``(width, height)`` of the image drawn for; ``crop``: ``(left, top, right, bottom)`` integer
    pixels of it (the whole image when not cropped); ``size``: ``(width, height)`` after the resize; ``jitter``:
    ``((name, factor), ...)`` in order (names of ``JITTER_ORDER``), empty when skipped; ``flip``: mirrored after the
    jitter; ``offset``: ``(x, y)`` on the canvas; ``bbox``: ``[x0, y0, x1, y1]`` canvas pixels; ``phrase``: with
    left/right swapped when flipped.
    """

    source_size: tuple[int, int]
    crop: tuple[int, int, int, int]
    size: tuple[int, int]
    jitter: tuple[tuple[str, float], ...]
    flip: bool
    offset: tuple[int, int]
    bbox: Box
    phrase: str
    canvas_size: int


def _clip_box(box: Box, width: float, height: float) -> Box:
    x0, y0, x1, y1 = box
    return (min(max(x0, 0.0), width), min(max(y0, 0.0), height),
            min(max(x1, 0.0), width), min(max(y1, 0.0), height))


def long_side_geometry(width: int, height: int, box: Box, long_side: int) -> tuple[tuple[int, int], Box]:
    """``(new_width, new_height)`` with the longer side ``long_side`` px (aspect kept), and the box scaled alike."""
    scale = long_side / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    sx, sy = new_w / width, new_h / height
    x0, y0, x1, y1 = box
    return (new_w, new_h), _clip_box((x0 * sx, y0 * sy, x1 * sx, y1 * sy), new_w, new_h)


def resize_long_side(image: Image.Image, box: Box, long_side: int) -> tuple[Image.Image, Box]:
    """Resize so that the longer side is ``long_side`` px (aspect kept); scale the box alike."""
    size, box = long_side_geometry(*image.size, box, long_side)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return image, box


def _shift(box: Box, dx: float, dy: float) -> Box:
    return (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)


def resize_and_pad(image: Image.Image, box: Box, phrase: str, size: int) -> CanvasSample:
    """Inference transform: long side -> ``size``, placed at the canvas's top-left corner."""
    image, box = resize_long_side(image.convert("RGB"), box, size)
    return CanvasSample(image=image, bbox=box, phrase=phrase, offset=(0, 0), canvas_size=size)


def draw_crop(width: int, height: int, box: Box, rng: np.random.Generator) -> tuple[Box, tuple[int, int, int, int]]:
    """A random integer crop ``(left, top, right, bottom)`` of a ``width x height`` image containing the whole box.

    Returns the box moved into the crop's frame and the crop. Four draws from ``rng`` (left, top, right, bottom).
    """
    x0, y0, x1, y1 = box
    left = int(rng.integers(0, int(np.floor(x0)) + 1))
    top = int(rng.integers(0, int(np.floor(y0)) + 1))
    right = int(rng.integers(min(int(np.ceil(x1)), width), width + 1))
    bottom = int(rng.integers(min(int(np.ceil(y1)), height), height + 1))
    return _clip_box(_shift(box, -left, -top), right - left, bottom - top), (left, top, right, bottom)


def crop_keeping_box(image: Image.Image, box: Box, rng: np.random.Generator) -> tuple[Image.Image, Box]:
    """A random integer crop that contains the whole box; the box is moved into the crop's frame."""
    box, crop = draw_crop(*image.size, box, rng)
    return image.crop(crop), box


JITTER_ORDER: tuple[str, ...] = ("brightness", "contrast", "saturation")
"""The colour jitter operations, as ``rng.permutation`` indexes them."""
_ENHANCERS = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
              "saturation": ImageEnhance.Color}


def draw_jitter(rng: np.random.Generator, brightness: float, contrast: float,
                saturation: float) -> tuple[tuple[str, float], ...]:
    """The jitter steps ``((name, factor), ...)`` in their random order; factors in ``[1 - s, 1 + s]``.

    Draws a permutation of the three operations, then one factor per operation of strength > 0, in that order.
    """
    strengths = (brightness, contrast, saturation)
    steps = []
    for k in rng.permutation(len(JITTER_ORDER)):
        strength = strengths[int(k)]
        if strength > 0:
            steps.append((JITTER_ORDER[int(k)], float(rng.uniform(1 - strength, 1 + strength))))
    return tuple(steps)


def colour_jitter(image: Image.Image, rng: np.random.Generator, brightness: float, contrast: float,
                  saturation: float) -> Image.Image:
    """Scale brightness, contrast and saturation by factors in ``[1 - s, 1 + s]``, in random order."""
    for name, factor in draw_jitter(rng, brightness, contrast, saturation):
        image = _ENHANCERS[name](image).enhance(factor)
    return image


def hflip(image: Image.Image, box: Box, phrase: str) -> tuple[Image.Image, Box, str]:
    """Mirror the image; the box follows and left/right words of the phrase swap."""
    width = image.size[0]
    x0, y0, x1, y1 = box
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (width - x1, y0, width - x0, y1), flip_phrase(phrase)


@dataclass
class TrainAugment:
    """Training augmentation that keeps the box on its object (see module docstring).

    Args:
        size: canvas side S.
        scale_range: the long side is drawn uniformly (integers) from
            ``[round(S * scale_range[0]), round(S * scale_range[1])]``.
        crop_p: probability of a crop keeping the target box (never for positional phrases).
        jitter_p, brightness, contrast, saturation: colour jitter probability and strengths.
        flip_p: probability of a horizontal flip (phrase left/right swapped).
        random_place: place the image at a random offset inside the canvas (else top-left).
    """

    size: int
    scale_range: tuple[float, float] = (0.7, 1.0)
    crop_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    flip_p: float = 0.5
    random_place: bool = True

    def __post_init__(self) -> None:
        low, high = self.scale_range
        if not 0 < low <= high <= 1:
            raise ValueError(f"scale_range must satisfy 0 < low <= high <= 1, got {self.scale_range}")

    def _long_side_range(self) -> tuple[int, int]:
        low = max(1, round(self.size * self.scale_range[0]))
        return low, max(low, round(self.size * self.scale_range[1]))

    def plan(self, width: int, height: int, box: Box, phrase: str, rng: np.random.Generator) -> AugmentPlan:
        """The decisions ``__call__`` takes for a ``width x height`` image, from the same draws in the same order.

        ``plan(*image.size, box, phrase, rng)`` leaves ``rng`` where ``__call__(image, box, phrase, rng)`` leaves it,
        with the same box, phrase and offset; ``peft_m2ist.data.tensor_augment.render`` then does the pixel work.
        """
        box = _clip_box(tuple(float(c) for c in box), width, height)
        crop = (0, 0, width, height)
        if rng.random() < self.crop_p and not names_position(phrase):
            box, crop = draw_crop(width, height, box, rng)
        low, high = self._long_side_range()
        size, box = long_side_geometry(crop[2] - crop[0], crop[3] - crop[1], box, int(rng.integers(low, high + 1)))
        jitter: tuple[tuple[str, float], ...] = ()
        if rng.random() < self.jitter_p:
            jitter = draw_jitter(rng, self.brightness, self.contrast, self.saturation)
        flip = bool(rng.random() < self.flip_p)
        if flip:
            box, phrase = (size[0] - box[2], box[1], size[0] - box[0], box[3]), flip_phrase(phrase)
        offset = (0, 0)
        if self.random_place:
            offset = (int(rng.integers(0, self.size - size[0] + 1)), int(rng.integers(0, self.size - size[1] + 1)))
        return AugmentPlan(source_size=(width, height), crop=crop, size=size, jitter=jitter, flip=flip, offset=offset,
                           bbox=_shift(box, *offset), phrase=phrase, canvas_size=self.size)

    def __call__(self, image: Image.Image, box: Box, phrase: str, rng: np.random.Generator) -> CanvasSample:
        """Augment one record with PIL; ``box`` is ``[x0, y0, x1, y1]`` pixels of ``image``."""
        image = image.convert("RGB")
        box = _clip_box(tuple(float(c) for c in box), *image.size)
        if rng.random() < self.crop_p and not names_position(phrase):
            image, box = crop_keeping_box(image, box, rng)
        low, high = self._long_side_range()
        image, box = resize_long_side(image, box, int(rng.integers(low, high + 1)))
        if rng.random() < self.jitter_p:
            image = colour_jitter(image, rng, self.brightness, self.contrast, self.saturation)
        if rng.random() < self.flip_p:
            image, box, phrase = hflip(image, box, phrase)
        width, height = image.size
        if self.random_place:
            offset = (int(rng.integers(0, self.size - width + 1)), int(rng.integers(0, self.size - height + 1)))
        else:
            offset = (0, 0)
        return CanvasSample(image=image, bbox=_shift(box, *offset), phrase=phrase, offset=offset,
                            canvas_size=self.size)
