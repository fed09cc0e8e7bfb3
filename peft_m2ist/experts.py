"""M3ISA: the vision expert, the language expert, the interactive expert and the optional gate of one tapped layer pair.

All experts read detached tower activations `(batch, tokens, dim)` and write corrections that are added to the towers'
final tokens on the side; nothing flows back into a tower.
"""

from __future__ import annotations

import torch
from torch import nn


class ModalityExpert(nn.Module):
    """Bottleneck adapter on one tower's tapped FFN output: LayerNorm -> down -> ReLU -> dropout -> up -> x scale.

    The LayerNorm has no affine parameters: an affine map right before `down` folds into `down`, and without it
    autograd keeps the side network's own normalised copy of the tap instead of the tower's tensor.

    Used as the vision expert (VEA) and the language expert (LEA). Input `(batch, tokens, in_dim)`, output
    `(batch, tokens, out_dim)`; `out_dim` is the width of the tower's final tokens. `up` starts at zero (as LoRA's `B`
    and AdaptFormer's up-projection do), so an untrained expert adds nothing and the head starts from the towers' own
    tokens (random corrections at the start slowed learning on the built-in benchmark; see docs/results.md).
    """

    def __init__(self, in_dim: int, bottleneck_dim: int, out_dim: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, elementwise_affine=False)
        self.down = nn.Linear(in_dim, bottleneck_dim)
        self.up = nn.Linear(bottleneck_dim, out_dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the expert output `(batch, tokens, out_dim)` and its bottleneck `(batch, tokens, bottleneck)`."""
        hidden = self.dropout(torch.relu(self.down(self.norm(x))))
        return self.up(hidden) * self.scale, hidden


class InteractiveExpert(nn.Module):
    """The interactive expert (IEA) linking the two modalities at one layer pair.

    Each tower's tapped attention output goes through its own (non-affine) LayerNorm -> down-projection -> ReLU. Then:
    - `interaction="shared"` (the paper): one up-projection, whose weights are shared by both modalities, maps each
      stream into the interaction space;
    - `interaction="cross_attention"` (ours): before the shared up-projection, the vision bottleneck tokens attend to the
      text bottleneck tokens and vice versa (residual, pre-norm), so tokens cross between modalities.
    Outputs are `(batch, vision_tokens, interaction_dim)` and `(batch, text_tokens, interaction_dim)`, x scale. The
    shared up-projection starts at zero, like the modality experts' (see `ModalityExpert`).
    """

    def __init__(
        self,
        vision_dim: int,
        text_dim: int,
        bottleneck_dim: int,
        interaction_dim: int,
        scale: float,
        dropout: float,
        mode: str = "shared",
        heads: int = 4,
    ) -> None:
        super().__init__()
        self.vision_norm = nn.LayerNorm(vision_dim, elementwise_affine=False)
        self.vision_down = nn.Linear(vision_dim, bottleneck_dim)
        self.text_norm = nn.LayerNorm(text_dim, elementwise_affine=False)
        self.text_down = nn.Linear(text_dim, bottleneck_dim)
        self.shared_up = nn.Linear(bottleneck_dim, interaction_dim)
        nn.init.zeros_(self.shared_up.weight)
        nn.init.zeros_(self.shared_up.bias)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        self.mode = mode
        if mode == "cross_attention":
            self.vision_from_text = nn.MultiheadAttention(bottleneck_dim, heads, batch_first=True)
            self.text_from_vision = nn.MultiheadAttention(bottleneck_dim, heads, batch_first=True)
            self.cross_norm_vision = nn.LayerNorm(bottleneck_dim)
            self.cross_norm_text = nn.LayerNorm(bottleneck_dim)

    def forward(
        self,
        vision: torch.Tensor,
        text: torch.Tensor,
        vision_mask: torch.Tensor | None,
        text_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`vision` `(batch, Nv, vision_dim)`, `text` `(batch, Nt, text_dim)`; masks `(batch, N)` with 1 = real token."""
        v = self.dropout(torch.relu(self.vision_down(self.vision_norm(vision))))
        t = self.dropout(torch.relu(self.text_down(self.text_norm(text))))
        if self.mode == "cross_attention":
            text_pad = None if text_mask is None else ~text_mask.bool()
            vision_pad = None if vision_mask is None else ~vision_mask.bool()
            tn, vn = self.cross_norm_text(t), self.cross_norm_vision(v)
            v = v + self.vision_from_text(vn, tn, tn, key_padding_mask=text_pad, need_weights=False)[0]
            t = t + self.text_from_vision(tn, vn, vn, key_padding_mask=vision_pad, need_weights=False)[0]
        return self.shared_up(v) * self.scale, self.shared_up(t) * self.scale


class ExpertGate(nn.Module):
    """A learned per-token gate over (modality expert, interactive expert), read from the modality bottleneck.

    Weights are `2 * softmax(logits)`; the logits start at zero, so an untrained gate equals the plain sum.
    Input `(batch, tokens, bottleneck)`, output `(batch, tokens, 2)`.
    """

    def __init__(self, bottleneck_dim: int) -> None:
        super().__init__()
        self.logits = nn.Linear(bottleneck_dim, 2)
        nn.init.zeros_(self.logits.weight)
        nn.init.zeros_(self.logits.bias)

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.softmax(self.logits(bottleneck), dim=-1)


class M3ISA(nn.Module):
    """The three experts (and, with `mixture="gated"`, two gates) of one tapped vision/text layer pair.

    The interactive expert's output lives in the interaction space. For a modality whose final tokens have exactly
    that width it joins the stream directly (the stream's projection to the head then maps it); otherwise a
    modality-specific `Linear(interaction_dim, head_hidden_size)` maps it, and it joins after the projection.
    """

    def __init__(
        self,
        vision_ffn_dim: int,
        vision_attention_dim: int,
        vision_stream_dim: int,
        text_ffn_dim: int,
        text_attention_dim: int,
        text_stream_dim: int,
        *,
        bottleneck_dim: int,
        interaction_dim: int,
        head_hidden_size: int,
        scale: float,
        dropout: float,
        interaction: str,
        interaction_heads: int,
        gated: bool,
    ) -> None:
        super().__init__()
        self.vision_expert = ModalityExpert(vision_ffn_dim, bottleneck_dim, vision_stream_dim, scale, dropout)
        self.language_expert = ModalityExpert(text_ffn_dim, bottleneck_dim, text_stream_dim, scale, dropout)
        self.interactive_expert = InteractiveExpert(
            vision_attention_dim, text_attention_dim, bottleneck_dim, interaction_dim, scale, dropout,
            mode=interaction, heads=interaction_heads,
        )
        self.vision_to_head = None if vision_stream_dim == interaction_dim else nn.Linear(interaction_dim, head_hidden_size)
        self.text_to_head = None if text_stream_dim == interaction_dim else nn.Linear(interaction_dim, head_hidden_size)
        self.vision_gate = ExpertGate(bottleneck_dim) if gated else None
        self.text_gate = ExpertGate(bottleneck_dim) if gated else None

    def forward(
        self,
        vision_ffn: torch.Tensor,
        vision_attention: torch.Tensor,
        text_ffn: torch.Tensor,
        text_attention: torch.Tensor,
        vision_mask: torch.Tensor | None,
        text_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Returns, per modality, the correction of the final tokens (stream width) and the correction in head space
        (`None` when the interactive output already joined the stream)."""
        vision_out, vision_hidden = self.vision_expert(vision_ffn)
        text_out, text_hidden = self.language_expert(text_ffn)
        vision_inter, text_inter = self.interactive_expert(vision_attention, text_attention, vision_mask, text_mask)
        vision_stream, vision_head = _mix(vision_out, vision_inter, vision_hidden, self.vision_gate,
                                          self.vision_to_head)
        text_stream, text_head = _mix(text_out, text_inter, text_hidden, self.text_gate, self.text_to_head)
        return vision_stream, vision_head, text_stream, text_head


def _mix(
    modality: torch.Tensor,
    interactive: torch.Tensor,
    bottleneck: torch.Tensor,
    gate: ExpertGate | None,
    to_head: nn.Linear | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if gate is not None:
        weights = gate(bottleneck)
        modality = modality * weights[..., :1]
        interactive = interactive * weights[..., 1:]
    if to_head is None:
        return modality + interactive, None
    return modality, to_head(interactive)
