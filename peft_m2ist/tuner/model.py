"""`M2ISTModel`: the peft `BaseTuner` that places the taps and owns each adapter's side network and grounding head.

Longer than this package's other modules (about 550 lines) because it is one class whose methods peft calls: tap
placement, adapter management (set, delete, unload, the all-or-nothing load with its rollback), state-dict keys and
forward. What they use lives elsewhere: input checks (`validation`), running the towers (`tower_forward`), the
shapes probe (`probe`), the side network and head, the size budget (`budget`).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from accelerate import init_empty_weights
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..modeling.head import GroundingHead
from ..modeling.loss import box_losses
from ..modeling.outputs import ReferringExpressionOutput
from ..modeling.side_network import M2ISTSideNetwork
from ..towers.features import TAP_KEY_PREFIX, TowerFeatures
from ..towers.forward import frozen, run_text_tower, run_vision_tower
from ..towers.layouts import get_tower
from ..towers.tokens import match_grid, to_tokens
from ..towers.validation import (
    check_devices,
    check_finite_pixels,
    check_token_ids,
    text_vocab_size,
    validate_image_size,
    validate_inputs,
    validate_labels,
    validate_text_inputs,
    validate_vision_inputs,
)
from .budget import check_parameter_budget
from .config import M2ISTConfig
from .layer import M2ISTTapLayer, TapRecorder
from .plan import (
    AdapterPlan,
    check_plan_matches_config,
    check_saved_shapes_are_complete,
    interaction_dim,
    plan_adapter,
    record_plan,
)
from .tower_record import record_base_towers
from .trainer_support import declare_rec_signature, restore_container_class


class AdapterWeightsError(ValueError):
    """The saved weights of an adapter do not match the side network and head its config builds."""


def has_meta_tensors(module: nn.Module) -> bool:
    return any(t.device.type == "meta" for t in (*module.parameters(), *module.buffers()))


def tower_device(tower: nn.Module) -> torch.device | None:
    param = next(tower.parameters(), None)
    return None if param is None else param.device


SIDE_KEY = "m2ist_side"
HEAD_KEY = "m2ist_head"
# keyword arguments the forward accepts and ignores: the collator's per-phrase metadata, and the token count that
# transformers' Trainer passes to models whose forward takes **kwargs
IGNORED_FORWARD_KWARGS = frozenset({"phrase_type", "num_items_in_batch"})


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
        if SIDE_KEY not in self._modules:
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
        check_parameter_budget({
            "side network": lambda: self._build_side_network(config, plan),
            "grounding head": lambda: self._build_head(config, plan),
        })
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, None)
        ctx = init_empty_weights if low_cpu_mem_usage else nullcontext
        with ctx():
            side = self._build_side_network(config, plan)
            head = self._build_head(config, plan)
        # under `low_cpu_mem_usage` (also PeftModel's own `init_empty_weights`) the weights are on 'meta' until the
        # saved ones are assigned; `move_adapter_to_tower_device` moves them once loaded
        if not (low_cpu_mem_usage or has_meta_tensors(side) or has_meta_tensors(head)):
            device = tower_device(get_tower(model, config.vision_tower, "vision_tower"))
            if device is not None:
                side.to(device)
                head.to(device)
        if from_saved_config:  # built from a saved adapter: its weights come next (`load_adapter`)
            self._m2ist_awaiting_weights.add(adapter_name)
        self.m2ist_side[adapter_name] = side
        self.m2ist_head[adapter_name] = head
        self._set_side_requires_grad()
        self._keep_towers_in_eval()
        declare_rec_signature(model)  # what transformers' Trainer reads (peft_m2ist.tuner.trainer_support)

    @staticmethod
    def _build_side_network(config: M2ISTConfig, plan: AdapterPlan) -> M2ISTSideNetwork:
        vision, text = plan.vision, plan.text
        return M2ISTSideNetwork(
            plan.vision_taps, plan.text_taps, vision.stream_dim, text.stream_dim,
            vision.ffn_dims, vision.attention_dims, text.ffn_dims, text.attention_dims,
            head_hidden_size=config.head_hidden_size,
            bottleneck_dim=config.bottleneck_dim,
            interaction_dim=interaction_dim(config, vision),
            expert_scale=config.expert_scale,
            expert_dropout=config.expert_dropout,
            interaction=config.interaction,
            interaction_heads=config.interaction_heads,
            gated=config.mixture == "gated",
            expert_init=config.expert_init,
            affine_norm=config.expert_norm == "affine",
            interaction_input_norm=config.interaction_input_norm,
            interaction_scaled=config.interaction_scaled,
            text_concat=config.interaction_text_path == "concat",
            text_ffn_norms=plan.text_ffn_norms,
            text_attention_norms=plan.text_attention_norms,
        )

    @staticmethod
    def _build_head(config: M2ISTConfig, plan: AdapterPlan) -> GroundingHead:
        return GroundingHead(
            config.head_hidden_size, config.head_num_hidden_layers, config.head_num_attention_heads,
            config.head_intermediate_size, config.head_dropout, config.max_text_tokens, plan.vision.num_tokens,
            attention_dropout=config.head_attention_dropout,
            vision_grid=tuple(plan.vision.grid) if plan.vision.grid else None,
            vision_prefix_tokens=plan.vision.prefix_tokens,
            box_head=config.box_head,
            gradient_checkpointing=config.head_gradient_checkpointing,
            recompute_feed_forward=config.head_recompute_feed_forward,
            input_norm=config.head_input_norm,
            grid_encoding=config.head_grid_encoding == "sine",
            positions=config.head_positions,
            init=config.head_init,
        )

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
        config: M2ISTConfig = self.peft_config[adapter_name]
        device = tower_device(get_tower(self.model, config.vision_tower, "vision_tower"))
        for module in (self.m2ist_side[adapter_name], self.m2ist_head[adapter_name]):
            if device is not None and not has_meta_tensors(module):
                module.to(device)

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
        side, head = self.m2ist_side[adapter_name], self.m2ist_head[adapter_name]
        experts = side.adapter_parameters()
        side_total = sum(p.numel() for p in side.parameters())
        head_total = sum(p.numel() for p in head.parameters())
        towers = sum(p.numel() for p in self.model.parameters())
        return {
            "adapter_only": experts,
            "projections_and_head": side_total - experts + head_total,
            "adapter_and_head": side_total + head_total,
            "towers": towers,
            "total": towers + side_total + head_total,
        }

    # ------------------------------------------------------------------ forward
    def encode_towers(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
    ) -> TowerFeatures:
        """Run both frozen towers once and return everything the active adapter's side network reads.

        Returns `TowerFeatures`: the final tokens `vision` `(batch, Nv, Dv)` and `text` `(batch, Nt, Dt)`, `text_mask`
        `(batch, Nt)`, `vision_mask` `(batch, Nv)` for vision tokens on a grid (else `None`), and `taps`, full module
        name -> `(batch, tokens, dim)`, vision taps already pooled onto the final grid. The towers are frozen, so
        these features can be cached (`TowerFeatures.to_tensors()`) and fed back with `forward(tower_features=...)`
        to skip the towers in later epochs. With `M2ISTConfig.tower_micro_batch_size` the towers run on that many
        samples at a time, each micro-batch's outputs written into the whole-batch tensors.
        """
        config: M2ISTConfig = self.peft_config[self._require_adapter()]
        validate_inputs(pixel_values, input_ids, attention_mask, pixel_mask, None, config.max_text_tokens)
        validate_image_size(pixel_values, config.image_size)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        vision_tower = get_tower(self.model, config.vision_tower, "vision_tower")
        text_tower = get_tower(self.model, config.text_tower, "text_tower")
        check_devices(vision_tower, {"pixel_values": pixel_values, "pixel_mask": pixel_mask}, "vision")
        check_devices(text_tower, {"input_ids": input_ids, "attention_mask": attention_mask}, "text")
        check_finite_pixels(pixel_values)
        check_token_ids(input_ids, text_vocab_size(text_tower))
        with frozen(vision_tower, text_tower):
            return TowerFeatures.from_tensors(self._in_micro_batches(config, input_ids.shape[0], lambda i, j: {
                **self._encode_vision(vision_tower, pixel_values[i:j], None if pixel_mask is None else pixel_mask[i:j]),
                **self._encode_text(text_tower, input_ids[i:j], attention_mask[i:j])}))

    def encode_vision(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The vision tower's half of `encode_towers(...).to_tensors()`: `vision` `(batch, Nv, Dv)`, `vision_mask`
        `(batch, Nv)` when there is one, and `tap:<name>` for each vision tap, pooled onto the final grid.

        The towers never see each other's inputs, so `{**encode_vision(...), **encode_text(...)}` equals
        `encode_towers(...).to_tensors()`; a feature cache runs the vision tower once per image with it. Both halves
        run the tower on `tower_micro_batch_size` samples at a time when it is set.
        """
        config: M2ISTConfig = self.peft_config[self._require_adapter()]
        validate_vision_inputs(pixel_values, pixel_mask)
        validate_image_size(pixel_values, config.image_size)
        vision_tower = get_tower(self.model, config.vision_tower, "vision_tower")
        check_devices(vision_tower, {"pixel_values": pixel_values, "pixel_mask": pixel_mask}, "vision")
        check_finite_pixels(pixel_values)
        with frozen(vision_tower):
            return self._in_micro_batches(config, pixel_values.shape[0], lambda i, j: self._encode_vision(
                vision_tower, pixel_values[i:j], None if pixel_mask is None else pixel_mask[i:j]))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The text tower's half of `encode_towers(...).to_tensors()`: `text` `(batch, Nt, Dt)`, `text_mask`
        `(batch, Nt)` and `tap:<name>` for each text tap (see `encode_vision`)."""
        config: M2ISTConfig = self.peft_config[self._require_adapter()]
        validate_text_inputs(input_ids, attention_mask, config.max_text_tokens)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_tower = get_tower(self.model, config.text_tower, "text_tower")
        check_devices(text_tower, {"input_ids": input_ids, "attention_mask": attention_mask}, "text")
        check_token_ids(input_ids, text_vocab_size(text_tower))
        with frozen(text_tower):
            return self._in_micro_batches(config, input_ids.shape[0], lambda i, j: self._encode_text(
                text_tower, input_ids[i:j], attention_mask[i:j]))

    @staticmethod
    def _in_micro_batches(config: M2ISTConfig, batch: int, encode) -> dict[str, torch.Tensor]:
        """`encode(start, end)` over `tower_micro_batch_size` samples at a time (all at once when unset); each
        micro-batch's outputs go straight into whole-batch tensors, so no two copies coexist."""
        step = config.tower_micro_batch_size or batch
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

    def _recording(self, taps: list[str], run_tower):
        """`run_tower()` with the active adapter's `taps` recording; returns its output and the recorded taps."""
        recorder = self._m2ist_recorder
        if recorder.taken_over:
            raise RuntimeError(
                "The towers of this M2IST model were wrapped again (`get_peft_model` or `PeftModel.from_pretrained` "
                "on the same pair), and their taps now feed that newer model. Use the newer model, or give each model "
                "its own pair (e.g. `copy.deepcopy(pair)`)."
            )
        if not self._m2ist_disabled:
            recorder.start(taps)
        try:
            output = run_tower()
        finally:
            records = recorder.stop()
        return output, records

    def _encode_vision(self, vision_tower: nn.Module, pixel_values: torch.Tensor,
                       pixel_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        side = self.m2ist_side[self._require_adapter()]
        vision, records = self._recording(side.vision_taps.all(),
                                          lambda: run_vision_tower(vision_tower, pixel_values, pixel_mask))
        tensors = {"vision": vision.tokens.tensor}
        if vision.mask is not None:
            tensors["vision_mask"] = vision.mask
        for name, tensor in records.items():  # feature-map taps pooled onto the final grid, once, here
            tokens = match_grid(to_tokens(tensor), vision.tokens.num_tokens, vision.tokens.grid)
            tensors[f"{TAP_KEY_PREFIX}{name}"] = tokens
        return tensors

    def _encode_text(self, text_tower: nn.Module, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        side = self.m2ist_side[self._require_adapter()]
        text, records = self._recording(side.text_taps.all(), lambda: run_text_tower(text_tower, input_ids,
                                                                                       attention_mask))
        return {"text": text.tokens.tensor, "text_mask": text.mask,
                **{f"{TAP_KEY_PREFIX}{name}": to_tokens(tensor).tensor for name, tensor in records.items()}}

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        tower_features: TowerFeatures | dict[str, torch.Tensor] | None = None,
        return_dict: bool = True,
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
            kwargs: only `phrase_type` (a `RECCollator` batch's metadata) and `num_items_in_batch` (from
                transformers' `Trainer`), both ignored; any other name raises a `TypeError` (a misspelt `labels`
                would otherwise give no loss).

        Returns:
            `ReferringExpressionOutput` with `pred_boxes` `(batch, 4)`, `cxcywh` normalised to [0, 1].
        """
        unknown = sorted(set(kwargs) - IGNORED_FORWARD_KWARGS)
        if unknown:
            raise TypeError(
                f"M2IST forward got unexpected keyword argument(s) {unknown}; it takes pixel_values, input_ids, "
                f"attention_mask, pixel_mask, labels and tower_features (and ignores {sorted(IGNORED_FORWARD_KWARGS)})."
            )
        adapter = self._require_adapter()
        self._m2ist_awaiting_weights.discard(adapter)  # in use: a later failed load must not remove it
        config: M2ISTConfig = self.peft_config[adapter]
        if tower_features is None:
            features = self.encode_towers(pixel_values, input_ids, attention_mask, pixel_mask)
        else:
            features = TowerFeatures.coerce(tower_features)
        if self._m2ist_disabled:
            if labels is not None:
                raise ValueError(
                    "`labels` were given inside `disable_adapter()`: the towers run alone there, with no grounding "
                    "head, so there are no boxes to score. Call without `labels` to get the towers' own outputs."
                )
            out = ReferringExpressionOutput(vision_last_hidden_state=features.vision,
                                            text_last_hidden_state=features.text)
            return out if return_dict else out.to_tuple()
        validate_labels(labels, features.batch_size)
        vision_tokens, text_tokens = self.m2ist_side[adapter](features.taps, features.vision, features.text,
                                                              features.vision_mask, features.text_mask)
        pred_boxes = self.m2ist_head[adapter](text_tokens, features.text_mask, vision_tokens, features.vision_mask)
        if labels is None:
            out = ReferringExpressionOutput(pred_boxes=pred_boxes)
            return out if return_dict else out.to_tuple()
        parts = box_losses(pred_boxes.float(), labels.float())
        loss = config.l1_weight * parts["loss_l1"] + config.giou_weight * parts["loss_giou"]
        out = ReferringExpressionOutput(loss=loss, pred_boxes=pred_boxes, **parts)
        return out if return_dict else out.to_tuple()

    # ------------------------------------------------------------------ state dict keys
    @staticmethod
    def _adapter_name_position(key: str, adapter_name: str) -> int | None:
        """Where `adapter_name` sits in a key of its side network or head (`...m2ist_side.<adapter>.<param>`), as
        an index into `key.split(".")`; `None` for any other key."""
        parts = key.split(".")
        for i in range(len(parts) - 2):
            if parts[i] in (SIDE_KEY, HEAD_KEY) and parts[i + 1] == adapter_name:
                return i + 1
        return None

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        return {k: v for k, v in state_dict.items() if cls._adapter_name_position(k, adapter_name) is not None}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        position = cls._adapter_name_position(key, adapter_name)
        if position is None:
            return key
        parts = key.split(".")
        return ".".join(parts[:position] + parts[position + 1 :])

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Checkpoint keys (no adapter name) -> the model's keys, built from the model's own side-network and head
        keys with `_remove_adapter_name_from_key`, so that saving and loading are symmetric whatever the adapter's
        name (as peft's own remapping is)."""
        checkpoint_to_model: dict[str, str] = {}
        peft_prefix = "base_model."
        for model_key in model.state_dict():
            if cls._adapter_name_position(model_key, adapter_name) is None:
                continue
            checkpoint_key = cls._remove_adapter_name_from_key(model_key, adapter_name)
            checkpoint_to_model[checkpoint_key] = model_key
            if not model_key.startswith(peft_prefix):  # the tuner itself, not wrapped in a PeftModel
                checkpoint_to_model[peft_prefix + checkpoint_key] = model_key
        remapped = {checkpoint_to_model.get(k, k): v for k, v in state_dict.items()}
        cls._check_adapter_weights(model, adapter_name, remapped, checkpoint_to_model)
        return remapped

    @classmethod
    def _check_adapter_weights(cls, model, adapter_name: str, remapped: dict[str, torch.Tensor],
                               checkpoint_to_model: dict[str, str]) -> None:
        """All or nothing: every tensor of the adapter's side network and head must be in `remapped`, with its shape,
        and nothing else; else `AdapterWeightsError`, raised before peft copies any weight into the model."""
        expected = {k: v.shape for k, v in model.state_dict().items()
                    if cls._adapter_name_position(k, adapter_name) is not None}
        model_to_checkpoint = {}
        for checkpoint_key, model_key in checkpoint_to_model.items():
            model_to_checkpoint.setdefault(model_key, checkpoint_key)
        missing = sorted(model_to_checkpoint.get(k, k) for k in expected if k not in remapped)
        unexpected = sorted(k for k in remapped if k not in expected)
        wrong_shape = [
            f"{model_to_checkpoint.get(k, k)}: {tuple(v.shape)} in the file, {tuple(expected[k])} in the model"
            for k, v in sorted(remapped.items()) if k in expected and tuple(v.shape) != tuple(expected[k])
        ]
        if not (missing or unexpected or wrong_shape):
            return
        def listed(items: list[str], limit: int = 8) -> str:
            shown = ", ".join(repr(item) for item in items[:limit])
            return f"[{shown}" + (f", ... and {len(items) - limit} more]" if len(items) > limit else "]")

        problems = []
        if missing:
            problems.append(f"missing keys {listed(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {listed(unexpected)}")
        if wrong_shape:
            problems.append(f"tensors of another shape [{'; '.join(wrong_shape[:8])}]")
        raise AdapterWeightsError(
            f"The saved weights do not match the side network and head of adapter '{adapter_name}' ("
            + ", ".join(problems) + "); nothing was loaded. The file is damaged or belongs to another adapter config."
        )
