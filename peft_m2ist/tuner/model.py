"""`M2ISTModel`: the peft `BaseTuner` that places the taps and owns each adapter's side network and grounding head.

It keeps peft's hooks only: tap placement, adapter management (set, delete, disable, unload), the state-dict keys
and the all-or-nothing load (`adapter_keys`). The work is elsewhere: planning on a pair (`plan`), running the frozen
towers with the taps recording (`peft_m2ist.towers.encoder.TowerEncoder`), the REC forward from their features
(`peft_m2ist.modeling.grounding`), the size budget (`budget`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..modeling.grounding import check_forward_kwargs, ground, towers_alone
from ..modeling.outputs import ReferringExpressionOutput
from ..towers.encoder import TowerEncoder
from ..towers.features import TowerFeatures
from ..towers.layouts import get_tower
from ..towers.recording import TapRecorder
from . import adapter_keys
from .adapter_modules import (
    build_adapter_modules,
    check_adapter_budget,
    move_to_tower_device,
    parameter_counts,
)
from .config import M2ISTConfig
from .layer import M2ISTTapLayer
from .mixed_batch import check_adapter_names, mixed_batch_forward, union_tower_encoder
from .plan import check_plan_matches_config, check_saved_shapes_are_complete, plan_adapter, record_plan
from .tower_record import record_base_towers
from .trainer_support import declare_rec_signature, restore_container_class


class M2ISTModel(BaseTuner):
    """Side-tunes a frozen vision tower and a frozen text tower for referring expression comprehension.

    The towers are never modified: pass-through taps record chosen module outputs, the towers run in eval mode under
    `torch.no_grad()`, and each adapter's side network (`m2ist_side[adapter]`) and grounding head
    (`m2ist_head[adapter]`) turn the recorded activations into a box. Backward never enters a tower.

    Example:

        ```py
        >>> from peft import get_peft_model
        >>> from transformers import BertConfig, BertModel, ViTConfig, ViTModel
        >>> from peft_m2ist import M2ISTConfig, VisionTextPair
        >>> pair = VisionTextPair(ViTModel(ViTConfig(image_size=64)), BertModel(BertConfig()))
        >>> model = get_peft_model(pair, M2ISTConfig(bottleneck_dim=64))
        >>> model.print_trainable_parameters()
        ```
    """

    prefix: str = "m2ist_"
    tuner_layer_cls = M2ISTTapLayer
    target_module_mapping: dict[str, list[str]] = {}
    uses_shared_state: bool = True

    # ------------------------------------------------------------------ injection
    def _ensure_side_containers(self) -> None:
        if adapter_keys.SIDE_KEY not in self._modules:
            self.m2ist_side = nn.ModuleDict()
            self.m2ist_head = nn.ModuleDict()
            self._m2ist_recorder = TapRecorder()
            self._m2ist_disabled = False
            # adapters built from a saved config whose weights were never loaded: a failed `load_adapter` removes them
            self._m2ist_awaiting_weights: set[str] = set()

    def _check_new_adapter_config(self, config: M2ISTConfig) -> None:
        super()._check_new_adapter_config(config)
        if not isinstance(config, M2ISTConfig):
            raise TypeError(f"M2ISTModel needs an M2ISTConfig, got {type(config).__name__}.")

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Resolve and probe the taps (raising before anything is changed), place them, then build the side network."""
        self._ensure_side_containers()
        if not adapter_name or "." in adapter_name:
            raise ValueError(f"Adapter names must be non-empty and contain no '.', got {adapter_name!r}.")
        config: M2ISTConfig = self.peft_config[adapter_name]
        check_saved_shapes_are_complete(config)
        try:
            plan = plan_adapter(model, config)
            check_plan_matches_config(plan, config)
        except ValueError as err:
            if not config.tower_shapes:
                raise
            raise ValueError(f"This adapter does not fit these towers: {err}") from None
        from_saved_config = bool(config.tower_shapes)
        record_plan(plan, config)
        record_base_towers(model, config)  # the towers' names and dtype, saved in adapter_config.json
        check_adapter_budget(config, plan)
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, None)
        side, head = build_adapter_modules(config, plan, get_tower(model, config.vision_tower, "vision_tower"),
                                           low_cpu_mem_usage)
        if from_saved_config:  # built from a saved adapter: its weights come next (`load_adapter`)
            self._m2ist_awaiting_weights.add(adapter_name)
        self.m2ist_side[adapter_name] = side
        self.m2ist_head[adapter_name] = head
        self._set_side_requires_grad()
        self._keep_towers_in_eval()
        declare_rec_signature(model)  # what transformers' Trainer reads (peft_m2ist.tuner.trainer_support)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key=None, **kw):
        if isinstance(target, M2ISTTapLayer):
            target.take_over(self._m2ist_recorder, adapter_name)
            return
        setattr(parent, target_name, M2ISTTapLayer(target, current_key, self._m2ist_recorder, adapter_name))

    def _prepare_adapter_config(self, peft_config: M2ISTConfig, model_config: dict) -> M2ISTConfig:
        return peft_config

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for param in model.parameters():
            param.requires_grad = False

    def _require_adapter(self) -> str:
        """The active adapter's name; a clear error when every adapter was deleted (instead of an IndexError)."""
        active = [name for name in self.active_adapters if name in self.peft_config]
        if not active:
            raise ValueError(
                "This M2IST model has no adapter: every adapter was deleted. Add one (`add_adapter(name, config)` or "
                "`load_adapter(path, adapter_name=name)`) and select it with `set_adapter(name)`, or use `unload()` "
                "to get the container back."
            )
        return active[0]

    def move_adapter_to_tower_device(self, adapter_name: str) -> None:
        """Move an adapter's side network and head onto the vision tower's device (after loading its weights with
        `low_cpu_mem_usage`, which assigns them where they were loaded)."""
        vision_tower = get_tower(self.model, self.peft_config[adapter_name].vision_tower, "vision_tower")
        move_to_tower_device((self.m2ist_side[adapter_name], self.m2ist_head[adapter_name]), vision_tower)

    # ------------------------------------------------------------------ train / eval
    def _towers(self) -> list[nn.Module]:
        """The vision and text towers every adapter reads (each once)."""
        towers: dict[int, nn.Module] = {}
        for config in self.peft_config.values():
            for path, field_name in ((config.vision_tower, "vision_tower"), (config.text_tower, "text_tower")):
                tower = get_tower(self.model, path, field_name)
                towers[id(tower)] = tower
        return list(towers.values())

    def _keep_towers_in_eval(self) -> None:
        for tower in self._towers():
            tower.eval()

    def train(self, mode: bool = True) -> M2ISTModel:
        """Side networks and heads follow `mode` (their dropout); the towers stay in eval mode, as they run frozen:
        no tower dropout, and batch norms keep their running statistics even when a tower is called on its own."""
        super().train(mode)
        if "peft_config" in self.__dict__:
            self._keep_towers_in_eval()
        return self

    # ------------------------------------------------------------------ adapters
    def _set_side_requires_grad(self) -> None:
        for name in self.m2ist_side:
            trainable = name in self.active_adapters and not self.peft_config[name].inference_mode
            self.m2ist_side[name].requires_grad_(trainable)
            self.m2ist_head[name].requires_grad_(trainable)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Turn gradients of the named adapters' side networks and heads on (or off); their weights live on the tuner,
        not in tuner layers, so peft's layer-wise version would find nothing to change."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} do not exist; known adapters: {sorted(self.peft_config)}.")
        for name in names:
            self.m2ist_side[name].requires_grad_(requires_grad)
            self.m2ist_head[name].requires_grad_(requires_grad)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise ValueError(f"M2IST predicts with one adapter at a time; got {names}.")
        if names[0] not in self.peft_config:
            raise ValueError(f"Adapter '{names[0]}' does not exist; known adapters: {sorted(self.peft_config)}.")
        super().set_adapter(names, inference_mode=inference_mode)
        if inference_mode:
            self.peft_config[names[0]].inference_mode = True
        self._set_side_requires_grad()

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._m2ist_disabled = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter '{adapter_name}' does not exist; known adapters: {sorted(self.peft_config)}.")
        super().delete_adapter(adapter_name)
        del self.m2ist_side[adapter_name]
        del self.m2ist_head[adapter_name]
        self._m2ist_awaiting_weights.discard(adapter_name)
        for name, module in list(self.model.named_modules()):
            if isinstance(module, M2ISTTapLayer) and not module.m2ist_tapped_by:
                self._restore(name, module)
        self._set_side_requires_grad()

    def _restore(self, name: str, tap: M2ISTTapLayer) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, tap.get_base_layer())

    def merge_and_unload(self, *args, **kwargs) -> nn.Module:
        raise ValueError(
            "M2IST cannot be merged: its side network and grounding head sit beside the towers and add no weight "
            "delta to them. Use `unload()` to get the untouched towers back, or keep the PeftModel for predictions."
        )

    def merge_adapter(self, *args, **kwargs) -> None:
        self.merge_and_unload()

    def unload(self) -> nn.Module:
        """Remove every tap and every side network; returns the untouched container with its towers (without the
        `peft_config` attribute peft put on it, so it can be wrapped again without a warning)."""
        for name, module in list(self.model.named_modules()):
            if isinstance(module, M2ISTTapLayer):
                self._restore(name, module)
        self.m2ist_side.clear()
        self.m2ist_head.clear()
        self._m2ist_awaiting_weights.clear()
        if "peft_config" in self.model.__dict__:
            del self.model.peft_config
        restore_container_class(self.model)
        return self.model

    # ------------------------------------------------------------------ parameters
    def parameter_counts(self, adapter_name: str | None = None) -> dict[str, int]:
        """Parameter counts of one adapter: experts only (the paper's measure), projections + head, towers."""
        adapter_name = adapter_name or self._require_adapter()
        return parameter_counts(self.m2ist_side[adapter_name], self.m2ist_head[adapter_name], self.model)

    # ------------------------------------------------------------------ forward
    def tower_encoder(self, adapter_names: Sequence[str] | None = None) -> TowerEncoder:
        """The frozen towers as the active adapter reads them (or the named adapters together: the union of their
        taps, `peft_m2ist.tuner.mixed_batch`); the taps record unless adapters are disabled."""
        if adapter_names is None:
            return union_tower_encoder(self, [self._require_adapter()])
        return union_tower_encoder(self, check_adapter_names(self, adapter_names, predicting=False))

    def encode_towers(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        adapter_names: Sequence[str] | None = None,
    ) -> TowerFeatures:
        """Run both frozen towers once and return everything the active adapter's side network reads (with
        `adapter_names`, every named adapter's: the union of their taps, for `forward(adapter_names=...)`).

        Returns `TowerFeatures`: the final tokens `vision` `(batch, Nv, Dv)` and `text` `(batch, Nt, Dt)`, `text_mask`
        `(batch, Nt)`, `vision_mask` `(batch, Nv)` for vision tokens on a grid (else `None`), and `taps`, full module
        name -> `(batch, tokens, dim)`, vision taps already pooled onto the final grid. The towers are frozen, so
        these features can be cached (`TowerFeatures.to_tensors()`) and fed back with `forward(tower_features=...)`
        to skip the towers in later epochs. With `M2ISTConfig.tower_micro_batch_size` the towers run on that many
        samples at a time, each micro-batch's outputs written into the whole-batch tensors (`TowerEncoder`).
        """
        return self.tower_encoder(adapter_names).encode(pixel_values, input_ids, attention_mask, pixel_mask)

    def encode_vision(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The vision tower's half of `encode_towers(...).to_tensors()`: `vision` `(batch, Nv, Dv)`, `vision_mask`
        `(batch, Nv)` when there is one, and `tap:<name>` for each vision tap, pooled onto the final grid. The towers
        never see each other's inputs, so `{**encode_vision(...), **encode_text(...)}` equals
        `encode_towers(...).to_tensors()`; a feature cache runs the vision tower once per image with it."""
        return self.tower_encoder().encode_vision(pixel_values, pixel_mask)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The text tower's half of `encode_towers(...).to_tensors()`: `text` `(batch, Nt, Dt)`, `text_mask`
        `(batch, Nt)` and `tap:<name>` for each text tap (see `encode_vision`)."""
        return self.tower_encoder().encode_text(input_ids, attention_mask)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        tower_features: TowerFeatures | dict[str, torch.Tensor] | None = None,
        return_dict: bool = True,
        adapter_names: Sequence[str] | None = None,
        **kwargs,
    ) -> ReferringExpressionOutput | tuple[torch.Tensor, ...]:
        """Towers under `no_grad` (taps record) -> M3ISA experts -> head -> `pred_boxes` (+ loss with `labels`).

        Args:
            pixel_values: `(batch, channels, S, S)` normalised images padded to the configured `image_size` S.
            input_ids: `(batch, L)` token ids, `L <= max_text_tokens`.
            attention_mask: `(batch, L)`, 1 = real token (default: all ones).
            pixel_mask: `(batch, S, S)`, 1 = real pixel, 0 = padding (default: all real).
            labels: `(batch, 4)` target boxes, `cxcywh` normalised to [0, 1].
            tower_features: the `TowerFeatures` of `encode_towers`, or the flat dict of its `to_tensors()` (for
                instance a batch collated from a feature cache); replaces `pixel_values`, `input_ids`,
                `attention_mask` and `pixel_mask`.
            return_dict: False returns the output's non-None fields as a tuple, in field order (transformers'
                convention), e.g. `(loss, pred_boxes, loss_l1, loss_giou)` with `labels`.
            adapter_names: one adapter name per row, eval mode only: the towers run once, recording the union of the
                adapters' taps, and each row goes through its own adapter (`peft_m2ist.tuner.mixed_batch`).
            kwargs: only `phrase_type` (a `RECCollator` batch's metadata) and `num_items_in_batch` (from
                transformers' `Trainer`), both ignored; any other name raises a `TypeError` (a misspelt `labels`
                would otherwise give no loss).

        Returns:
            `ReferringExpressionOutput` with `pred_boxes` `(batch, 4)`, `cxcywh` normalised to [0, 1].
        """
        check_forward_kwargs(kwargs)
        if adapter_names is not None:
            out = mixed_batch_forward(self, adapter_names, pixel_values, input_ids, attention_mask, pixel_mask,
                                      labels, tower_features)
            return out if return_dict else out.to_tuple()
        adapter = self._require_adapter()
        self._m2ist_awaiting_weights.discard(adapter)  # in use: a later failed load must not remove it
        if tower_features is None:
            features = self.encode_towers(pixel_values, input_ids, attention_mask, pixel_mask)
        else:
            features = TowerFeatures.coerce(tower_features)
        if self._m2ist_disabled:
            out = towers_alone(features, labels)
        else:
            out = ground(self.peft_config[adapter], self.m2ist_side[adapter], self.m2ist_head[adapter], features,
                         labels)
        return out if return_dict else out.to_tuple()

    # ------------------------------------------------------------------ state dict keys (`adapter_keys`)
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        position = adapter_keys.adapter_name_position
        return {k: v for k, v in state_dict.items() if position(k, adapter_name) is not None}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return adapter_keys.remove_adapter_name(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Checkpoint keys -> the model's keys, all or nothing (`adapter_keys.remap_for_load`)."""
        return adapter_keys.remap_for_load(model, adapter_name, state_dict)
