"""An adapter as a folder that onnxruntime runs without torch: the graph, the tokenizer and the preprocessing.

    >>> from peft_m2ist.export import export_adapter
    >>> export_adapter("outputs/m2ist-shapes/best_adapter", "outputs/m2ist-shapes/onnx")

writes ``model.onnx`` (`peft_m2ist.export.onnx`), the text tower's tokenizer (``save_pretrained``) and
``preprocessing.json``: the canvas size `S`, the image processor's mean and std, the text length `L` and the box
format, everything a caller needs to build the graph's inputs as `RECCollator` does (docs/deploy.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..loading import load_adapter_with_towers
from .onnx import INPUT_NAMES, OUTPUT_NAMES, OnnxExport, check_round_trip, export_onnx

BUNDLE_MODEL = "model.onnx"
BUNDLE_PREPROCESSING = "preprocessing.json"


def preprocessing(export: OnnxExport, image_processor: Any, towers: dict[str, str], adapter: str) -> dict[str, Any]:
    """The contents of ``preprocessing.json`` for `export` (see the module doc)."""
    return {
        "image_size": export.image_size,
        "image_mean": [float(v) for v in image_processor.image_mean],
        "image_std": [float(v) for v in image_processor.image_std],
        "resize": "long side to image_size, bilinear; image at the canvas's top-left; padding 0, pixel_mask 0",
        "max_text_tokens": export.text_tokens,
        "tokenizer": "padding='max_length', truncation=True, max_length=max_text_tokens",
        "inputs": list(INPUT_NAMES),
        "outputs": list(OUTPUT_NAMES),
        "boxes": "cxcywh normalised to [0, 1] of the canvas; multiply by the image's long side for pixels",
        "towers": {key: towers[key] for key in ("vision", "text")},
        "adapter": adapter,
        "torch": torch.__version__,
    }


def export_adapter(adapter: str | os.PathLike, output_dir: str | os.PathLike, *, vision_model: str | None = None,
                   text_model: str | None = None, check: bool = True, atol: float = 1e-4) -> dict[str, Any]:
    """Load `adapter` on the towers it records (`load_adapter_with_towers`, in float32) and write its bundle into
    `output_dir`: ``model.onnx``, the tokenizer and ``preprocessing.json``.

    With `check`, onnxruntime runs the written graph on the traced inputs and its boxes must match torch's within
    `atol` (else `ValueError`). Returns ``preprocessing.json``'s contents plus ``max_abs_difference`` (with `check`).

    Raises:
        ValueError: the adapter cannot be loaded, or the round trip differs by more than `atol`.
        OnnxExportError: a piece of the model cannot be exported (named in the message).
    """
    output_dir = Path(output_dir)
    loaded = load_adapter_with_towers(str(adapter), vision_model=vision_model, text_model=text_model,
                                      dtype="float32")
    export = export_onnx(loaded.model, output_dir / BUNDLE_MODEL)
    loaded.tokenizer.save_pretrained(str(output_dir))
    info = preprocessing(export, loaded.image_processor, loaded.towers, str(adapter))
    (output_dir / BUNDLE_PREPROCESSING).write_text(json.dumps(info, indent=2) + "\n")
    if check:
        info["max_abs_difference"] = check_round_trip(export, atol)
    return info
