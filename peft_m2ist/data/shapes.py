"""Scenes of coloured shapes: sampling and rendering.

A scene is a background plus 3-6 non-overlapping objects. Each object has three intrinsic
attributes (``colour``, ``shape``, ``size``) and a box ``[x0, y0, x1, y1]`` in absolute pixel
corners of the ``image_size x image_size`` image; the box is the tight box of the drawn shape.

Everything is drawn from a ``numpy.random.Generator`` handed in by the caller, so a scene is a
pure function of that generator's state (same seed -> same pixels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 70),
    "blue": (45, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
SIZES: dict[str, float] = {"small": 0.075, "large": 0.13}
"""Half-extent of an object as a fraction of the image side (before a +-8% jitter)."""

BACKGROUNDS: tuple[str, ...] = ("plain", "photo", "mixed")
PHOTO_NAMES: tuple[str, ...] = ("astronaut", "coffee", "chelsea", "rocket")
_SUPERSAMPLE = 4
_MIN_GAP_PX = 3.0


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene; ``box`` is ``[x0, y0, x1, y1]`` in absolute pixels."""

    colour: str
    shape: str
    size: str
    box: tuple[float, float, float, float]

    @property
    def centre(self) -> tuple[float, float]:
        """Box centre ``(cx, cy)`` in pixels."""
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2.0, (y0 + y1) / 2.0


@dataclass(frozen=True)
class Scene:
    """A rendered scene: ``image`` is an RGB ``PIL.Image`` of ``image_size x image_size``."""

    image: Image.Image
    objects: tuple[SceneObject, ...]


def _overlaps(box: Sequence[float], others: Sequence[Sequence[float]], gap: float) -> bool:
    x0, y0, x1, y1 = box
    return any(
        x0 < o[2] + gap and o[0] < x1 + gap and y0 < o[3] + gap and o[1] < y1 + gap for o in others
    )


def sample_layout(
    rng: np.random.Generator,
    image_size: int,
    attributes: Sequence[tuple[str, str, str]],
    max_tries: int = 200,
) -> list[SceneObject] | None:
    """Place objects with the given ``(colour, shape, size)`` at random without overlap.

    Boxes are square (a shape is drawn inside its square box and touches all four sides),
    at least ``_MIN_GAP_PX`` apart, and fully inside the image. Returns ``None`` if no
    placement was found in ``max_tries`` draws per object.
    """
    placed: list[SceneObject] = []
    for colour, shape, size in attributes:
        half = SIZES[size] * image_size * float(rng.uniform(0.92, 1.08))
        for _ in range(max_tries):
            cx = float(rng.uniform(half + 1, image_size - half - 1))
            cy = float(rng.uniform(half + 1, image_size - half - 1))
            box = (cx - half, cy - half, cx + half, cy + half)
            if not _overlaps(box, [o.box for o in placed], _MIN_GAP_PX):
                placed.append(SceneObject(colour, shape, size, box))
                break
        else:
            return None
    return placed


def _shape_polygon(shape: str, box: Sequence[float]) -> list[tuple[float, float]]:
    """Vertices of ``shape`` inscribed in ``box`` so that it touches all four box sides."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "star":
        # A five-pointed star, then stretched to fill the box exactly.
        pts = []
        for k in range(10):
            radius = 1.0 if k % 2 == 0 else 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            pts.append((radius * math.cos(angle), radius * math.sin(angle)))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        sx = (x1 - x0) / (max(xs) - min(xs))
        sy = (y1 - y0) / (max(ys) - min(ys))
        return [(x0 + (px - min(xs)) * sx, y0 + (py - min(ys)) * sy) for px, py in pts]
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _draw_objects(objects: Sequence[SceneObject], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased object layer: premultiplied RGB (H, W, 3) and alpha (H, W, 1), floats in [0, 1].

    Each object is drawn at ``_SUPERSAMPLE`` x resolution in a patch around its box and box-filtered
    down, so edge pixels get their covered fraction as alpha.
    """
    rgb = np.zeros((image_size, image_size, 3), dtype=np.float32)
    alpha = np.zeros((image_size, image_size, 1), dtype=np.float32)
    for obj in objects:
        left, top = math.floor(obj.box[0]), math.floor(obj.box[1])
        right, bottom = math.ceil(obj.box[2]), math.ceil(obj.box[3])
        patch_size = ((right - left) * _SUPERSAMPLE, (bottom - top) * _SUPERSAMPLE)
        mask = Image.new("L", patch_size, 0)
        # Pixel (i, j) covers [i, i+1); PIL fills whole pixels, so shrink the far edges by one.
        local = [
            (obj.box[0] - left) * _SUPERSAMPLE,
            (obj.box[1] - top) * _SUPERSAMPLE,
            (obj.box[2] - left) * _SUPERSAMPLE - 1,
            (obj.box[3] - top) * _SUPERSAMPLE - 1,
        ]
        draw = ImageDraw.Draw(mask)
        if obj.shape == "circle":
            draw.ellipse(local, fill=255)
        else:
            draw.polygon(_shape_polygon(obj.shape, local), fill=255)
        small = mask.resize((right - left, bottom - top), Image.Resampling.BOX)
        coverage = np.asarray(small, dtype=np.float32)[..., None] / 255.0
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float32) / 255.0
        alpha[top:bottom, left:right] += coverage
        rgb[top:bottom, left:right] += coverage * colour
    return rgb, np.clip(alpha, 0.0, 1.0)


@lru_cache(maxsize=8)
def _photo(name: str) -> np.ndarray:
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3]


def _plain_background(rng: np.random.Generator, image_size: int, noise_std: float) -> np.ndarray:
    """A dim, low-saturation two-colour linear gradient (floats in [0, 1], shape (H, W, 3))."""
    level = rng.uniform(0.15, 0.45)
    tint_a = level + rng.uniform(-0.05, 0.05, size=3)
    tint_b = level + rng.uniform(-0.12, 0.12) + rng.uniform(-0.05, 0.05, size=3)
    angle = rng.uniform(0, 2 * math.pi)
    coords = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size - 0.5
    ramp = math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None] + 0.5
    background = tint_a + (tint_b - tint_a) * np.clip(ramp, 0, 1)[..., None]
    if noise_std > 0:
        background = background + rng.normal(0, noise_std, size=background.shape)
    return np.clip(background, 0, 1).astype(np.float32)


def _photo_background(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """A random square crop of a scikit-image photo, dimmed and washed out so shapes stay visible."""
    photo = _photo(PHOTO_NAMES[int(rng.integers(len(PHOTO_NAMES)))])
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[top : top + side, left : left + side])
    crop = crop.resize((image_size, image_size), Image.Resampling.BILINEAR)
    array = np.asarray(crop, dtype=np.float32) / 255.0
    grey = array.mean(axis=-1, keepdims=True)
    return (0.55 * (0.5 * array + 0.5 * grey) + 0.1).astype(np.float32)


def render_scene(
    rng: np.random.Generator,
    objects: Sequence[SceneObject],
    image_size: int,
    background: str = "plain",
    noise_std: float = 0.0,
) -> Scene:
    """Draw ``objects`` over a background chosen by ``background`` (one of ``BACKGROUNDS``)."""
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    use_photo = background == "photo" or (background == "mixed" and rng.random() < 0.5)
    canvas = _photo_background(rng, image_size) if use_photo else _plain_background(rng, image_size, noise_std)
    premultiplied, alpha = _draw_objects(objects, image_size)
    pixels = canvas * (1.0 - alpha) + premultiplied
    image = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8), mode="RGB")
    return Scene(image=image, objects=tuple(objects))
