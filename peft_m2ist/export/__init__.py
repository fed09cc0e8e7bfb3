"""ONNX export of an M2IST adapter on its towers (the ``[onnx]`` extra: onnx, onnxruntime, onnxscript).

* `export_onnx(model, path)`: the model as one graph, a preprocessed batch in, ``pred_boxes`` out (`onnx`);
* `export_adapter(adapter, folder)`: an adapter folder or Hub id, loaded on the towers it records, written as a
  folder that onnxruntime runs without torch: ``model.onnx``, the tokenizer and ``preprocessing.json`` (`bundle`);
* `OnnxExportError`: a piece of the model that cannot be exported, named (`diagnosis`).

See docs/deploy.md.
"""

from .bundle import BUNDLE_MODEL, BUNDLE_PREPROCESSING, export_adapter
from .diagnosis import OnnxExportError, Piece
from .onnx import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    BoxPredictor,
    OnnxExport,
    check_round_trip,
    example_inputs,
    export_onnx,
    onnxruntime_boxes,
)

__all__ = [
    "BUNDLE_MODEL",
    "BUNDLE_PREPROCESSING",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "BoxPredictor",
    "OnnxExport",
    "OnnxExportError",
    "Piece",
    "check_round_trip",
    "example_inputs",
    "export_adapter",
    "export_onnx",
    "onnxruntime_boxes",
]
