"""The tap layer: a pass-through `BaseTunerLayer` that hands a detached copy of its output to the side network."""

from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..towers.recording import TapRecorder
from ..towers.tokens import output_tensor


class M2ISTTapLayer(nn.Module, BaseTunerLayer):
    """Wraps one tower module: returns its output unchanged and records `output.detach()` under `tap_name`.

    The tap has no weights; `m2ist_tapped_by` lists the adapters that read it, so peft's adapter bookkeeping
    (`set_adapter`, `delete_adapter`, `disable_adapter`) works on it like on any tuner layer.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ("m2ist_tapped_by",)

    def __init__(self, base_layer: nn.Module, tap_name: str, recorder: TapRecorder, adapter_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.tap_name = tap_name
        self._recorder = recorder
        self.m2ist_tapped_by: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.update_layer(adapter_name)
        self._active_adapter = adapter_name

    def update_layer(self, adapter_name: str) -> None:
        self.m2ist_tapped_by[adapter_name] = True

    def take_over(self, recorder: TapRecorder, adapter_name: str) -> None:
        """Record for another M2IST model from now on (`get_peft_model` or `PeftModel.from_pretrained` called again on
        towers that a first model already tapped): the first model's recorder is marked as taken over, so its next
        forward says why it cannot run instead of finding no records."""
        if recorder is self._recorder:
            self.update_layer(adapter_name)
            return
        self._recorder.taken_over = True
        self._recorder = recorder
        self.m2ist_tapped_by = {adapter_name: True}
        self._active_adapter = adapter_name

    def _get_available_adapters(self) -> set[str]:
        return set(self.m2ist_tapped_by)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        self._active_adapter = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError("M2IST is a side network: there is nothing to merge into the tower weights.")

    def unmerge(self) -> None:
        raise NotImplementedError("M2IST is a side network: there is nothing to unmerge.")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.base_layer(*args, **kwargs)
        recorder = self._recorder
        if recorder.wants(self.tap_name) and not self.disable_adapters:
            recorder.records[self.tap_name] = output_tensor(output).detach()
        return output

    def __getattr__(self, name: str) -> Any:
        """Towers read attributes of their sub-modules (`embeddings.patch_embeddings`, ...): serve the wrapped one's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def __repr__(self) -> str:
        return f"m2ist.{super().__repr__()}"
