"""`TowerEncoder`: the frozen towers of a pair run on one batch, with the taps recording, as `TowerFeatures`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .features import TAP_KEY_PREFIX, TowerFeatures
from .forward import frozen, run_text_tower, run_vision_tower
from .recording import TapRecorder
from .tokens import match_grid, to_tokens
from .validation import (
    check_devices,
    check_finite_pixels,
    check_token_ids,
    text_vocab_size,
    validate_image_size,
    validate_inputs,
    validate_text_inputs,
    validate_vision_inputs,
)

TAKEN_OVER = (
    "The towers of this M2IST model were wrapped again (`get_peft_model` or `PeftModel.from_pretrained` on the same "
    "pair), and their taps now feed that newer model. Use the newer model, or give each model its own pair (e.g. "
    "`copy.deepcopy(pair)`)."
)


class TowerEncoder:
    """Runs a vision tower and a text tower frozen (eval mode, `torch.no_grad()`) and returns what a side network
    reads: the final tokens, the masks and the outputs of the taps named `vision_taps` and `text_taps`.

    Every call validates its inputs and checks that they sit on their tower's device before a tower runs; with
    `tower_micro_batch_size` the towers run on that many samples at a time, each micro-batch's outputs written
    straight into whole-batch tensors (the same features, a lower peak memory).

    Args:
        vision_tower, text_tower: the towers, whose tapped modules hand their outputs to `recorder`.
        recorder: the `TapRecorder` the taps write into.
        vision_taps, text_taps: full names (in the container) of the taps to record on each tower.
        image_size: the square size `S` that `pixel_values` must have.
        max_text_tokens: the longest `input_ids` accepted.
        tower_micro_batch_size: samples per tower run; `None` runs the whole batch at once.
        record_taps: `False` runs the towers alone (the taps record nothing; no `tap:` keys in the output).
    """

    def __init__(
        self,
        vision_tower: nn.Module,
        text_tower: nn.Module,
        recorder: TapRecorder,
        vision_taps: Sequence[str],
        text_taps: Sequence[str],
        *,
        image_size: int,
        max_text_tokens: int,
        tower_micro_batch_size: int | None = None,
        record_taps: bool = True,
    ) -> None:
        self.vision_tower = vision_tower
        self.text_tower = text_tower
        self.recorder = recorder
        self.vision_taps = list(vision_taps)
        self.text_taps = list(text_taps)
        self.image_size = image_size
        self.max_text_tokens = max_text_tokens
        self.tower_micro_batch_size = tower_micro_batch_size
        self.record_taps = record_taps

    def encode(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
    ) -> TowerFeatures:
        """Both towers on one batch: `pixel_values` `(batch, channels, S, S)`, `input_ids` `(batch, L)`, the masks
        `(batch, L)` (default all ones) and `(batch, S, S)` (default all real)."""
        validate_inputs(pixel_values, input_ids, attention_mask, pixel_mask, None, self.max_text_tokens)
        validate_image_size(pixel_values, self.image_size)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        check_devices(self.vision_tower, {"pixel_values": pixel_values, "pixel_mask": pixel_mask}, "vision")
        check_devices(self.text_tower, {"input_ids": input_ids, "attention_mask": attention_mask}, "text")
        check_finite_pixels(pixel_values)
        check_token_ids(input_ids, text_vocab_size(self.text_tower))
        return self.run_checked(pixel_values, input_ids, attention_mask, pixel_mask)

    def run_checked(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    pixel_mask: torch.Tensor | None = None) -> TowerFeatures:
        """`encode` on inputs already checked: no validation, so no Python branch reads a tensor's values (what
        `torch.export` traces for the ONNX export, `peft_m2ist.export`). `attention_mask` is required here."""
        with frozen(self.vision_tower, self.text_tower):
            return TowerFeatures.from_tensors(self._in_micro_batches(input_ids.shape[0], lambda i, j: {
                **self._vision(pixel_values[i:j], None if pixel_mask is None else pixel_mask[i:j]),
                **self._text(input_ids[i:j], attention_mask[i:j])}))

    def encode_vision(self, pixel_values: torch.Tensor,
                      pixel_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The vision half of `encode(...).to_tensors()`: `vision` `(batch, Nv, Dv)`, `vision_mask` `(batch, Nv)`
        when there is one, and `tap:<name>` `(batch, Nv, dim)` per vision tap, pooled onto the final grid."""
        validate_vision_inputs(pixel_values, pixel_mask)
        validate_image_size(pixel_values, self.image_size)
        check_devices(self.vision_tower, {"pixel_values": pixel_values, "pixel_mask": pixel_mask}, "vision")
        check_finite_pixels(pixel_values)
        with frozen(self.vision_tower):
            return self._in_micro_batches(pixel_values.shape[0], lambda i, j: self._vision(
                pixel_values[i:j], None if pixel_mask is None else pixel_mask[i:j]))

    def encode_text(self, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The text half of `encode(...).to_tensors()`: `text` `(batch, Nt, Dt)`, `text_mask` `(batch, Nt)` and
        `tap:<name>` `(batch, Nt, dim)` per text tap."""
        validate_text_inputs(input_ids, attention_mask, self.max_text_tokens)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        check_devices(self.text_tower, {"input_ids": input_ids, "attention_mask": attention_mask}, "text")
        check_token_ids(input_ids, text_vocab_size(self.text_tower))
        with frozen(self.text_tower):
            return self._in_micro_batches(input_ids.shape[0], lambda i, j: self._text(
                input_ids[i:j], attention_mask[i:j]))

    def _in_micro_batches(self, batch: int,
                          encode: Callable[[int, int], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """`encode(start, end)` over `tower_micro_batch_size` samples at a time (all at once when unset); each
        micro-batch's outputs go straight into whole-batch tensors, so no two copies coexist."""
        step = self.tower_micro_batch_size or batch
        if step >= batch:
            return encode(0, batch)
        whole: dict[str, torch.Tensor] = {}
        for i in range(0, batch, step):
            chunk = encode(i, min(i + step, batch))
            for key, value in chunk.items():
                if key not in whole:
                    whole[key] = value.new_empty((batch, *value.shape[1:]))
                whole[key][i : i + step] = value
            del chunk
        return whole

    def _recording(self, taps: list[str], run_tower: Callable[[], object]) -> tuple[object, dict[str, torch.Tensor]]:
        """`run_tower()` with `taps` recording (unless `record_taps` is off); its output and the recorded taps."""
        if self.recorder.taken_over:
            raise RuntimeError(TAKEN_OVER)
        if self.record_taps:
            self.recorder.start(taps)
        try:
            output = run_tower()
        finally:
            records = self.recorder.stop()
        return output, records

    def _vision(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        vision, records = self._recording(self.vision_taps,
                                          lambda: run_vision_tower(self.vision_tower, pixel_values, pixel_mask))
        tensors = {"vision": vision.tokens.tensor}
        if vision.mask is not None:
            tensors["vision_mask"] = vision.mask
        for name, tensor in records.items():  # feature-map taps pooled onto the final grid, once, here
            tensors[f"{TAP_KEY_PREFIX}{name}"] = match_grid(to_tokens(tensor), vision.tokens.num_tokens,
                                                            vision.tokens.grid)
        return tensors

    def _text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        text, records = self._recording(self.text_taps,
                                        lambda: run_text_tower(self.text_tower, input_ids, attention_mask))
        return {"text": text.tokens.tensor, "text_mask": text.mask,
                **{f"{TAP_KEY_PREFIX}{name}": to_tokens(tensor).tensor for name, tensor in records.items()}}
