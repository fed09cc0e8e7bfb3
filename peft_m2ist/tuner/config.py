"""`M2ISTConfig`: every knob of the M2IST side-tuner, documented and validated.

Longer than this package's other modules because it is one dataclass of about 40 fields, each with its help text as
peft's configs have it, plus the paper preset's fields (docs/fidelity.md) and their checks; a split would scatter one
config over several files. The choices of a field are written once, in its `Literal` type (`field_choices`).
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

from peft import PeftConfig

from .registration import M2IST_PEFT_TYPE, REC_TASK_TYPE
from .tower_record import check_base_towers

# Field names of earlier development versions of 0.1.0 (until 2026-12-04), renamed to the words transformers configs
# use; adapter configs saved with the old names still load (`M2ISTConfig.from_pretrained`,
# `PeftModel.from_pretrained`), with a FutureWarning.
RENAMED_FIELDS = {
    "head_dim": "head_hidden_size",
    "head_layers": "head_num_hidden_layers",
    "head_heads": "head_num_attention_heads",
    "head_ffn_dim": "head_intermediate_size",
}


def rename_deprecated_fields(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Map the earlier field names (`RENAMED_FIELDS`) in `kwargs` to the current ones, warning once per name."""
    renamed = dict(kwargs)
    for old, new in RENAMED_FIELDS.items():
        if old not in renamed:
            continue
        value = renamed.pop(old)
        if new in renamed and renamed[new] != value:
            raise ValueError(f"The adapter config sets both `{old}` ({value!r}) and its new name `{new}` "
                             f"({renamed[new]!r}); keep only `{new}`.")
        warnings.warn(f"M2ISTConfig field `{old}` is deprecated; it is now `{new}`. Save the adapter again to "
                      "update its config.", FutureWarning, stacklevel=3)
        renamed[new] = value
    return renamed


def _check_tap_spec(name: str, value: Any) -> None:
    """A tap spec is None (auto), a regex string, or a non-empty list of module names."""
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"`{name}` is not a valid regular expression: {err}") from None
        return
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"`{name}` must be a non-empty list of module names, got {value!r}.")
        return
    raise TypeError(f"`{name}` must be None, a regex string or a list of module names, got {type(value).__name__}.")


def _is_count(value: Any, minimum: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


# what each saved key of `tower_shapes[tower]` must hold (the fields of `modeling.stream_shapes.StreamShapes`)
_TOWER_SHAPE_CHECKS: dict[str, tuple[str, Any]] = {
    "stream_dim": ("a positive integer", _is_count),
    "num_tokens": ("a positive integer", _is_count),
    "grid": ("null or a [height, width] list of positive integers",
             lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_is_count, v)))),
    "ffn_dims": ("a list of positive integers", lambda v: isinstance(v, (list, tuple)) and all(map(_is_count, v))),
    "attention_dims": ("a list of positive integers",
                       lambda v: isinstance(v, (list, tuple)) and all(map(_is_count, v))),
    "has_embedding": ("true or false", lambda v: isinstance(v, bool)),
    "prefix_tokens": ("a non-negative integer", lambda v: _is_count(v, 0)),
    "patch_grid": ("true or false", lambda v: isinstance(v, bool)),
}


def _check_tower_shapes(value: Any) -> None:
    """`tower_shapes` is filled by the tuner: None, or {"vision": {...}, "text": {...}} with the keys of
    `modeling.stream_shapes.StreamShapes`. A hand-edited or damaged value gets a `ValueError` naming what is wrong
    (missing keys are reported when the adapter is built, with what they mean)."""
    if value is None:
        return
    if not isinstance(value, dict) or set(value) != {"vision", "text"}:
        raise ValueError(
            "`tower_shapes` is filled automatically and must be None or a mapping with exactly the keys 'vision' and "
            f"'text', got {value!r}. Leave it unset for a new adapter."
        )
    for tower in ("vision", "text"):
        shapes = value[tower]
        if not isinstance(shapes, dict):
            raise ValueError(f"`tower_shapes['{tower}']` must be a mapping of shape names to values, got {shapes!r}.")
        for key, (doc, check) in _TOWER_SHAPE_CHECKS.items():
            if key in shapes and not check(shapes[key]):
                raise ValueError(f"`tower_shapes['{tower}']['{key}']` must be {doc}, got {shapes[key]!r}.")


@dataclass
class M2ISTConfig(PeftConfig):
    """Configuration of an M2IST (Multi-Modal Interactive Side-Tuning) adapter.

    The adapter side-tunes a frozen vision tower and a frozen text tower held in one container model (for instance
    `VisionTextDualEncoderModel`, `CLIPModel` or `peft_m2ist.VisionTextPair`) for referring expression comprehension.
    Taps record the output of chosen tower modules; M3ISA blocks (a vision expert, a language expert and an interactive
    expert per tapped layer pair) turn them into corrections of each tower's final tokens, and a grounding head predicts
    one `cxcywh` box normalised to [0, 1].

    Args:
        vision_tower (`str`): Dotted path of the vision tower inside the container.
        text_tower (`str`): Dotted path of the text tower inside the container.
        tower_micro_batch_size (`int`, *optional*): Run the frozen towers on at most this many samples at a time;
            `None` runs the whole batch at once. Same features; lowers the peak memory of the towers' forward.
        vision_layers (`list[str]` or `str`, *optional*): Vision modules (relative to the vision tower) whose outputs feed
            the vision experts: module names, or a regex that must match a whole name (`re.fullmatch`, names relative
            to the tower). `None` picks the FFN of
            `num_tapped_layers` evenly spaced blocks from the tower's `model_type`.
        text_layers (`list[str]` or `str`, *optional*): The same for the text tower and the language experts.
        vision_attention_layers (`list[str]` or `str`, *optional*): Vision modules feeding the interactive experts.
            `None` picks the attention module of each block (the block itself for towers without attention).
        text_attention_layers (`list[str]` or `str`, *optional*): The same for the text tower.
        num_tapped_layers (`int`): Layer pairs tapped when the layers are auto-resolved: evenly spaced blocks ending at
            the last one, `min(num_tapped_layers, depth of either tower)` in both towers.
        bottleneck_dim (`int`): Width of every expert's bottleneck.
        expert_scale (`float`): Fixed scale of each expert's output.
        expert_dropout (`float`): Dropout on the expert bottleneck activations.
        interaction (`str`): `"shared"` (the paper: a weight-shared up-projection links the modalities) or
            `"cross_attention"` (the two streams attend to each other in the bottleneck).
        interaction_dim (`int`, *optional*): Width of the interactive expert's shared space; `None`: the width
            `interaction_width` picks (`head_hidden_size` by default).
        interaction_heads (`int`): Heads of the bottleneck cross-attention (`interaction="cross_attention"` only).
        mixture (`str`): `"sum"` (the paper: experts are added) or `"gated"` (a learned per-token gate weighs them).
        head_hidden_size (`int`): Width of the grounding head.
        head_num_hidden_layers (`int`): Transformer layers of the grounding head.
        head_num_attention_heads (`int`): Attention heads of the grounding head.
        head_intermediate_size (`int`): Feed-forward width of the grounding head.
        head_dropout (`float`): Dropout on the grounding head's residual and feed-forward paths.
        head_attention_dropout (`float`): Dropout on the head's attention probabilities (0: nothing stored for it).
        box_head (`str`): How the head reads the box: `"pointer"` ([REG] points at vision tokens; default) or `"mlp"`
            (TransVG's regression MLP on [REG]).
        head_recompute_feed_forward (`bool`): Recompute the head's feed-forward hidden tensors in backward instead of
            storing them (same gradients, one more `linear1` matmul per head layer and step; default on).
        head_gradient_checkpointing (`bool`): Recompute the head's layers in backward instead of storing their
            activations (same gradients, about one more head forward per step).
        max_text_tokens (`int`): Text length the head's position embedding is built for.
        image_size (`int`, *optional*): Square input size the vision token count is derived from; `None` takes the
            vision tower config's `image_size`, else 640.
        l1_weight (`float`): Weight of the L1 box loss.
        giou_weight (`float`): Weight of the (1 - GIoU) box loss.
        preset (`str`, *optional*): `"paper"` builds the authors' M2IST: every fidelity field below, `box_head` and
            `head_attention_dropout` take the authors' value (docs/fidelity.md); `None`: the library's defaults.
        tap_layer_spacing (`str`): Auto-resolved taps on `"even"`ly spaced blocks or on the `"first"` blocks.
        expert_init (`str`): `"zero_up"` (up-projections start at zero) or `"kaiming"` (the authors' init).
        expert_norm (`str`): `"non_affine"` or `"affine"` LayerNorm in front of the vision and language experts.
        language_expert_output_norm (`str`): `"tower"` passes the language expert's output through the text block's
            frozen FFN LayerNorm (the authors'); `"none"`.
        interaction_width (`str`): Interaction width when `interaction_dim` is None: `"head"` or `"vision"`.
        interaction_input_norm (`bool`): LayerNorm before the interactive expert's down-projections.
        interaction_scaled (`bool`): Scale the interactive expert's output by `expert_scale`.
        interaction_text_path (`str`): `"to_head"` or `"concat"` (the authors' text path of the interactive expert).
        interaction_text_output_norm (`str`): `"tower"` passes the concatenated text output through the text block's
            frozen attention LayerNorm (the authors'); `"none"`.
        head_input_norm (`bool`): LayerNorm over the head's input tokens.
        head_grid_encoding (`str`): `"sine"` grid encoding on vision positions, or `"none"`.
        head_positions (`str`): Positions added once to the `"input"`, or to queries and keys in every layer
            (`"attention"`, TransVG's).
        head_init (`str`): `"trunc_normal"` or `"transvg"` initialisation of the head.
    """

    vision_tower: str = field(
        default="vision_model", metadata={"help": "Dotted path of the vision tower inside the container model."}
    )
    text_tower: str = field(
        default="text_model", metadata={"help": "Dotted path of the text tower inside the container model."}
    )
    tower_micro_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Run the frozen towers on at most this many samples at a time, writing what they return into "
            "whole-batch tensors: the same features, with the towers' transient activations (at large batches the "
            "largest tensors of a training step) sized by this number instead of the batch. None runs the whole "
            "batch at once."
        },
    )
    vision_layers: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Vision-tower modules (relative to the tower) whose outputs feed the vision experts: a list of "
            "names or a regex. None resolves them from the tower's model_type. Filled with the resolved list."
        },
    )
    text_layers: list[str] | str | None = field(
        default=None,
        metadata={"help": "Text-tower modules feeding the language experts: names, a regex, or None (auto)."},
    )
    vision_attention_layers: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Vision-tower modules feeding the interactive experts: names, a regex, or None (the attention "
            "module of each tapped block; the block itself for towers without attention)."
        },
    )
    text_attention_layers: list[str] | str | None = field(
        default=None,
        metadata={"help": "Text-tower modules feeding the interactive experts: names, a regex, or None (auto)."},
    )
    num_tapped_layers: int = field(
        default=6,
        metadata={
            "help": "Layer pairs to tap when the layers are auto-resolved: evenly spaced blocks ending at the last "
            "one (tap_layer_spacing='first': the first blocks), min(num_tapped_layers, depth of either tower) in "
            "both towers."
        },
    )
    bottleneck_dim: int = field(default=128, metadata={"help": "Width of every expert's bottleneck."})
    expert_scale: float = field(default=0.1, metadata={"help": "Fixed scale applied to every expert's output."})
    expert_dropout: float = field(default=0.0, metadata={"help": "Dropout on the experts' bottleneck activations."})
    interaction: Literal["shared", "cross_attention"] = field(
        default="shared",
        metadata={
            "help": "How the interactive expert links the modalities: 'shared' (weight-shared up-projection, the "
            "paper) or 'cross_attention' (the two streams attend to each other in the bottleneck)."
        },
    )
    interaction_dim: int | None = field(
        default=None,
        metadata={
            "help": "Width of the interactive expert's shared space; None: the width interaction_width picks "
            "(head_hidden_size by default)."
        },
    )
    interaction_heads: int = field(
        default=4, metadata={"help": "Heads of the bottleneck cross-attention (interaction='cross_attention')."}
    )
    mixture: Literal["sum", "gated"] = field(
        default="sum",
        metadata={"help": "How expert outputs are combined: 'sum' (the paper) or 'gated' (learned per-token gate)."},
    )
    head_hidden_size: int = field(default=256, metadata={"help": "Width of the grounding head."})
    head_num_hidden_layers: int = field(
        default=6, metadata={"help": "Number of transformer layers in the grounding head."}
    )
    head_num_attention_heads: int = field(
        default=8, metadata={"help": "Number of attention heads in the grounding head."}
    )
    head_intermediate_size: int = field(default=2048, metadata={"help": "Feed-forward width of the grounding head."})
    head_dropout: float = field(
        default=0.1, metadata={"help": "Dropout on the grounding head's residual and feed-forward paths."}
    )
    head_attention_dropout: float = field(
        default=0.0,
        metadata={
            "help": "Dropout on the grounding head's attention probabilities. 0 lets the fused attention kernel "
            "skip storing the probability maps for backward (TransVG used 0.1; the largest memory item)."
        },
    )
    box_head: Literal["pointer", "mlp"] = field(
        default="pointer",
        metadata={
            "help": "How the head reads the box off the transformer: 'pointer' ([REG] points at the vision tokens; the "
            "box centre is the pointer-weighted mean of their cell centres plus a learned offset; learns the "
            "text-to-object binding much faster) or 'mlp' (TransVG's 3-layer regression MLP on [REG], the paper's)."
        },
    )
    head_recompute_feed_forward: bool = field(
        default=True,
        metadata={
            "help": "Recompute each head layer's (batch, tokens, head_intermediate_size) feed-forward hidden tensor in "
            "backward instead of storing it, dropout mask replayed: the same gradients for one more linear1 matmul per "
            "layer and step; cuts the head's activation memory, the largest part of M2IST's, by about 40%. False stores it."
        },
    )
    head_gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute each head layer's forward during backward instead of storing its activations: the "
            "same gradients for about one more head forward per step; the head is most of M2IST's training memory."
        },
    )
    max_text_tokens: int = field(
        default=20, metadata={"help": "Maximum text length (tokens) the head's position embedding covers."}
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Square input image size used to derive the number of vision tokens. None takes the vision "
            "tower config's image_size, else 640."
        },
    )
    l1_weight: float = field(default=1.0, metadata={"help": "Weight of the L1 loss on cxcywh boxes."})
    giou_weight: float = field(default=1.0, metadata={"help": "Weight of the (1 - generalized IoU) loss."})
    # ---------------------------------------------------------------- fidelity to the authors' code
    # Each field below is one place where the library departs from the authors' released M2IST code
    # (docs/fidelity.md). The defaults are the library's behaviour; `preset="paper"` sets every one of them to the
    # authors' choice.
    preset: Literal["paper"] | None = field(
        default=None,
        metadata={
            "help": "'paper' builds the authors' M2IST (their released code, DETR-R50 + BERT-base): every fidelity "
            "field below, box_head and head_attention_dropout are set to the authors' choice (docs/fidelity.md). A "
            "field left at its library default takes the authors' value; a field set to anything else raises a "
            "ValueError. None: the library's defaults."
        },
    )
    tap_layer_spacing: Literal["even", "first"] = field(
        default="even",
        metadata={
            "help": "Which blocks auto-resolved taps use: 'even' (evenly spaced blocks ending at the last one) or "
            "'first' (the first num_tapped_layers blocks, as the authors tap layers 0-5 of DETR and BERT)."
        },
    )
    expert_init: Literal["zero_up", "kaiming"] = field(
        default="zero_up",
        metadata={
            "help": "Initialisation of the experts' projections: 'zero_up' (down-projections as torch's Linear, "
            "up-projections at zero, so an untrained side network adds nothing) or 'kaiming' (the authors': every "
            "down- and up-projection kaiming-uniform (a=sqrt(5)) with biases drawn from U(0, 1)). 'zero_up' is refused "
            "with either 'tower' output norm, whose LayerNorm of an all-zero output has a 1/sqrt(eps) gradient."
        },
    )
    expert_norm: Literal["non_affine", "affine"] = field(
        default="non_affine",
        metadata={
            "help": "LayerNorm in front of the vision and language experts: 'non_affine' (no parameters) or 'affine' "
            "(the authors': a learned scale and shift, 2 x width parameters; applied after the plain normalisation, "
            "so autograd still keeps no tower tensor)."
        },
    )
    language_expert_output_norm: Literal["none", "tower"] = field(
        default="none",
        metadata={
            "help": "'tower' passes each language expert's output through the frozen LayerNorm that ends the tapped "
            "text block's FFN (BERT's output.LayerNorm), as the authors do (it also undoes expert_scale); 'none' "
            "adds it as it is. 'tower' needs a post-norm BERT-family text tower."
        },
    )
    interaction_width: Literal["head", "vision"] = field(
        default="head",
        metadata={
            "help": "Width of the interactive expert's shared up-projection when interaction_dim is None: 'head' "
            "(head_hidden_size) or 'vision' (the vision tower's token width, the authors': 256 for DETR)."
        },
    )
    interaction_input_norm: bool = field(
        default=True,
        metadata={
            "help": "Normalise the attention taps (non-affine LayerNorm) before the interactive expert's "
            "down-projections. The authors' interactive expert has no norm (False)."
        },
    )
    interaction_scaled: bool = field(
        default=True,
        metadata={
            "help": "Multiply the interactive expert's output by expert_scale. The authors' shared up-projection "
            "is not scaled (False)."
        },
    )
    interaction_text_path: Literal["to_head", "concat"] = field(
        default="to_head",
        metadata={
            "help": "Where the interactive expert's text output goes when the text width differs from the "
            "interaction width: 'to_head' (a Linear(interaction width, head_hidden_size) per layer, added after "
            "text_proj) or 'concat' (the authors': a Linear(bottleneck_dim, text width - interaction width) of the "
            "text bottleneck concatenated with the shared up-projection, text width in all, added to the text "
            "stream before text_proj; needs a text tower wider than the interaction width)."
        },
    )
    interaction_text_output_norm: Literal["none", "tower"] = field(
        default="none",
        metadata={
            "help": "'tower' passes the interactive expert's concatenated text output (interaction_text_path="
            "'concat') through the frozen LayerNorm that ends the tapped text block's attention (BERT's "
            "attention.output.LayerNorm), as the authors do; 'none' adds it as it is."
        },
    )
    head_input_norm: bool = field(
        default=True,
        metadata={
            "help": "LayerNorm over [REG] + text + vision tokens before the head adds its positions (the streams "
            "can differ in scale by orders of magnitude). TransVG's head has none (False)."
        },
    )
    head_grid_encoding: Literal["sine", "none"] = field(
        default="sine",
        metadata={
            "help": "'sine' adds a fixed 2D sine encoding of each vision token's cell to its learned position "
            "(grid towers only); 'none' uses the learned positions only, as TransVG."
        },
    )
    head_positions: Literal["input", "attention"] = field(
        default="input",
        metadata={
            "help": "'input' adds the head's positions once, to its input tokens; 'attention' adds them to the "
            "queries and keys (not the values) of every head layer, as TransVG's vision-language transformer."
        },
    )
    head_init: Literal["trunc_normal", "transvg"] = field(
        default="trunc_normal",
        metadata={
            "help": "Initialisation of the head: 'trunc_normal' ([REG] and positions from a truncated normal, "
            "std 0.02; layers as torch builds them) or 'transvg' ([REG] and positions N(0, 1) as nn.Embedding, "
            "every matrix of the transformer layers xavier-uniform, as TransVG)."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Filled automatically with the full names of the tapped modules; do not set by hand."},
    )
    tower_shapes: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Filled automatically: widths and token counts of the taps and towers the adapter was built "
            "for. Loading the adapter onto a pair whose shapes differ raises a ValueError."
        },
    )
    base_towers: dict[str, str | None] | None = field(
        default=None,
        metadata={
            "help": "The frozen towers the adapter was built on: {'vision': ..., 'text': ..., 'dtype': ...}, the "
            "tower names as peft_m2ist.pretrained's load_vision_tower / load_text_tower take them (Hub id, local "
            "folder, offline:* name) and their dtype ('float32', 'bfloat16', ..., or 'int8': weight-only int8 "
            "towers, quantized again on loading). Filled at get_peft_model from "
            "a VisionTextPair's towers (their name_or_path and dtype) where left None; set it by hand for towers "
            "built from a config. Saved with the adapter; load_adapter_with_towers loads these towers again."
        },
    )

    def __post_init__(self) -> None:
        if self.task_type is None:
            self.task_type = REC_TASK_TYPE
        super().__post_init__()
        self.peft_type = M2IST_PEFT_TYPE
        for name in ("vision_tower", "text_tower"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"`{name}` must be a non-empty dotted module path, got {value!r}.")
        _check_tower_shapes(self.tower_shapes)
        self.base_towers = check_base_towers(self.base_towers)
        for name in ("vision_layers", "text_layers", "vision_attention_layers", "text_attention_layers"):
            _check_tap_spec(name, getattr(self, name))
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        positive = ("num_tapped_layers", "bottleneck_dim", "interaction_heads", "head_hidden_size",
                    "head_num_hidden_layers", "head_num_attention_heads", "head_intermediate_size", "max_text_tokens")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name in ("interaction_dim", "image_size", "tower_micro_batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"`{name}` must be None or a positive integer, got {value!r}.")
        for name in ("expert_dropout", "head_dropout", "head_attention_dropout", "expert_scale", "l1_weight",
                     "giou_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        for name in ("expert_dropout", "head_dropout", "head_attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")
        if self.expert_scale <= 0:
            raise ValueError(f"`expert_scale` must be positive, got {self.expert_scale!r}.")
        for name in ("l1_weight", "giou_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be non-negative, got {getattr(self, name)!r}.")
        if self.l1_weight == 0 and self.giou_weight == 0:
            raise ValueError("At least one of `l1_weight` and `giou_weight` must be positive.")
        for name in ("interaction", "mixture", "box_head"):
            _check_choice(self, name)
        for name in ("head_recompute_feed_forward", "head_gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        if self.head_hidden_size % self.head_num_attention_heads:
            raise ValueError(
                f"`head_hidden_size` ({self.head_hidden_size}) must be divisible by `head_num_attention_heads` "
                f"({self.head_num_attention_heads})."
            )
        if self.interaction == "cross_attention" and self.bottleneck_dim % self.interaction_heads:
            raise ValueError(
                f"`bottleneck_dim` ({self.bottleneck_dim}) must be divisible by `interaction_heads` "
                f"({self.interaction_heads}) when interaction='cross_attention'."
            )
        _check_fidelity_fields(self)  # the fidelity fields and `preset` (kept apart: see below)

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """peft's hook on the loaded config file: accept the field names of earlier versions (`RENAMED_FIELDS`)."""
        return rename_deprecated_fields(super().check_kwargs(**kwargs))


# ------------------------------------------------------------------ choices, read off the field types
@functools.cache
def field_choices(name: str) -> tuple[Any, ...]:
    """The values the field `name` of `M2ISTConfig` allows, read off its type: the values of its `Literal` (with
    `None` where the type is `Literal[...] | None`), or `(True, False)` for a `bool`, in the order written there."""
    hint = get_type_hints(M2ISTConfig)[name]
    if hint is bool:
        return (True, False)
    choices: list[Any] = []
    for part in get_args(hint) if get_origin(hint) is not Literal else (hint,):
        choices.extend(get_args(part) if get_origin(part) is Literal else [None] if part is type(None) else [])
    if not choices:
        raise TypeError(f"`M2ISTConfig.{name}` is neither a Literal nor a bool.")
    return tuple(choices)


def _check_choice(config: M2ISTConfig, name: str) -> None:
    allowed = field_choices(name)
    if getattr(config, name) not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(config, name)!r}.")


# ------------------------------------------------------------------ fidelity fields and the paper preset
FIDELITY_FIELDS = (
    "tap_layer_spacing", "expert_init", "expert_norm", "language_expert_output_norm", "interaction_width",
    "interaction_input_norm", "interaction_scaled", "interaction_text_path", "interaction_text_output_norm",
    "head_input_norm", "head_grid_encoding", "head_positions", "head_init",
)
"""The fields where the library departs from the authors' code (docs/fidelity.md), in declaration order."""
FIDELITY_CHOICES: dict[str, tuple[Any, ...]] = {name: field_choices(name) for name in FIDELITY_FIELDS}
"""Each fidelity field's allowed values, from its type; the first is the library default."""

PRESETS = tuple(choice for choice in field_choices("preset") if choice is not None)
PAPER_PRESET: dict[str, Any] = {
    "tap_layer_spacing": "first",
    "expert_init": "kaiming",
    "expert_norm": "affine",
    "language_expert_output_norm": "tower",
    "interaction_width": "vision",
    "interaction_input_norm": False,
    "interaction_scaled": False,
    "interaction_text_path": "concat",
    "interaction_text_output_norm": "tower",
    "head_input_norm": False,
    "head_grid_encoding": "none",
    "head_positions": "attention",
    "head_init": "transvg",
    # existing fields whose library default is not the authors'
    "box_head": "mlp",
    "head_attention_dropout": 0.1,
    # existing fields whose library default is the authors' (the preset refuses other values)
    "interaction": "shared",
    "mixture": "sum",
    "interaction_dim": None,
}
"""What `M2ISTConfig(preset="paper")` sets: the authors' choice for every departure listed in docs/fidelity.md.
Sizes (bottleneck_dim=128, head 256 / 6 layers / 8 heads / 2048, num_tapped_layers=6, expert_scale=0.1, dropouts)
are the library defaults, which are the paper's; the preset leaves them free."""


def _check_fidelity_fields(config: M2ISTConfig) -> None:
    """Validate the fidelity fields and apply `preset` (fields at their library default take the preset's value)."""
    if config.preset is not None and config.preset not in PRESETS:
        raise ValueError(f"`preset` must be None or one of {PRESETS}, got {config.preset!r}.")
    for name, allowed in FIDELITY_CHOICES.items():
        value = getattr(config, name)
        if isinstance(allowed[0], bool):
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` must be True or False, got {value!r}.")
        elif value not in allowed:
            raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")
    if config.preset == "paper":
        defaults = {f.name: f.default for f in fields(config) if f.name in PAPER_PRESET}
        for name, paper in PAPER_PRESET.items():
            value = getattr(config, name)
            if value == paper:
                continue
            if value != defaults[name]:
                raise ValueError(
                    f"preset='paper' sets `{name}` to the authors' {paper!r}, but the config sets {value!r}. Drop "
                    f"`{name}` (or the preset, and set each field yourself: docs/fidelity.md lists them)."
                )
            setattr(config, name, paper)
    if config.interaction_text_output_norm == "tower" and config.interaction_text_path != "concat":
        raise ValueError(
            "`interaction_text_output_norm='tower'` normalises the interactive expert's concatenated text output: "
            "it needs `interaction_text_path='concat'`."
        )
    tower_norms = [f"`{name}='tower'`" for name in ("language_expert_output_norm", "interaction_text_output_norm")
                   if getattr(config, name) == "tower"]
    if config.expert_init == "zero_up" and tower_norms:
        raise ValueError(
            f"`expert_init='zero_up'` starts the experts' outputs at exactly zero, and {' and '.join(tower_norms)} "
            "normalises such an output on its own: a LayerNorm of an all-zero vector has a gradient of 1/sqrt(eps), "
            "so the first step's gradient is 700x the usual or more, and clipping then starves the head "
            "(docs/fidelity.md). Use `expert_init='kaiming'` (the authors', who pair it with these norms) or set the "
            "norms to 'none'."
        )
    if config.interaction_dim is not None and config.interaction_width != "head":
        raise ValueError(
            f"`interaction_dim` ({config.interaction_dim}) and `interaction_width={config.interaction_width!r}` "
            "both set the interaction width; set one of them."
        )
