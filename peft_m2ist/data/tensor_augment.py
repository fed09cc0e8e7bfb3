"""``TrainAugment``'s pixel work on torch tensors: the fast rendering of an ``AugmentPlan``.

``TrainAugment.__call__`` works on PIL images (``Image.crop``, ``Image.resize``, three ``ImageEnhance`` passes,
``Image.transpose``), and the collator then converts the result to float and normalises it. This module renders the
same plan (the same random draws: crop, long side, jitter factors and order, flip, placement) on tensors:

- the crop is a slice of the decoded ``uint8`` array (no copy);
- the resize is torch's ``uint8`` bilinear resize with antialiasing (``F.interpolate(..., antialias=True)``), which
  follows PIL's ``Image.resize(..., BILINEAR)`` filter; the two differ by at most 1 grey level on a few pixels;
- the colour jitter repeats PIL's own arithmetic on float32 planes holding integers 0..255: ``Image.blend`` computes
  ``in1 + alpha * (in2 - in1)`` in float32, clips to [0, 255] and truncates; ``convert("L")`` is
  ``(19595 R + 38470 G + 7471 B + 32768) >> 16``; ``ImageEnhance.Contrast`` blends with the rounded mean of that grey
  image. Given the same input pixels the jitter is bit-identical to PIL's (tests/data/test_fast_augment.py);
- the flip is ``torch.flip`` on the resized bytes, before the jitter: the jitter works per pixel, but for
  contrast's mean level, which a flip does not change, so the order does not matter.

Images are ``(3, height, width)`` tensors, RGB, channels first. Boxes are not touched here: the plan holds them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from peft_m2ist.data.transforms import AugmentPlan

_L_WEIGHTS = (19595.0, 38470.0, 7471.0)
"""PIL's fixed-point RGB -> L weights (``L24`` in libImaging/Convert.c), scaled by 2**16."""


def rgb_array(image: Image.Image) -> np.ndarray:
    """``image`` as a writable ``uint8`` array ``(height, width, 3)`` (``convert("RGB")`` first when needed)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)


def resize_uint8(pixels: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bilinear, antialiased resize of a ``uint8`` ``(3, h, w)`` tensor to ``(3, height, width)`` (PIL's filter)."""
    if pixels.shape[1:] == (height, width):
        return pixels
    # channels-last input takes torch's vectorised uint8 path (same values as the generic one, about twice as fast)
    batch = pixels.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    return F.interpolate(batch, size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]


def grey(planes: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")`` of float32 RGB planes ``(3, h, w)`` holding integers: ``(h, w)``, integers.

    Exact in float32: the weighted sum stays below 2**24, and the division by 2**16 is exact.
    """
    red, green, blue = planes
    total = red * _L_WEIGHTS[0]
    total.add_(green, alpha=_L_WEIGHTS[1]).add_(blue, alpha=_L_WEIGHTS[2]).add_(32768.0)
    return total.div_(65536.0).floor_()


def blend(degenerate: torch.Tensor | float, planes: torch.Tensor, factor: float) -> torch.Tensor:
    """``Image.blend(degenerate, image, factor)`` on float32 planes of integers, in place on ``planes``.

    ``degenerate + factor * (planes - degenerate)`` in float32 (``factor`` rounded to float32, as PIL's C code takes
    it), clipped to [0, 255] and truncated, as libImaging/Blend.c does.
    """
    alpha = float(np.float32(factor))
    if isinstance(degenerate, float) and degenerate == 0.0:
        planes.mul_(alpha)
    else:
        planes.sub_(degenerate).mul_(alpha).add_(degenerate)
    return planes.clamp_(0.0, 255.0).floor_()


def brightness(planes: torch.Tensor, factor: float) -> torch.Tensor:
    """``ImageEnhance.Brightness(image).enhance(factor)``: a blend with black."""
    return blend(0.0, planes, factor)


def contrast(planes: torch.Tensor, factor: float) -> torch.Tensor:
    """``ImageEnhance.Contrast(image).enhance(factor)``: a blend with the grey image's rounded mean level."""
    levels = grey(planes)
    if not levels.numel():
        return blend(0.0, planes, factor)
    # ImageStat's mean, rounded: the sum of integer levels must be exact. Row sums in float32 are (every partial sum
    # is an integer below 2**24 while a row holds fewer than 65,793 pixels), and are added up in float64.
    rows = levels.sum(dim=1) if levels.shape[1] * 255 < 2**24 else levels.sum(dim=1, dtype=torch.float64)
    mean = int(float(rows.sum(dtype=torch.float64)) / levels.numel() + 0.5)
    return blend(float(mean), planes, factor)


def saturation(planes: torch.Tensor, factor: float) -> torch.Tensor:
    """``ImageEnhance.Color(image).enhance(factor)``: a blend with the image's own grey version."""
    return blend(grey(planes).unsqueeze(0), planes, factor)


JITTERS = {"brightness": brightness, "contrast": contrast, "saturation": saturation}
"""The ``AugmentPlan.jitter`` operation names and their tensor versions."""


def render(image: Image.Image, plan: AugmentPlan) -> torch.Tensor:
    """The augmented pixels of ``plan`` applied to ``image``: float32 ``(3, height, width)``, integers 0..255.

    ``(width, height)`` is ``plan.size``; ``image`` must be the one the plan was drawn for (same size).
    """
    array = rgb_array(image)
    if array.shape[1::-1] != plan.source_size:
        raise ValueError(f"the plan was drawn for a {plan.source_size} image, got one of {array.shape[1::-1]}")
    left, top, right, bottom = plan.crop
    pixels = torch.from_numpy(array[top:bottom, left:right]).permute(2, 0, 1)
    width, height = plan.size
    resized = resize_uint8(pixels, width, height)
    if plan.flip:  # before the jitter, on bytes: it works per pixel but for contrast's mean, which a flip keeps
        resized = resized.flip(-1)
    planes = resized.to(torch.float32, memory_format=torch.contiguous_format)
    for name, factor in plan.jitter:
        planes = JITTERS[name](planes, factor)
    return planes
