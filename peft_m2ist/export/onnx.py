"""The grounding model as one ONNX graph: a preprocessed batch in, the boxes out.

    >>> from peft_m2ist.export import export_onnx
    >>> export_onnx(model, "m2ist.onnx")  # model: `get_peft_model(pair, M2ISTConfig(...))`, or a loaded adapter

The graph (`BoxPredictor`, exported with `torch.onnx.export(..., dynamo=True)`):

* inputs ``pixel_values`` float32 `(batch, channels, S, S)`, ``pixel_mask`` int64 `(batch, S, S)`, ``input_ids`` int64
  `(batch, L)`, ``attention_mask`` int64 `(batch, L)`, as `RECCollator` returns them;
* output ``pred_boxes`` float32 `(batch, 4)`, `cxcywh` normalised to [0, 1] of the padded `S x S` canvas.

The batch is dynamic; `S` is the adapter's ``image_size`` and `L` its ``max_text_tokens`` (the collator pads every
phrase to it), both fixed. The towers, the taps, the side network and the head are all in the graph; the checks of
the inputs' values (finite pixels, token ids inside the vocabulary) are not: they read tensor values in Python, which
a traced graph cannot do. A tower whose operations cannot be exported raises `OnnxExportError` naming the tower, its
module and the operation (`peft_m2ist.export.diagnosis`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..modeling.grounding import ground
from ..towers.features import TowerFeatures
from ..towers.forward import num_channels
from ..towers.validation import text_vocab_size
from .diagnosis import OnnxExportError, tower_names, unsupported_piece

INPUT_NAMES = ("pixel_values", "pixel_mask", "input_ids", "attention_mask")
"""The graph's inputs, in order."""
OUTPUT_NAMES = ("pred_boxes",)
"""The graph's output: `(batch, 4)` boxes, `cxcywh` normalised to [0, 1]."""
EXAMPLE_BATCH = 2
"""The batch the graph is traced at (a batch of 1 would be taken for a constant); every batch size runs."""


def _tuner(model: nn.Module) -> nn.Module:
    """The `M2ISTModel` of a `PeftModel` (or the tuner itself); a `ValueError` for anything else."""
    tuner = getattr(model, "base_model", model)
    if not all(hasattr(tuner, name) for name in ("tower_encoder", "m2ist_side", "m2ist_head", "peft_config")):
        raise ValueError(f"expected an M2IST model (`get_peft_model(pair, M2ISTConfig(...))` or a loaded M2IST "
                         f"adapter), got {type(model).__name__}")
    return tuner


class BoxPredictor(nn.Module):
    """The active adapter on its towers, returning only the boxes: what `export_onnx` traces.

    `forward(pixel_values, pixel_mask, input_ids, attention_mask)` runs the same towers, taps, side network and head
    as the model's own forward, without the value checks and without `tower_micro_batch_size` (the features are the
    same; the export runs the whole batch at once), and returns `pred_boxes` `(batch, 4)`, `cxcywh` in [0, 1].
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        tuner = _tuner(model)
        if getattr(tuner, "_m2ist_disabled", False):
            raise ValueError("the adapter is disabled (inside `disable_adapter()`): the towers alone predict no box, "
                             "so there is nothing to export; export outside that context")
        self.model = model
        self.adapter = tuner._require_adapter()

    @property
    def tuner(self) -> nn.Module:
        return _tuner(self.model)

    @property
    def config(self):
        """The active adapter's `M2ISTConfig`."""
        return self.tuner.peft_config[self.adapter]

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        tuner = self.tuner
        encoder = tuner.tower_encoder()
        encoder.tower_micro_batch_size = None
        features: TowerFeatures = encoder.run_checked(pixel_values, input_ids, attention_mask, pixel_mask)
        return ground(self.config, tuner.m2ist_side[self.adapter], tuner.m2ist_head[self.adapter], features).pred_boxes


def example_inputs(predictor: BoxPredictor, batch: int = EXAMPLE_BATCH, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of the graph's shapes and dtypes on the towers' device: `(batch, channels, S, S)` normal pixels,
    a `pixel_mask` with the right half of the first image padded, token ids inside the text tower's vocabulary and an
    `attention_mask` with the first phrase's last two tokens padded."""
    config = predictor.config
    encoder = predictor.tuner.tower_encoder()
    device = next(encoder.vision_tower.parameters()).device
    size, tokens = int(config.image_size), int(config.max_text_tokens)
    generator = torch.Generator().manual_seed(seed)
    vocab = text_vocab_size(encoder.text_tower) or 100
    inputs = {
        "pixel_values": torch.randn(batch, num_channels(encoder.vision_tower), size, size, generator=generator),
        "pixel_mask": torch.ones(batch, size, size, dtype=torch.long),
        "input_ids": torch.randint(min(3, vocab - 1), vocab, (batch, tokens), generator=generator),
        "attention_mask": torch.ones(batch, tokens, dtype=torch.long),
    }
    inputs["pixel_mask"][0, :, size // 2 :] = 0
    inputs["attention_mask"][0, max(1, tokens - 2) :] = 0
    return {name: tensor.to(device) for name, tensor in inputs.items()}


@dataclass(frozen=True)
class OnnxExport:
    """What `export_onnx` wrote: the file, the fixed sizes, the inputs it was traced and checked on, and torch's
    boxes for them (`reference_boxes`, `(batch, 4)` cxcywh)."""

    path: Path
    image_size: int
    text_tokens: int
    inputs: dict[str, torch.Tensor]
    reference_boxes: torch.Tensor


def export_onnx(model: nn.Module, path: str | os.PathLike, *, opset_version: int | None = None,
                batch: int = EXAMPLE_BATCH) -> OnnxExport:
    """Export the active adapter on its towers to the ONNX file `path` (a dynamic batch; see the module doc).

    The model is put in eval mode for the export and given back in the modes it had. The torch forward runs first
    on the example inputs (with every input check), so a model that cannot predict fails as it would in torch.

    Raises:
        ValueError: `model` is not an M2IST model, or its adapter is disabled.
        OnnxExportError: a piece of the model cannot be exported; the message names the tower, its module and the
            operation.
    """
    if batch < 2:
        raise ValueError(f"batch must be >= 2 (a traced batch of 1 would be fixed into the graph), got {batch}")
    predictor = BoxPredictor(model)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        inputs = example_inputs(predictor, batch)
        with torch.no_grad():
            reference = model(**inputs).pred_boxes
            program = _export(predictor, inputs, opset_version)
    finally:
        for module, mode in modes:
            module.training = mode
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    return OnnxExport(path, int(predictor.config.image_size), int(predictor.config.max_text_tokens),
                      {k: v.detach().cpu() for k, v in inputs.items()}, reference.detach().float().cpu())


def _export(predictor: BoxPredictor, inputs: dict[str, torch.Tensor], opset_version: int | None):
    """`torch.export` with a dynamic batch, then the ONNX translation; a failure of either becomes an
    `OnnxExportError` naming the piece that failed."""
    batch = torch.export.Dim("batch", min=1)
    dynamic = {name: {0: batch} for name in INPUT_NAMES}
    args = tuple(inputs[name] for name in INPUT_NAMES)
    towers = tower_names(predictor, predictor.tuner.tower_encoder())
    try:
        exported = torch.export.export(predictor, args, dynamic_shapes=dynamic, strict=False)
    except Exception as err:
        raise OnnxExportError.from_failure("torch.export", err, unsupported_piece(err, predictor, towers)) from err
    try:
        return torch.onnx.export(exported, args, dynamo=True, input_names=list(INPUT_NAMES),
                                 output_names=list(OUTPUT_NAMES), opset_version=opset_version, verbose=False)
    except Exception as err:
        raise OnnxExportError.from_failure("the ONNX translation", err,
                                           unsupported_piece(err, predictor, towers, exported)) from err


def onnxruntime_boxes(path: str | os.PathLike, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ONNX file's `pred_boxes` for `inputs` (the graph's input names -> tensors), run by onnxruntime on the CPU."""
    import onnxruntime  # the `[onnx]` extra

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: inputs[name].detach().cpu().numpy() for name in INPUT_NAMES}
    return torch.from_numpy(session.run(list(OUTPUT_NAMES), feed)[0])


def check_round_trip(export: OnnxExport, atol: float = 1e-4) -> float:
    """onnxruntime's boxes for the inputs the export was traced on against torch's; returns the largest absolute
    difference, or raises `ValueError` when it exceeds `atol`."""
    difference = float((onnxruntime_boxes(export.path, export.inputs) - export.reference_boxes).abs().max())
    if not difference <= atol:
        raise ValueError(f"{export.path}: onnxruntime's boxes differ from torch's by {difference:.3g} (> {atol:g})")
    return difference
