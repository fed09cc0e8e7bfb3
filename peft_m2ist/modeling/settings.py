"""The `M2ISTConfig` fields each module of this room reads, as typing protocols.

The modules take the adapter's config and read its fields by their own names, as transformers modules take their
`config`; the modeling room may not import the tuner's `M2ISTConfig` (tests/test_layout.py), so these protocols say
which fields each one reads. `M2ISTConfig` is the one place that documents, defaults and validates them.
"""

from __future__ import annotations

from typing import Protocol


class ExpertSettings(Protocol):
    """What the M3ISA experts and the side network read."""

    bottleneck_dim: int
    expert_scale: float
    expert_dropout: float
    expert_norm: str
    expert_init: str
    interaction: str
    interaction_dim: int | None
    interaction_width: str
    interaction_heads: int
    interaction_input_norm: bool
    interaction_scaled: bool
    interaction_text_path: str
    mixture: str
    head_hidden_size: int


class HeadSettings(Protocol):
    """What the grounding head reads."""

    head_hidden_size: int
    head_num_hidden_layers: int
    head_num_attention_heads: int
    head_intermediate_size: int
    head_dropout: float
    head_attention_dropout: float
    max_text_tokens: int
    box_head: str
    head_gradient_checkpointing: bool
    head_recompute_feed_forward: bool
    head_input_norm: bool
    head_grid_encoding: str
    head_positions: str
    head_init: str


class LossSettings(Protocol):
    """What the box loss of the REC forward reads."""

    l1_weight: float
    giou_weight: float
