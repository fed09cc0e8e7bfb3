"""What the probe measures on a pair: each tower's shapes (`StreamShapes`), its tap names (`TapNames`), and both
gathered in an `AdapterPlan`.

`peft_m2ist.tuner.plan.plan_adapter` fills them; the side network and the grounding head are built from them, and
the shapes are saved in `M2ISTConfig.tower_shapes`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn


@dataclass
class StreamShapes:
    """Shapes of one tower as seen by the side network (recorded in `M2ISTConfig.tower_shapes`).

    `stream_dim` and `num_tokens` are the width and count of the final tokens `(batch, num_tokens, stream_dim)`;
    `grid` is the `[height, width]` grid of the last `height * width` final tokens, if they tile the image;
    `prefix_tokens` counts the final tokens before it (a ViT's [CLS]); `patch_grid` is True when the grid is a patch
    tower's patch grid rather than a feature map's. `ffn_dims` / `attention_dims` are the widths of each FFN /
    attention tap; `has_embedding` says whether the embedding tap is read. The field names are the JSON keys saved
    in adapter configs.
    """

    stream_dim: int
    num_tokens: int
    grid: list[int] | None
    ffn_dims: list[int]
    attention_dims: list[int]
    has_embedding: bool
    prefix_tokens: int = 0
    patch_grid: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TapNames:
    """Full names (in the container) of one tower's taps, one per tapped layer, plus its embedding tap if any."""

    ffn: list[str]
    attention: list[str]
    embeddings: str | None

    def all(self) -> list[str]:
        """Every tapped module name, embeddings included."""
        return [*self.ffn, *self.attention, *([self.embeddings] if self.embeddings else [])]


@dataclass
class AdapterPlan:
    """Everything needed to build one adapter's taps, side network and head on a given container."""

    vision_taps: TapNames
    text_taps: TapNames
    vision: StreamShapes
    text: StreamShapes
    image_size: int
    # the text tower's own frozen LayerNorms, one per tapped layer, where the config applies them (else None):
    # ending each tapped block's FFN (`language_expert_output_norm="tower"`) and attention
    # (`interaction_text_output_norm="tower"`)
    text_ffn_norms: list[nn.LayerNorm] | None = None
    text_attention_norms: list[nn.LayerNorm] | None = None
    # one line per tower: what was tapped and why (`peft_m2ist.tuner.plan.describe_taps`)
    descriptions: dict[str, str] = field(default_factory=dict)

    @property
    def target_modules(self) -> list[str]:
        return sorted(set(self.vision_taps.all() + self.text_taps.all()))
