"""M3ISA: the vision expert, the language expert, the interactive expert and the optional gate of one tapped layer pair.

All experts read detached tower activations `(batch, tokens, dim)` and write corrections that are added to the towers'
final tokens on the side; nothing flows back into a tower.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .settings import ExpertSettings


def interaction_dim(config: ExpertSettings, vision_stream_dim: int) -> int:
    """Width of the interactive expert's shared up-projection, the one rule for it: `config.interaction_dim`, else
    the head's width (`interaction_width="head"`) or the vision tower's token width `vision_stream_dim`
    (`interaction_width="vision"`, the authors')."""
    if config.interaction_dim is not None:
        return config.interaction_dim
    return vision_stream_dim if config.interaction_width == "vision" else config.head_hidden_size


def init_projection(linear: nn.Linear, init: str, zero: bool = False) -> None:
    """`init="kaiming"`: the authors' init of an expert projection, kaiming-uniform weights (a=sqrt(5)) and biases
    from U(0, 1). Otherwise zero the projection when `zero` (the library's up-projections) or keep torch's init."""
    if init == "kaiming":
        with torch.no_grad():
            nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
            nn.init.uniform_(linear.bias, 0.0, 1.0)
    elif zero:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)


class FrozenTowerNorm:
    """One of the text tower's own LayerNorms, applied to a side-network tensor (the authors' language and
    interactive experts end in the BERT block's LayerNorm).

    Deliberately not an `nn.Module`: the norm stays the tower's (frozen, not a parameter of the side network, not
    saved with the adapter, moved and cast with the tower); its weights are cast to the input's dtype and device.
    """

    def __init__(self, norm: nn.LayerNorm) -> None:
        self.norm = norm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        weight = None if norm.weight is None else norm.weight.to(device=x.device, dtype=x.dtype)
        bias = None if norm.bias is None else norm.bias.to(device=x.device, dtype=x.dtype)
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)

    def __repr__(self) -> str:
        return f"FrozenTowerNorm({self.norm})"


class ModalityExpert(nn.Module):
    """Bottleneck adapter on one tower's tapped FFN output: LayerNorm -> down -> ReLU -> dropout -> up -> x scale.

    The LayerNorm has no affine parameters: an affine map right before `down` folds into `down`, and without it
    autograd keeps the side network's own normalised copy of the tap instead of the tower's tensor.

    Used as the vision expert (VEA) and the language expert (LEA). Input `(batch, tokens, in_dim)`, output
    `(batch, tokens, out_dim)`; `out_dim` is the width of the tower's final tokens. `up` starts at zero (as LoRA's `B`
    and AdaptFormer's up-projection do), so an untrained expert adds nothing and the head starts from the towers' own
    tokens (random corrections at the start slowed learning on the built-in benchmark; see docs/results.md).

    Reads `config.bottleneck_dim`, `expert_scale` and `expert_dropout`. With `expert_norm="affine"` (the authors')
    the LayerNorm has a learned scale and shift, applied after the plain normalisation, so autograd still keeps the
    normalised copy and not the tap. With `expert_init="kaiming"` (the authors') both projections get
    `init_projection`'s kaiming weights and U(0, 1) biases.
    """

    def __init__(self, config: ExpertSettings, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, elementwise_affine=config.expert_norm == "affine")
        self.down = nn.Linear(in_dim, config.bottleneck_dim)
        self.up = nn.Linear(config.bottleneck_dim, out_dim)
        init_projection(self.up, config.expert_init, zero=True)
        init_projection(self.down, config.expert_init)
        self.dropout = nn.Dropout(config.expert_dropout)
        self.scale = config.expert_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the expert output `(batch, tokens, out_dim)` and its bottleneck `(batch, tokens, bottleneck)`."""
        normed = F.layer_norm(x, self.norm.normalized_shape, None, None, self.norm.eps)
        if self.norm.weight is not None:
            normed = torch.addcmul(self.norm.bias, normed, self.norm.weight)
        hidden = self.dropout(torch.relu(self.down(normed)))
        return self.up(hidden) * self.scale, hidden


class InteractiveExpert(nn.Module):
    """The interactive expert (IEA) linking the two modalities at one layer pair.

    Each tower's tapped attention output `(batch, tokens, vision_dim or text_dim)` goes through its own (non-affine)
    LayerNorm -> down-projection to `config.bottleneck_dim` -> ReLU. Then, by `config.interaction`:
    - `interaction="shared"` (the paper): one up-projection, whose weights are shared by both modalities, maps each
      stream into the interaction space;
    - `interaction="cross_attention"` (ours): before the shared up-projection, the vision bottleneck tokens attend to the
      text bottleneck tokens and vice versa (residual, pre-norm), so tokens cross between modalities.
    Outputs are `(batch, vision_tokens, interaction_dim)` and `(batch, text_tokens, interaction_dim)`, x scale. The
    shared up-projection starts at zero, like the modality experts' (see `ModalityExpert`).

    The authors' variant, by `config` fields: `interaction_input_norm=False` (no LayerNorm before the
    down-projections), `interaction_scaled=False` (no x scale), `expert_init="kaiming"` and
    `interaction_text_path="concat"`: the text output is `cat[text_up(t), shared_up(t)]`, `text_stream_dim` wide,
    with `text_up` a `Linear(bottleneck_dim, text_stream_dim - interaction_dim)` (the authors' 128 -> 512 beside the
    shared 128 -> 256).
    """

    def __init__(self, config: ExpertSettings, vision_dim: int, text_dim: int, *, interaction_dim: int,
                 text_stream_dim: int) -> None:
        super().__init__()
        bottleneck_dim, init = config.bottleneck_dim, config.expert_init
        text_extra = text_stream_dim - interaction_dim if config.interaction_text_path == "concat" else 0
        self.vision_norm = nn.LayerNorm(vision_dim, elementwise_affine=False)
        self.vision_down = nn.Linear(vision_dim, bottleneck_dim)
        self.text_norm = nn.LayerNorm(text_dim, elementwise_affine=False)
        self.text_down = nn.Linear(text_dim, bottleneck_dim)
        self.shared_up = nn.Linear(bottleneck_dim, interaction_dim)
        init_projection(self.shared_up, init, zero=True)
        self.text_up = nn.Linear(bottleneck_dim, text_extra) if text_extra > 0 else None
        if init == "kaiming":
            for linear in (self.vision_down, self.text_down, self.text_up):
                if linear is not None:
                    init_projection(linear, init)
        elif self.text_up is not None:
            init_projection(self.text_up, init, zero=True)
        self.dropout = nn.Dropout(config.expert_dropout)
        self.scale = config.expert_scale if config.interaction_scaled else 1.0
        self.input_norm = config.interaction_input_norm
        self.mode = config.interaction
        if self.mode == "cross_attention":
            heads = config.interaction_heads
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
        if self.input_norm:
            vision, text = self.vision_norm(vision), self.text_norm(text)
        v = self.dropout(torch.relu(self.vision_down(vision)))
        t = self.dropout(torch.relu(self.text_down(text)))
        if self.mode == "cross_attention":
            text_pad = None if text_mask is None else ~text_mask.bool()
            vision_pad = None if vision_mask is None else ~vision_mask.bool()
            tn, vn = self.cross_norm_text(t), self.cross_norm_vision(v)
            v = v + self.vision_from_text(vn, tn, tn, key_padding_mask=text_pad, need_weights=False)[0]
            t = t + self.text_from_vision(tn, vn, vn, key_padding_mask=vision_pad, need_weights=False)[0]
        text_out = self.shared_up(t)
        if self.text_up is not None:
            text_out = torch.cat([self.text_up(t), text_out], dim=-1)
        if self.scale == 1.0:
            return self.shared_up(v), text_out
        return self.shared_up(v) * self.scale, text_out * self.scale


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
    """The three experts (and, with `config.mixture="gated"`, two gates) of one tapped vision/text layer pair.

    The interactive expert's output lives in the interaction space (`interaction_dim(config, vision_stream_dim)`
    wide). For a modality whose final tokens have exactly that width it joins the stream directly (the stream's
    projection to the head then maps it); otherwise a modality-specific `Linear(interaction width,
    config.head_hidden_size)` maps it, and it joins after the projection. With
    `interaction_text_path="concat"` (the authors' text path) the text output is widened to the text width instead (see
    `InteractiveExpert`) and joins the text stream. `language_output_norm` / `interaction_text_norm` (the text
    block's own frozen LayerNorms, `FrozenTowerNorm`) normalise the language expert's output and the interactive
    expert's text output before they join the stream, as the authors' BERT blocks do.
    """

    def __init__(
        self,
        config: ExpertSettings,
        vision_ffn_dim: int,
        vision_attention_dim: int,
        vision_stream_dim: int,
        text_ffn_dim: int,
        text_attention_dim: int,
        text_stream_dim: int,
        *,
        language_output_norm: nn.LayerNorm | None = None,
        interaction_text_norm: nn.LayerNorm | None = None,
    ) -> None:
        super().__init__()
        width = interaction_dim(config, vision_stream_dim)
        text_concat = config.interaction_text_path == "concat"
        if text_concat and text_stream_dim <= width:
            raise ValueError(f"The concatenated text path needs a text width ({text_stream_dim}) above the "
                             f"interaction width ({width}).")
        self.vision_expert = ModalityExpert(config, vision_ffn_dim, vision_stream_dim)
        self.language_expert = ModalityExpert(config, text_ffn_dim, text_stream_dim)
        self.interactive_expert = InteractiveExpert(config, vision_attention_dim, text_attention_dim,
                                                    interaction_dim=width, text_stream_dim=text_stream_dim)
        head_hidden_size = config.head_hidden_size
        self.vision_to_head = None if vision_stream_dim == width else nn.Linear(width, head_hidden_size)
        text_joins_stream = text_concat or text_stream_dim == width
        self.text_to_head = None if text_joins_stream else nn.Linear(width, head_hidden_size)
        gated = config.mixture == "gated"
        self.vision_gate = ExpertGate(config.bottleneck_dim) if gated else None
        self.text_gate = ExpertGate(config.bottleneck_dim) if gated else None
        # the tower's own norms: plain attributes, not submodules (see FrozenTowerNorm)
        self.language_output_norm = None if language_output_norm is None else FrozenTowerNorm(language_output_norm)
        self.interaction_text_norm = None if interaction_text_norm is None else FrozenTowerNorm(interaction_text_norm)

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
        if self.language_output_norm is not None:
            text_out = self.language_output_norm(text_out)
        if self.interaction_text_norm is not None:
            text_inter = self.interaction_text_norm(text_inter)
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
