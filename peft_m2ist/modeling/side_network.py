"""The side network of one adapter: M3ISA blocks over the tapped layer pairs and the projections to the head width."""

from __future__ import annotations

import torch
from torch import nn

from .experts import M3ISA
from .settings import ExpertSettings
from .stream_shapes import AdapterPlan


class M2ISTSideNetwork(nn.Module):
    """Turns the recorded tap outputs and the towers' final tokens into head-width token streams.

    For each tower: stream = final tokens + input embedding (when its tap is read) + the experts' stream corrections;
    head tokens = Linear(stream) + the experts' head-space corrections. Every tap must already have its tower's final
    token count (`encode_towers` pools feature-map taps onto the final grid).

    Args:
        config: the adapter's config (`M2ISTConfig`); the experts read their fields from it (`ExpertSettings`),
            the projections `head_hidden_size`.
        plan: what the probe measured on the pair (`AdapterPlan`): the full names of the taps each M3ISA block reads,
            one per tapped layer pair, and the embedding tap added to the stream (`None`: none); each tower's
            shapes (`StreamShapes`: the widths of its final tokens and of each tapped output); and the text tower's
            own frozen LayerNorms, one per tapped layer, applied to the language expert's output and to the
            interactive expert's text output (`None`: not applied).
    """

    def __init__(self, config: ExpertSettings, plan: AdapterPlan) -> None:
        super().__init__()
        self.vision_taps = plan.vision_taps
        self.text_taps = plan.text_taps
        vision, text = plan.vision, plan.text
        num_layers = len(vision.ffn_dims)
        ffn_norms = list(plan.text_ffn_norms) if plan.text_ffn_norms is not None else [None] * num_layers
        attention_norms = (list(plan.text_attention_norms) if plan.text_attention_norms is not None
                           else [None] * num_layers)
        layer_dims = zip(vision.ffn_dims, vision.attention_dims, text.ffn_dims, text.attention_dims, ffn_norms,
                         attention_norms)
        self.blocks = nn.ModuleList(
            M3ISA(config, vision_ffn_dim, vision_attention_dim, vision.stream_dim, text_ffn_dim, text_attention_dim,
                  text.stream_dim, language_output_norm=ffn_norm, interaction_text_norm=attention_norm)
            for vision_ffn_dim, vision_attention_dim, text_ffn_dim, text_attention_dim, ffn_norm, attention_norm
            in layer_dims
        )
        self.vision_proj = nn.Linear(vision.stream_dim, config.head_hidden_size)
        self.text_proj = nn.Linear(text.stream_dim, config.head_hidden_size)

    def tap_names(self) -> list[str]:
        """Every tap this side network reads (vision, then text)."""
        return [*self.vision_taps.all(), *self.text_taps.all()]

    @staticmethod
    def _tap(taps: dict[str, torch.Tensor], name: str, num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
        if name not in taps:
            raise RuntimeError(f"Tap '{name}' recorded nothing during the tower forward; was its module skipped?")
        tensor = taps[name]
        if tensor.dim() != 3 or tensor.shape[1] != num_tokens:
            raise ValueError(
                f"Tap '{name}' has shape {tuple(tensor.shape)}; the side network reads (batch, {num_tokens}, dim), "
                "its tower's final token count (as `encode_towers` returns the taps)."
            )
        return tensor.to(dtype)

    def forward(
        self,
        taps: dict[str, torch.Tensor],
        vision: torch.Tensor,
        text: torch.Tensor,
        vision_mask: torch.Tensor | None,
        text_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Correct the towers' final tokens with the experts' outputs.

        Args:
            taps: full tap name -> recorded output `(batch, tokens, dim)`, at its tower's final token count.
            vision: the vision tower's final tokens `(batch, Nv, Dv)`.
            text: the text tower's final tokens `(batch, Nt, Dt)`.
            vision_mask: `(batch, Nv)`, 1 = real image content, or `None` (all real).
            text_mask: `(batch, Nt)`, 1 = real token, or `None` (all real).

        Returns:
            vision tokens `(batch, Nv, head_hidden_size)` and text tokens `(batch, Nt, head_hidden_size)`.
        """
        dtype = self.vision_proj.weight.dtype
        num_vision, num_text = vision.shape[1], text.shape[1]
        vision_stream = vision.to(dtype)
        text_stream = text.to(dtype)
        if self.vision_taps.embeddings:
            vision_stream = vision_stream + self._tap(taps, self.vision_taps.embeddings, num_vision, dtype)
        if self.text_taps.embeddings:
            text_stream = text_stream + self._tap(taps, self.text_taps.embeddings, num_text, dtype)
        vision_head_corrections: list[torch.Tensor] = []
        text_head_corrections: list[torch.Tensor] = []
        layer_taps = zip(self.vision_taps.ffn, self.vision_taps.attention, self.text_taps.ffn, self.text_taps.attention)
        for block, (vision_ffn, vision_attention, text_ffn, text_attention) in zip(self.blocks, layer_taps):
            vision_correction, vision_head_correction, text_correction, text_head_correction = block(
                self._tap(taps, vision_ffn, num_vision, dtype),
                self._tap(taps, vision_attention, num_vision, dtype),
                self._tap(taps, text_ffn, num_text, dtype),
                self._tap(taps, text_attention, num_text, dtype),
                vision_mask,
                text_mask,
            )
            vision_stream = vision_stream + vision_correction
            text_stream = text_stream + text_correction
            if vision_head_correction is not None:
                vision_head_corrections.append(vision_head_correction)
            if text_head_correction is not None:
                text_head_corrections.append(text_head_correction)
        vision_tokens = self.vision_proj(vision_stream)
        text_tokens = self.text_proj(text_stream)
        if vision_head_corrections:
            vision_tokens = vision_tokens + torch.stack(vision_head_corrections).sum(0)
        if text_head_corrections:
            text_tokens = text_tokens + torch.stack(text_head_corrections).sum(0)
        return vision_tokens, text_tokens

    def adapter_parameters(self) -> int:
        """Parameters of the M3ISA experts only (the paper's 'tunable parameters'); projections excluded."""
        return sum(p.numel() for p in self.blocks.parameters())
