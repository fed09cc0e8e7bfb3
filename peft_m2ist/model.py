"""`M2ISTModel`: the peft `BaseTuner` that places the taps and owns each adapter's side network and grounding head."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers.utils import ModelOutput

from .config import M2ISTConfig
from .head import GroundingHead
from .layer import M2ISTTapLayer, TapRecorder
from .loss import box_losses
from .probe import AdapterPlan, plan_adapter
from .side_network import M2ISTSideNetwork
from .towers import (
    Tokens,
    TowerOutput,
    frozen,
    get_tower,
    match_grid,
    run_text_tower,
    run_vision_tower,
    to_tokens,
)

SIDE_KEY = "m2ist_side"
HEAD_KEY = "m2ist_head"
# keyword arguments the forward accepts and ignores: the collator's per-phrase metadata, and the token count that
# transformers' Trainer passes to models whose forward takes **kwargs
IGNORED_FORWARD_KWARGS = frozenset({"phrase_type", "num_items_in_batch"})


@dataclass
class ReferringExpressionOutput(ModelOutput):
    """Output of an M2IST referring-expression model.

    Attributes:
        loss: weighted L1 + GIoU loss, when `labels` were given.
        pred_boxes: `(batch, 4)` predicted boxes, `cxcywh` normalised to [0, 1] of the (padded) input image.
        loss_l1: the L1 part (summed over coordinates, averaged over the batch), when `labels` were given.
        loss_giou: the (1 - GIoU) part, averaged over the batch, when `labels` were given.
        vision_last_hidden_state: the vision tower's final tokens, only with adapters disabled.
        text_last_hidden_state: the text tower's final tokens, only with adapters disabled.
    """

    loss: torch.Tensor | None = None
    pred_boxes: torch.Tensor | None = None
    loss_l1: torch.Tensor | None = None
    loss_giou: torch.Tensor | None = None
    vision_last_hidden_state: torch.Tensor | None = None
    text_last_hidden_state: torch.Tensor | None = None


def _check_tensor(name: str, value: object, ndim: int, shape_doc: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor {shape_doc}, got {type(value).__name__}.")
    if value.dim() != ndim:
        raise ValueError(f"`{name}` must have shape {shape_doc}, got a tensor of shape {tuple(value.shape)}.")
    return value


def _check_devices(tower: nn.Module, inputs: dict[str, torch.Tensor | None], kind: str) -> None:
    """Inputs must be on the device of the tower that reads them; a `ValueError` names the argument."""
    param = next(tower.parameters(), None)
    if param is None:
        return
    for name, tensor in inputs.items():
        if tensor is not None and tensor.device != param.device:
            raise ValueError(
                f"`{name}` is on {tensor.device} but the {kind} tower is on {param.device}; move the batch there "
                f"first (e.g. `{{k: v.to('{param.device}') for k, v in batch.items()}}`)."
            )


def validate_inputs(
    pixel_values: object,
    input_ids: object,
    attention_mask: object,
    pixel_mask: object,
    labels: object,
    max_text_tokens: int,
) -> None:
    """Check ranks, batch sizes and label ranges of a REC batch; raises `TypeError`/`ValueError` naming the argument."""
    pixel_values = _check_tensor("pixel_values", pixel_values, 4, "(batch, channels, height, width)")
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"`pixel_values` must be floating point, normalised as the vision tower's image processor returns them, "
            f"got dtype {pixel_values.dtype} (raw pixels?)."
        )
    input_ids = _check_tensor("input_ids", input_ids, 2, "(batch, tokens)")
    if input_ids.is_floating_point():
        raise TypeError(f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}.")
    batch = pixel_values.shape[0]
    if input_ids.shape[0] != batch:
        raise ValueError(
            f"Batch sizes differ: `pixel_values` has {batch} images but `input_ids` has {input_ids.shape[0]} phrases."
        )
    if input_ids.shape[1] == 0:
        raise ValueError("`input_ids` has no tokens: every phrase needs at least one (e.g. the tokenizer's [CLS]).")
    if input_ids.shape[1] > max_text_tokens:
        raise ValueError(
            f"`input_ids` has {input_ids.shape[1]} tokens but the adapter was built for at most {max_text_tokens} "
            "(`M2ISTConfig.max_text_tokens`); truncate the phrases when tokenizing."
        )
    if attention_mask is not None:
        attention_mask = _check_tensor("attention_mask", attention_mask, 2, "(batch, tokens)")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` shape {tuple(attention_mask.shape)} differs from `input_ids` shape "
                f"{tuple(input_ids.shape)}."
            )
    if pixel_mask is not None:
        pixel_mask = _check_tensor("pixel_mask", pixel_mask, 3, "(batch, height, width)")
        if pixel_mask.shape != (batch, *pixel_values.shape[-2:]):
            raise ValueError(
                f"`pixel_mask` shape {tuple(pixel_mask.shape)} must be (batch, height, width) = "
                f"{(batch, *pixel_values.shape[-2:])}."
            )
    if labels is not None:
        validate_labels(labels, batch)


def validate_labels(labels: object, batch: int) -> None:
    """`labels` must be a float `(batch, 4)` tensor of `cxcywh` boxes in [0, 1] with width and height > 0."""
    if labels is not None:
        labels = _check_tensor("labels", labels, 2, "(batch, 4) cxcywh")
        if labels.shape != (batch, 4):
            raise ValueError(f"`labels` must have shape (batch, 4) = {(batch, 4)} (cxcywh), got {tuple(labels.shape)}.")
        if not labels.is_floating_point():
            raise TypeError(f"`labels` must be a float tensor of cxcywh boxes, got dtype {labels.dtype}.")
        if not torch.isfinite(labels).all() or (labels < 0).any() or (labels > 1).any():
            raise ValueError("`labels` must be cxcywh boxes normalised to [0, 1]; found values outside [0, 1].")
        if (labels[:, 2:] <= 0).any():
            raise ValueError("`labels` must have width and height > 0 (cxcywh, normalised).")


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
        try:
            plan = self._plan_as_saved(plan_adapter(model, config), config)
            self._check_plan_matches_config(plan, config)
        except ValueError as err:
            if not config.tower_shapes:
                raise
            raise ValueError(f"This adapter does not fit these towers: {err}") from None
        self._record_plan(plan, config)
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, None)
        ctx = init_empty_weights if low_cpu_mem_usage else nullcontext
        with ctx():
            side = M2ISTSideNetwork(config, plan.vision, plan.text, plan.vision_taps, plan.text_taps)
            head = GroundingHead(config.head_hidden_size, config.head_num_hidden_layers, config.head_num_attention_heads, config.head_intermediate_size,
                                 config.head_dropout, config.max_text_tokens, plan.vision.num_tokens,
                                 attention_dropout=config.head_attention_dropout,
                                 vision_grid=tuple(plan.vision.grid) if plan.vision.grid else None,
                                 vision_prefix_tokens=plan.vision.prefix_tokens,
                                 box_head=config.box_head,
                                 gradient_checkpointing=config.head_gradient_checkpointing,
                                 recompute_feed_forward=config.head_recompute_feed_forward)
        param = next(get_tower(model, config.vision_tower, "vision_tower").parameters(), None)
        if param is not None and not low_cpu_mem_usage:
            side.to(param.device)
            head.to(param.device)
        self.m2ist_side[adapter_name] = side
        self.m2ist_head[adapter_name] = head
        self._set_side_requires_grad()

    @staticmethod
    def _plan_as_saved(plan: AdapterPlan, config: M2ISTConfig) -> AdapterPlan:
        """Build a saved adapter the way it was built: one whose patch tower was read as a plain token sequence
        (saved before patch grids existed, or with `patch_grid: false`) keeps its head without the patch grid."""
        saved = (config.tower_shapes or {}).get("vision")
        if saved and plan.vision.patch_grid and saved.get("grid") is None and not saved.get("patch_grid", False):
            plan.vision = plan.vision.without_patch_grid()
        return plan

    @staticmethod
    def _check_plan_matches_config(plan: AdapterPlan, config: M2ISTConfig) -> None:
        """An adapter saved for other tower shapes must not be loaded onto this pair."""
        saved = config.tower_shapes
        if not saved:
            return
        current = {"vision": plan.vision.to_dict(), "text": plan.text.to_dict()}
        defaults = {"prefix_tokens": 0, "patch_grid": False}  # keys that adapters saved by older versions lack
        for tower in ("vision", "text"):
            for key in ("stream_dim", "num_tokens", "grid", "ffn_dims", "attention_dims", "has_embedding",
                        *defaults):
                saved_value = saved.get(tower, {}).get(key, defaults.get(key))
                if saved_value != current[tower][key]:
                    raise ValueError(
                        f"it was built for a {tower} tower with {key}={saved_value!r}, but the given "
                        f"pair has {key}={current[tower][key]!r}."
                    )

    @staticmethod
    def _record_plan(plan: AdapterPlan, config: M2ISTConfig) -> None:
        """Write the resolved taps and shapes into the config, so the saved adapter rebuilds exactly the same."""
        v, t = len(config.vision_tower) + 1, len(config.text_tower) + 1
        config.vision_layers = [n[v:] for n in plan.vision_taps.ffn]
        config.vision_attention_layers = [n[v:] for n in plan.vision_taps.attention]
        config.text_layers = [n[t:] for n in plan.text_taps.ffn]
        config.text_attention_layers = [n[t:] for n in plan.text_taps.attention]
        config.image_size = plan.image_size
        config.target_modules = plan.target_modules
        config.tower_shapes = {"vision": plan.vision.to_dict(), "text": plan.text.to_dict()}

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

    # ------------------------------------------------------------------ adapters
    def _set_side_requires_grad(self) -> None:
        for name in self.m2ist_side:
            trainable = name in self.active_adapters and not self.peft_config[name].inference_mode
            self.m2ist_side[name].requires_grad_(trainable)
            self.m2ist_head[name].requires_grad_(trainable)

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
        """Remove every tap and every side network; returns the untouched container with its towers."""
        for name, module in list(self.model.named_modules()):
            if isinstance(module, M2ISTTapLayer):
                self._restore(name, module)
        self.m2ist_side.clear()
        self.m2ist_head.clear()
        return self.model

    # ------------------------------------------------------------------ parameters
    def parameter_counts(self, adapter_name: str | None = None) -> dict[str, int]:
        """Parameter counts of one adapter: experts only (the paper's measure), projections + head, towers."""
        adapter_name = adapter_name or self.active_adapters[0]
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
    ) -> dict[str, torch.Tensor]:
        """Run both frozen towers once and return everything the side network reads, as a flat dict of tensors.

        Keys: `vision` `(batch, Nv, Dv)` and `text` `(batch, Nt, Dt)` final tokens, `text_mask` `(batch, Nt)`,
        `vision_mask` `(batch, Nv)` when the vision tower yields a feature map, and `tap:<module name>` for every
        tap, vision taps already pooled onto the final grid. The towers are frozen, so these features can be
        cached and fed back with `forward(tower_features=...)` to skip the towers in later epochs. With
        `M2ISTConfig.tower_micro_batch_size` the towers run on that many samples at a time, each micro-batch's
        outputs written into the whole-batch tensors.
        """
        config: M2ISTConfig = self.peft_config[self.active_adapters[0]]
        validate_inputs(pixel_values, input_ids, attention_mask, pixel_mask, None, config.max_text_tokens)
        if tuple(pixel_values.shape[-2:]) != (config.image_size, config.image_size):
            raise ValueError(
                f"`pixel_values` are {tuple(pixel_values.shape[-2:])} but the adapter was built for "
                f"{config.image_size}x{config.image_size} images (`M2ISTConfig.image_size`); resize and pad to it."
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        vision_tower = get_tower(self.model, config.vision_tower, "vision_tower")
        text_tower = get_tower(self.model, config.text_tower, "text_tower")
        _check_devices(vision_tower, {"pixel_values": pixel_values, "pixel_mask": pixel_mask}, "vision")
        _check_devices(text_tower, {"input_ids": input_ids, "attention_mask": attention_mask}, "text")
        batch = input_ids.shape[0]
        step = config.tower_micro_batch_size or batch
        features: dict[str, torch.Tensor] = {}
        with frozen(vision_tower, text_tower):
            if step >= batch:
                return self._encode_chunk(config, vision_tower, text_tower, pixel_values, input_ids, attention_mask,
                                          pixel_mask)
            for i in range(0, batch, step):
                chunk = self._encode_chunk(
                    config, vision_tower, text_tower, pixel_values[i : i + step], input_ids[i : i + step],
                    attention_mask[i : i + step], None if pixel_mask is None else pixel_mask[i : i + step],
                )
                # each micro-batch's outputs go straight into whole-batch tensors, so no two copies coexist
                for key, value in chunk.items():
                    if key not in features:
                        features[key] = value.new_empty((batch, *value.shape[1:]))
                    features[key][i : i + step] = value
                del chunk
        return features

    def _encode_chunk(self, config: M2ISTConfig, vision_tower: nn.Module, text_tower: nn.Module,
                      pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      pixel_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """`encode_towers` on one micro-batch, with the towers already frozen."""
        recorder = self._m2ist_recorder
        if recorder.taken_over:
            raise RuntimeError(
                "The towers of this M2IST model were wrapped again (`get_peft_model` or `PeftModel.from_pretrained` "
                "on the same pair), and their taps now feed that newer model. Use the newer model, or give each model "
                "its own pair (e.g. `copy.deepcopy(pair)`)."
            )
        if not self._m2ist_disabled:
            recorder.start()
        try:
            vision = run_vision_tower(vision_tower, pixel_values, pixel_mask)
            text = run_text_tower(text_tower, input_ids, attention_mask)
        finally:
            records = recorder.stop()
        features = {"vision": vision.tokens.tensor, "text": text.tokens.tensor, "text_mask": text.mask}
        if vision.mask is not None:
            features["vision_mask"] = vision.mask
        vision_prefix = config.vision_tower + "."
        for name, tensor in records.items():
            tokens = to_tokens(tensor)
            if name.startswith(vision_prefix):
                features[f"tap:{name}"] = match_grid(tokens, vision.tokens.num_tokens, vision.tokens.grid)
            else:
                features[f"tap:{name}"] = tokens.tensor
        return features

    @staticmethod
    def _unpack(features: dict[str, torch.Tensor], config: M2ISTConfig):
        shapes = (config.tower_shapes or {}).get("vision", {})
        grid = tuple(shapes["grid"]) if shapes.get("grid") else None
        vision = TowerOutput(Tokens(features["vision"], grid, shapes.get("prefix_tokens", 0) if grid else 0),
                             features.get("vision_mask"), patches=bool(shapes.get("patch_grid")))
        text = TowerOutput(Tokens(features["text"]), features["text_mask"])
        records = {k[4:]: v for k, v in features.items() if k.startswith("tap:")}
        return vision, text, records

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        tower_features: dict[str, torch.Tensor] | None = None,
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
            tower_features: the output of `encode_towers` (for instance from a feature cache); replaces
                `pixel_values`, `input_ids`, `attention_mask` and `pixel_mask`.
            return_dict: False returns the output's non-None fields as a tuple, in field order (transformers'
                convention), e.g. `(loss, pred_boxes, loss_l1, loss_giou)` with `labels`.
            kwargs: only `phrase_type` (a `RECCollator` batch's metadata) and `num_items_in_batch` (from
                transformers' `Trainer`), both ignored; any other name raises a `TypeError` (a misspelt `labels`
                would otherwise give no loss).
        """
        unknown = sorted(set(kwargs) - IGNORED_FORWARD_KWARGS)
        if unknown:
            raise TypeError(
                f"M2IST forward got unexpected keyword argument(s) {unknown}; it takes pixel_values, input_ids, "
                f"attention_mask, pixel_mask, labels and tower_features (and ignores {sorted(IGNORED_FORWARD_KWARGS)})."
            )
        adapter = self.active_adapters[0]
        config: M2ISTConfig = self.peft_config[adapter]
        if tower_features is None:
            tower_features = self.encode_towers(pixel_values, input_ids, attention_mask, pixel_mask)
        elif not isinstance(tower_features, dict) or not {"vision", "text", "text_mask"} <= set(tower_features):
            raise ValueError("`tower_features` must be the dict returned by `encode_towers`.")
        if self._m2ist_disabled:
            if labels is not None:
                raise ValueError(
                    "`labels` were given inside `disable_adapter()`: the towers run alone there, with no grounding "
                    "head, so there are no boxes to score. Call without `labels` to get the towers' own outputs."
                )
            out = ReferringExpressionOutput(vision_last_hidden_state=tower_features["vision"],
                                            text_last_hidden_state=tower_features["text"])
            return out if return_dict else out.to_tuple()
        vision, text, records = self._unpack(tower_features, config)
        validate_labels(labels, vision.tokens.tensor.shape[0])
        vision_tokens, text_tokens = self.m2ist_side[adapter](records, vision, text)
        pred_boxes = self.m2ist_head[adapter](text_tokens, text.mask, vision_tokens, vision.mask)
        if labels is None:
            out = ReferringExpressionOutput(pred_boxes=pred_boxes)
            return out if return_dict else out.to_tuple()
        parts = box_losses(pred_boxes.float(), labels.float())
        loss = config.l1_weight * parts["loss_l1"] + config.giou_weight * parts["loss_giou"]
        out = ReferringExpressionOutput(loss=loss, pred_boxes=pred_boxes, **parts)
        return out if return_dict else out.to_tuple()

    # ------------------------------------------------------------------ state dict keys
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        keys = (f"{SIDE_KEY}.{adapter_name}.", f"{HEAD_KEY}.{adapter_name}.")
        return {k: v for k, v in state_dict.items() if any(key in k for key in keys)}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        for container in (SIDE_KEY, HEAD_KEY):
            key = key.replace(f"{container}.{adapter_name}.", f"{container}.")
        return key

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = {}
        for key, value in state_dict.items():
            for container in (SIDE_KEY, HEAD_KEY):
                marker = f"{container}."
                if marker in key and f"{marker}{adapter_name}." not in key:
                    key = key.replace(marker, f"{marker}{adapter_name}.", 1)
            remapped[key] = value
        return remapped
