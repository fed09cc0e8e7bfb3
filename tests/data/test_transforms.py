"""Transforms: the box stays on its object under any training augmentation; flips swap words."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from peft_m2ist.data import transforms
from peft_m2ist.data.transforms import (
    TrainAugment,
    colour_jitter,
    flip_phrase,
    names_position,
    resize_and_pad,
)

MAGENTA = (255, 0, 255)


@st.composite
def one_object_scenes(draw):
    """A grey image with one magenta rectangle or ellipse; returns (image, tight box, canvas size)."""
    width, height = draw(st.integers(24, 160)), draw(st.integers(24, 160))
    side = max(width, height)
    w = draw(st.integers(max(4, min(width, side // 5)), width))
    h = draw(st.integers(max(4, min(height, side // 5)), height))
    x0, y0 = draw(st.integers(0, width - w)), draw(st.integers(0, height - h))
    grey = draw(st.integers(0, 200))
    image = Image.new("RGB", (width, height), (grey, grey, grey))
    shape = draw(st.sampled_from(["rectangle", "ellipse"]))
    getattr(ImageDraw.Draw(image), shape)((x0, y0, x0 + w - 1, y0 + h - 1), fill=MAGENTA)
    mask = (np.asarray(image) == MAGENTA).all(axis=-1)
    ys, xs = np.nonzero(mask)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    return image, box, draw(st.integers(48, 160))


def object_extent(image: Image.Image) -> tuple[int, int, int, int]:
    """Tight box of pixels at least half covered by the object (chroma R - G above half its max)."""
    pixels = np.asarray(image, dtype=np.float32)
    chroma = pixels[..., 0] - pixels[..., 1]
    ys, xs = np.nonzero(chroma > 0.5 * chroma.max())
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@settings(max_examples=60, deadline=None)
@given(scene=one_object_scenes(), seed=st.integers(0, 2**32 - 1),
       phrase=st.sampled_from(["the thing", "the thing on the left", "a leftover cup"]))
def test_augmented_box_stays_tight_on_its_object(scene, seed, phrase):
    image, box, size = scene
    augment = TrainAugment(size, crop_p=0.5, jitter_p=0.8, flip_p=0.5)
    sample = augment(image, box, phrase, np.random.default_rng(seed))
    width, height = sample.image.size
    ox, oy = sample.offset
    assert max(width, height) <= size and 0 <= ox <= size - width and 0 <= oy <= size - height
    x0, y0, x1, y1 = sample.bbox
    assert ox <= x0 < x1 <= ox + width and oy <= y0 < y1 <= oy + height
    ex0, ey0, ex1, ey1 = object_extent(sample.image)
    # Half-covered pixels decide the extent; resampling plus the (clipping) colour jitter can move
    # that level by a little over one pixel.
    tolerance = 1.5
    for found, expected in zip((ex0 + ox, ey0 + oy, ex1 + ox, ey1 + oy), sample.bbox):
        assert abs(found - expected) <= tolerance, (sample.bbox, (ex0 + ox, ey0 + oy, ex1 + ox, ey1 + oy))


@settings(max_examples=30, deadline=None)
@given(scene=one_object_scenes())
def test_inference_transform_keeps_box_on_object_top_left(scene):
    image, box, size = scene
    sample = resize_and_pad(image, box, "the thing", size)
    assert sample.offset == (0, 0) and max(sample.image.size) == size
    extent = object_extent(sample.image)
    assert all(abs(f - e) <= 1.0 for f, e in zip(extent, sample.bbox))


WORDS = ["left", "right", "Left", "RIGHT", "leftover", "righteous", "cup", "of", "the", "left-most",
         "rightmost", "Leftmost", "bottom", "left,", "(right)"]


@given(st.lists(st.sampled_from(WORDS), min_size=1, max_size=8))
def test_flip_swaps_only_whole_left_right_words(words):
    phrase = " ".join(words)
    flipped = flip_phrase(phrase)
    swap = {"left": "right", "right": "left", "Left": "Right", "RIGHT": "LEFT", "left-most": "right-most",
            "rightmost": "leftmost", "Leftmost": "Rightmost", "left,": "right,", "(right)": "(left)"}
    assert flipped == " ".join(swap.get(w, w) for w in words)
    assert flip_phrase(flipped) == phrase


def test_flip_examples():
    assert flip_phrase("the cup left of the plate") == "the cup right of the plate"
    assert flip_phrase("the leftover pizza on the right") == "the leftover pizza on the left"


def test_flip_moves_box_and_phrase_together():
    image = Image.new("RGB", (100, 50), (0, 0, 0))
    ImageDraw.Draw(image).rectangle((10, 5, 29, 24), fill=MAGENTA)
    augment = TrainAugment(100, scale_range=(1.0, 1.0), crop_p=0, jitter_p=0, flip_p=1.0, random_place=False)
    sample = augment(image, (10, 5, 30, 25), "the square on the left", np.random.default_rng(0))
    assert sample.bbox == (70, 5, 90, 25)
    assert sample.phrase == "the square on the right"
    assert object_extent(sample.image) == (70, 5, 90, 25)


def test_positional_phrases_skip_the_crop(monkeypatch):
    calls = []
    original = transforms.crop_keeping_box

    def spy(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(transforms, "crop_keeping_box", spy)
    augment = TrainAugment(64, crop_p=1.0)
    image = Image.new("RGB", (80, 60), (0, 0, 0))
    for phrase in ["the man on the left", "top-most star", "second cup from the right", "middle one"]:
        assert names_position(phrase)
        augment(image, (10, 10, 20, 20), phrase, np.random.default_rng(0))
    assert calls == []
    assert not names_position("the leftover cake")
    augment(image, (10, 10, 20, 20), "the leftover cake", np.random.default_rng(0))
    assert len(calls) == 1


def test_colour_jitter_is_pointwise():
    rng = np.random.default_rng(0)
    array = np.zeros((20, 30, 3), dtype=np.uint8)
    array[:, 10:] = (200, 30, 90)
    jittered = np.asarray(colour_jitter(Image.fromarray(array), rng, 0.4, 0.4, 0.4))
    assert jittered.shape == array.shape
    assert len({tuple(p) for p in jittered[:, :10].reshape(-1, 3)}) == 1
    assert len({tuple(p) for p in jittered[:, 10:].reshape(-1, 3)}) == 1
    assert not np.array_equal(jittered, array)


def test_scale_range_is_validated():
    with pytest.raises(ValueError):
        TrainAugment(64, scale_range=(0.5, 1.2))
