"""Ground a phrase in an image in one call: load an adapter with its towers, predict boxes in the image's pixels.

    >>> from peft_m2ist.inference import ground
    >>> ground("photo.jpg", "the cat on the left", adapter="outputs/m2ist-shapes/best_adapter")
    Grounding(phrase='the cat on the left', box=(x0, y0, x1, y1), box_normalized=(...), image_size=(w, h))

or, to keep the model loaded and batch several inputs:

    >>> grounder = ReferringExpressionGrounder.from_pretrained("outputs/m2ist-shapes/best_adapter", device="cpu")
    >>> grounder([image_a, image_b], ["the red circle", "the blue square"])

several adapters on the same towers, one per input (the towers run once per batch):

    >>> grounder = ReferringExpressionGrounder.from_pretrained(adapter_a, extra_adapters={"b": adapter_b})
    >>> grounder([image_a, image_b], ["the red circle", "the blue square"], adapter_names=["default", "b"])

Which towers: the ones passed, else those the adapter records (``base_towers`` in its ``adapter_config.json``, or
the ``towers.json`` of adapters saved before that; read from the Hub for a Hub id): see ``peft_m2ist.loading``. An
adapter that records no towers, with none passed, is refused with a message naming the arguments to pass.
Images are turned upright by their EXIF orientation tag first (as whoever wrote the phrase saw them), so boxes
are ``[x0, y0, x1, y1]`` in pixels of the *displayed* image, clamped to it; ``box_normalized`` divides them by the
image's width and height.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.image_transforms import center_to_corners_format

from .data.collator import RECCollator
from .data.image_files import IMAGE_ERRORS, to_rgb
from .loading import check_adapter_location, load_adapter_with_towers, read_recorded_towers
from .tuner.config import M2ISTConfig

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
    (a list of ``Grounding``; one image with several phrases is repeated for each). Further adapters trained on the
    same towers load beside the first (``extra_adapters=``, ``load_adapter``); ``adapter_names=`` then picks one per
    input, and each batch runs the towers once for all of them.

    Attributes:
        adapter: the first adapter's folder or Hub id (adapter name ``"default"``).
        adapters: adapter name -> folder or Hub id, for every adapter loaded.
    """

    def __init__(self, model: torch.nn.Module, collator: RECCollator, device: torch.device,
                 towers: dict[str, str], adapter: str = "") -> None:
        self.model = model
        self.collator = collator
        self.device = device
        self.towers = towers
        self.adapter = adapter
        self.adapters: dict[str, str] = {getattr(model, "active_adapter", "default"): adapter}

    @classmethod
    def from_pretrained(
        cls,
        adapter: str | os.PathLike = DEFAULT_ADAPTER,
        *,
        vision_model: str | None = None,
        text_model: str | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        extra_adapters: Mapping[str, str | os.PathLike] | None = None,
    ) -> ReferringExpressionGrounder:
        """Load ``adapter`` (a folder written by ``save_pretrained``, or a Hub id) onto the towers it records
        (``peft_m2ist.loading.load_adapter_with_towers``), under the adapter name ``"default"``, and each of
        ``extra_adapters`` beside it (``load_adapter``).

        Args:
            adapter: the adapter folder or Hub id.
            vision_model, text_model: tower names (Hub ids, folders, ``offline:*``); default: the ones the adapter
                records.
            dtype: the towers' dtype (``"float32"``, ``"bfloat16"``, ``"float16"``, a torch dtype, or ``"int8"``:
                float32 towers with weight-only int8 weights); default: the recorded one, else float32.
            device: where to run; default: CUDA when available, else the CPU.
            extra_adapters: adapter name -> folder or Hub id of further adapters trained on the same towers, for
                ``adapter_names=`` in calls.

        Raises:
            ValueError: a missing adapter folder, an adapter that records no towers when none are given, towers
                that cannot be loaded, or an adapter that does not fit them.
        """
        adapter = str(adapter)
        check_adapter_location(adapter, "run the README's main job first (it writes outputs/m2ist-shapes/best_adapter)"
                               if adapter == DEFAULT_ADAPTER else "pass the folder that save_pretrained wrote")
        loaded = load_adapter_with_towers(adapter, vision_model=vision_model, text_model=text_model, dtype=dtype)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        config = loaded.model.peft_config[loaded.model.active_adapter]
        collator = RECCollator.from_image_processor(loaded.tokenizer, loaded.image_processor,
                                                    image_size=config.image_size,
                                                    max_text_tokens=config.max_text_tokens)
        grounder = cls(loaded.model.to(device).eval(), collator, device, loaded.towers, adapter)
        for name, path in (extra_adapters or {}).items():
            grounder.load_adapter(path, name)
        return grounder

    def load_adapter(self, adapter: str | os.PathLike, adapter_name: str) -> None:
        """Load another adapter (a folder written by ``save_pretrained``, or a Hub id) beside the loaded ones, under
        ``adapter_name`` (peft's ``load_adapter``), in inference mode on this grounder's device.

        It must fit these towers (the shapes are checked) and read images and texts as the first adapter does (same
        ``image_size`` and ``max_text_tokens``: one collator prepares every input); towers recorded under other
        names than this grounder's are only warned about, as a folder and a Hub id may name the same towers.

        Raises:
            ValueError: a name already loaded, a missing adapter folder, other input sizes, or an adapter that
                does not fit these towers.
        """
        adapter = str(adapter)
        if adapter_name in self.model.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} is loaded already (loaded: "
                             f"{sorted(self.model.peft_config)}); pick another name")
        check_adapter_location(adapter)
        recorded, _ = read_recorded_towers(adapter)
        config = self.model.peft_config[next(iter(self.adapters))]
        saved = M2ISTConfig.from_pretrained(adapter)
        differ = [f"{field}={getattr(saved, field)} (loaded adapters: {getattr(config, field)})"
                  for field in ("image_size", "max_text_tokens") if getattr(saved, field) != getattr(config, field)]
        if differ:
            raise ValueError(f"adapter {adapter!r} reads its inputs at other sizes than the loaded adapters: "
                             f"{', '.join(differ)}; load it in a grounder of its own")
        other = {key: value for key, value in recorded.items() if key in ("vision", "text")
                 and value != self.towers.get(key)}
        if other:
            logger.warning("adapter %r records other towers (%s) than this grounder's (%s + %s); it is loaded on "
                           "these", adapter, other, self.towers.get("vision"), self.towers.get("text"))
        self.model.load_adapter(adapter, adapter_name=adapter_name)
        self.model.eval()  # the new side network and head too (no dropout)
        self.adapters[adapter_name] = adapter

    @torch.no_grad()
    def __call__(self, images: ImageInput | Sequence[ImageInput], phrases: str | Sequence[str],
                 batch_size: int = 16, adapter_names: str | Sequence[str] | None = None) -> Grounding | list[Grounding]:
        """Boxes for ``phrases`` in ``images``: one ``Grounding``, or a list for lists (see the class doc).

        ``adapter_names``: the adapter (a name of ``adapters``) for every input, or a list of one name per phrase;
        default: the first adapter. Each batch of ``batch_size`` inputs runs the towers once for all its adapters.
        """
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
        names = self._adapter_names(adapter_names, len(phrase_list))
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
            if names is not None:
                inputs["adapter_names"] = names[start : start + batch_size]
            pred = self.model(**inputs).pred_boxes.float().cpu()
            results.extend(self._grounding(image, phrase, box) for (image, phrase), box in zip(chunk, pred))
        return results[0] if single else results

    def _adapter_names(self, adapter_names: str | Sequence[str] | None, count: int) -> list[str] | None:
        """One loaded adapter name per input (``None``: the first adapter for all); ``ValueError`` naming the
        unknown names and the loaded ones, or a count that is not one per phrase."""
        if adapter_names is None:
            return None
        names = [adapter_names] * count if isinstance(adapter_names, str) else list(adapter_names)
        unknown = sorted(set(names) - set(self.adapters))
        if unknown:
            raise ValueError(f"unknown adapter name(s) {unknown}; loaded adapters: {sorted(self.adapters)}")
        if len(names) != count:
            raise ValueError(f"got {len(names)} adapter names for {count} phrases: give one per phrase, or one name "
                             "for all")
        return names

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


_CACHE: dict[tuple, ReferringExpressionGrounder] = {}


def ground(image: ImageInput | Sequence[ImageInput], phrase: str | Sequence[str],
           adapter: str | os.PathLike = DEFAULT_ADAPTER, *, adapter_names: str | Sequence[str] | None = None,
           **kwargs: Any) -> Grounding | list[Grounding]:
    """One call: load ``adapter`` (once per process and settings) and ground ``phrase`` in ``image``.

    ``kwargs`` go to ``ReferringExpressionGrounder.from_pretrained`` (``vision_model``, ``text_model``, ``dtype``,
    ``device``, ``extra_adapters``); ``adapter_names`` picks the adapter of each phrase among ``"default"`` (the
    ``adapter``) and the names of ``extra_adapters``. Returns a ``Grounding`` (or a list of them for lists of
    phrases).
    """
    key = (str(adapter), *sorted((k, str(v)) for k, v in kwargs.items()))
    if key not in _CACHE:
        _CACHE[key] = ReferringExpressionGrounder.from_pretrained(adapter, **kwargs)
    return _CACHE[key](image, phrase, adapter_names=adapter_names)
