"""Data for referring expression comprehension: benchmark, real-format readers, transforms, collator.

Internal record format (every loader produces it, the collator consumes it)
-------------------------------------------------------------------------
One record = one (image, phrase, box) triple, a dict or a ``datasets`` row with:

- ``image``: RGB ``PIL.Image`` (``datasets.Image(mode="RGB")`` feature in a ``Dataset``);
- ``bbox``: ``[x0, y0, x1, y1]`` float, absolute pixel corners on that image
  (x0 < x1 <= width, y0 < y1 <= height; a pixel (i, j) covers [i, i+1) x [j, j+1));
- ``phrase``: str, the referring expression;
- ``phrase_type``: str; the shapes benchmark uses attribute / relation / position / ordinal,
  real formats "unknown" unless the source gives a type;
- ``scene_id`` (shapes benchmark, int) or ``image_id`` (real formats, str): which image.

Loaders may add columns (e.g. ``ref_id``); the collator ignores them.

Model inputs (``RECCollator``)
------------------------------
``pixel_values`` float (B, 3, S, S) normalised; ``pixel_mask`` long (B, S, S), 1 = image,
0 = padding; ``input_ids`` / ``attention_mask`` (B, L); ``labels`` float (B, 4) ``cxcywh``
normalised to [0, 1] of the S x S canvas (only when the records have a ``bbox``); ``phrase_type`` list[str]
(metadata the model ignores: ``model(**batch)`` takes the batch as it is).
"""

from peft_m2ist.data.collator import RECCollator
from peft_m2ist.data.controls import CONTROLS, apply_control
from peft_m2ist.data.hf import load_hf_rec
from peft_m2ist.data.records import BOX_TOLERANCE_PX, LoadReport, LoadResult, RecordError
from peft_m2ist.data.refer import load_refer
from peft_m2ist.data.safe_pickle import UnsafePickleError, load_pth_list, load_refs_pickle
from peft_m2ist.data.transforms import CanvasSample, TrainAugment, flip_phrase, names_position, resize_and_pad
from peft_m2ist.data.transvg import load_transvg

_BENCHMARK_NAMES = ("BenchmarkConfig", "chance_level", "heldout_combinations", "load_shapes_benchmark")


def __getattr__(name: str):
    # The benchmark module is imported on first use, so `python -m peft_m2ist.data.benchmark`
    # does not find it already imported by the package.
    if name in _BENCHMARK_NAMES:
        from peft_m2ist.data import benchmark

        return getattr(benchmark, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BOX_TOLERANCE_PX",
    "CONTROLS",
    "BenchmarkConfig",
    "CanvasSample",
    "LoadReport",
    "LoadResult",
    "RECCollator",
    "RecordError",
    "TrainAugment",
    "UnsafePickleError",
    "apply_control",
    "chance_level",
    "flip_phrase",
    "heldout_combinations",
    "load_hf_rec",
    "load_pth_list",
    "load_refer",
    "load_refs_pickle",
    "load_shapes_benchmark",
    "load_transvg",
    "names_position",
    "resize_and_pad",
]
