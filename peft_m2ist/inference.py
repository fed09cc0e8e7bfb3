"""Ground a phrase in an image in one call: load an adapter with its towers, predict boxes in the image's pixels.

    >>> from peft_m2ist.inference import ground
    >>> ground("photo.jpg", "the cat on the left", adapter="outputs/m2ist-shapes/best_adapter")
    Grounding(phrase='the cat on the left', box=(x0, y0, x1, y1), box_normalized=(...), image_size=(w, h))

or, to keep the model loaded and batch several inputs:

    >>> grounder = ReferringExpressionGrounder.from_pretrained("outputs/m2ist-shapes/best_adapter", device="cpu")
    >>> grounder([image_a, image_b], ["the red circle", "the blue square"])

Which towers: the ones passed, else those recorded in the adapter's ``towers.json`` (written by
``examples/train_rec.py``; fetched from the Hub for a Hub id), else the training example's default towers.
Images are turned upright by their EXIF orientation tag first (as whoever wrote the phrase saw them), so boxes
are ``[x0, y0, x1, y1]`` in pixels of the *displayed* image, clamped to it; ``box_normalized`` divides them by the
image's width and height.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.image_transforms import center_to_corners_format

from .data.collator import RECCollator
from .data.image_files import IMAGE_ERRORS, to_rgb
from .pretrained import TOWER_DTYPES, load_text_tower, load_vision_tower
from .pretrained.towers_file import FALLBACK_TOWERS, TOWERS_FILE, read_towers_file
from .towers.pair import VisionTextPair

logger = logging.getLogger(__name__)

ImageInput = str | os.PathLike | Image.Image | np.ndarray
"""A path, a PIL image, or an array `(height, width)` / `(height, width, 3 or 4)` (uint8, or floats in [0, 1])."""
DEFAULT_ADAPTER = "outputs/m2ist-shapes/best_adapter"
"""Where the README's main job (examples/train_rec.py with examples/configs/default.yaml) saves its best adapter."""


@dataclass(frozen=True)
class Grounding:
    """The box a phrase names in one image.

    Attributes:
        phrase: the referring expression, as given.
        box: ``(x0, y0, x1, y1)`` in pixels of the displayed image, clamped to it.
        box_normalized: the same corners divided by the image's width and height, in [0, 1].
        image_size: ``(width, height)`` of the displayed image.
    """

    phrase: str
    box: tuple[float, float, float, float]
    box_normalized: tuple[float, float, float, float]
    image_size: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        return {"phrase": self.phrase, "box_xyxy_pixels": list(self.box),
                "box_xyxy_normalized": list(self.box_normalized), "image_size": list(self.image_size)}


def load_image(image: ImageInput) -> Image.Image:
    """An RGB ``PIL.Image`` from a path, an image or an array; ``ValueError`` naming what is wrong.

    Files are decoded in full and turned upright by their EXIF orientation; 16-bit images are scaled to 8 bits.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"image {str(path)!r}: no such file")
        try:
            with Image.open(path) as opened:
                return to_rgb(ImageOps.exif_transpose(opened))
        except IMAGE_ERRORS as err:
            raise ValueError(f"image {str(path)!r} is not a readable image ({type(err).__name__}: {err})") from None
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(f"an image array must be (height, width) or (height, width, 1/3/4 channels), got shape "
                             f"{image.shape}")
        if image.dtype != np.uint8:
            if not np.issubdtype(image.dtype, np.floating) or not np.isfinite(image).all():
                raise ValueError(f"an image array must be uint8, or finite floats in [0, 1]; got {image.dtype}")
            image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
        return Image.fromarray(image.squeeze(2) if image.ndim == 3 and image.shape[2] == 1 else image).convert("RGB")
    if isinstance(image, Image.Image):
        return to_rgb(image)
    raise ValueError(f"expected an image path, a PIL image or a numpy array, got {type(image).__name__}")


def check_phrase(phrase: object) -> str:
    """The phrase, or ``ValueError`` for one that is not a string with at least one non-space character."""
    if not isinstance(phrase, str):
        raise ValueError(f"a phrase must be a string, got {type(phrase).__name__}")
    if not phrase.strip():
        raise ValueError("the phrase is empty: say which object to find (e.g. 'the cat on the left')")
    return phrase


class ReferringExpressionGrounder:
    """An M2IST adapter on its frozen towers, in eval mode, with the collator that prepares its inputs.

    Build it with ``from_pretrained``; call it on an image and a phrase (a ``Grounding``), or on lists of them
    (a list of ``Grounding``; one image with several phrases is repeated for each).
    """

    def __init__(self, model: torch.nn.Module, collator: RECCollator, device: torch.device,
                 towers: dict[str, str], adapter: str = "") -> None:
        self.model = model
        self.collator = collator
        self.device = device
        self.towers = towers
        self.adapter = adapter

    @classmethod
    def from_pretrained(
        cls,
        adapter: str | os.PathLike = DEFAULT_ADAPTER,
        *,
        vision_model: str | None = None,
        text_model: str | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> ReferringExpressionGrounder:
        """Load ``adapter`` (a folder written by ``save_pretrained``, or a Hub id) onto its towers.

        Args:
            adapter: the adapter folder or Hub id.
            vision_model, text_model: tower names (Hub ids, folders, ``offline:*``); default: the adapter's
                ``towers.json``, else the training example's default towers.
            dtype: the towers' dtype (``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype); default: the
                adapter's ``towers.json``, else float32.
            device: where to run; default: CUDA when available, else the CPU.

        Raises:
            ValueError: a missing adapter folder, towers that cannot be loaded, or an adapter that does not fit them.
        """
        from peft import PeftModel

        adapter = str(adapter)
        local = Path(adapter).expanduser()
        looks_local = local.exists() or adapter.startswith((".", "/", "~")) or adapter.count("/") > 1
        if looks_local and not (local / "adapter_config.json").is_file():
            hint = ("run the README's main job first (it writes outputs/m2ist-shapes/best_adapter)"
                    if adapter == DEFAULT_ADAPTER else "pass the folder that save_pretrained wrote")
            raise ValueError(f"no adapter at {adapter!r} (no adapter_config.json there); {hint}")
        towers = resolve_towers(adapter, vision_model, text_model, dtype)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            vision, image_processor = load_vision_tower(towers["vision"])
            text, tokenizer = load_text_tower(towers["text"])
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load the towers {towers['vision']!r} + {towers['text']!r} for adapter "
                             f"{adapter!r}: {err}") from err
        torch_dtype = TOWER_DTYPES[towers["dtype"]]
        pair = VisionTextPair(vision.to(torch_dtype), text.to(torch_dtype))
        try:
            model = PeftModel.from_pretrained(pair, adapter)
        except ValueError as err:
            raise ValueError(f"{err}\nThe adapter {adapter!r} was tried on the towers {towers['vision']!r} + "
                             f"{towers['text']!r}; pass the towers it was trained on (vision_model=, text_model=, "
                             "dtype=).") from err
        config = model.peft_config[model.active_adapter]
        collator = RECCollator.from_image_processor(tokenizer, image_processor, image_size=config.image_size,
                                                    max_text_tokens=config.max_text_tokens)
        return cls(model.to(device).eval(), collator, device, towers, adapter)

    @torch.no_grad()
    def __call__(self, images: ImageInput | Sequence[ImageInput], phrases: str | Sequence[str],
                 batch_size: int = 16) -> Grounding | list[Grounding]:
        """Boxes for ``phrases`` in ``images``: one ``Grounding``, or a list for lists (see the class doc)."""
        single = isinstance(phrases, str)
        phrase_list = [phrases] if single else list(phrases)
        image_list = list(images) if isinstance(images, (list, tuple)) else [images]
        if len(image_list) == 1 and len(phrase_list) > 1:
            image_list = image_list * len(phrase_list)
        if len(image_list) != len(phrase_list):
            raise ValueError(f"got {len(image_list)} images but {len(phrase_list)} phrases: give one phrase per "
                             "image, or one image and several phrases")
        if not phrase_list:
            raise ValueError("no phrase given")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        phrase_list = [check_phrase(p) for p in phrase_list]
        loaded = {}
        pictures = []
        for image in image_list:  # the same object given for several phrases is read once
            key = id(image)
            if key not in loaded:
                loaded[key] = self._checked_image(load_image(image))
            pictures.append(loaded[key])
        results = []
        for start in range(0, len(pictures), batch_size):
            chunk = list(zip(pictures[start : start + batch_size], phrase_list[start : start + batch_size]))
            batch = self.collator([{"image": image, "phrase": phrase} for image, phrase in chunk])
            inputs = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            pred = self.model(**inputs).pred_boxes.float().cpu()
            results.extend(self._grounding(image, phrase, box) for (image, phrase), box in zip(chunk, pred))
        return results[0] if single else results

    def _checked_image(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if min(width, height) < 2:
            raise ValueError(f"the image is {width}x{height} pixels: too small to find anything in")
        if min(width, height) * self.collator.image_size / max(width, height) < 1:
            raise ValueError(
                f"the image is {width}x{height} pixels: resized to the model's {self.collator.image_size}-pixel "
                "canvas its short side would be under one pixel; crop it to the region of interest first"
            )
        return image

    @staticmethod
    def _grounding(image: Image.Image, phrase: str, pred_cxcywh: torch.Tensor) -> Grounding:
        """The canvas box (cxcywh in [0, 1] of the padded square; the image's long side spans it, top-left) in
        pixels of ``image``."""
        width, height = image.size
        corners = center_to_corners_format(pred_cxcywh) * max(width, height)
        limits = torch.tensor([width, height, width, height], dtype=corners.dtype)
        box = torch.minimum(corners.clamp(min=0), limits)
        normalized = box / torch.tensor([width, height, width, height], dtype=box.dtype)
        return Grounding(phrase, tuple(float(c) for c in box), tuple(float(c) for c in normalized), (width, height))


def resolve_towers(adapter: str, vision_model: str | None = None, text_model: str | None = None,
                   dtype: str | torch.dtype | None = None) -> dict[str, str]:
    """``{"vision", "text", "dtype", "source"}``: the given values win, then the adapter's ``towers.json``, then
    the training example's default towers (``FALLBACK_TOWERS``); ``source`` says where they came from."""
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in TOWER_DTYPES.items()}
        if dtype not in names:
            raise ValueError(f"dtype {dtype} is not one of {sorted(TOWER_DTYPES)}")
        dtype = names[dtype]
    given = {k: v for k, v in (("vision", vision_model), ("text", text_model), ("dtype", dtype)) if v is not None}
    found = None if len(given) == 3 else read_towers_file(adapter)
    recorded, source = found if found else ({}, None)
    towers = {key: given.get(key, recorded.get(key, FALLBACK_TOWERS[key])) for key in ("vision", "text", "dtype")}
    if towers["dtype"] not in TOWER_DTYPES:
        raise ValueError(f"tower dtype {towers['dtype']!r} is not one of {sorted(TOWER_DTYPES)}")
    towers["source"] = source or f"no {TOWERS_FILE} with the adapter: the training example's default towers"
    return towers


_CACHE: dict[tuple, ReferringExpressionGrounder] = {}


def ground(image: ImageInput | Sequence[ImageInput], phrase: str | Sequence[str],
           adapter: str | os.PathLike = DEFAULT_ADAPTER, **kwargs: Any) -> Grounding | list[Grounding]:
    """One call: load ``adapter`` (once per process and settings) and ground ``phrase`` in ``image``.

    ``kwargs`` go to ``ReferringExpressionGrounder.from_pretrained`` (``vision_model``, ``text_model``, ``dtype``,
    ``device``). Returns a ``Grounding`` (or a list of them for lists of phrases).
    """
    key = (str(adapter), *sorted((k, str(v)) for k, v in kwargs.items()))
    if key not in _CACHE:
        _CACHE[key] = ReferringExpressionGrounder.from_pretrained(adapter, **kwargs)
    return _CACHE[key](image, phrase)
