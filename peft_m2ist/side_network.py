"""The side network of one adapter: M3ISA blocks over the tapped layer pairs and the projections to the head width."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from .config import M2ISTConfig
from .experts import M3ISA
from .towers import TowerOutput, match_grid, to_tokens


@dataclass
class StreamShapes:
    """Shapes of one tower as seen by the side network (recorded in `M2ISTConfig.tower_shapes`).

    `grid` is the `(height, width)` grid of the last `height * width` output tokens, if they tile the image;
    `prefix_tokens` counts the output tokens before it (a ViT's [CLS]); `patch_grid` is True when the grid is a
    patch tower's patch layout rather than a feature map's.
    """

    stream_dim: int
    num_tokens: int
    grid: list[int] | None
    ffn_dims: list[int]
    attention_dims: list[int]
    has_embedding: bool
    prefix_tokens: int = 0
    patch_grid: bool = False

    def without_patch_grid(self) -> StreamShapes:
        """The same shapes with a patch tower's tokens read as a plain sequence (no grid, no prefix)."""
        if not self.patch_grid:
            return self
        return replace(self, grid=None, prefix_tokens=0, patch_grid=False)

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


class M2ISTSideNetwork(nn.Module):
    """Turns the recorded tap outputs and the towers' final tokens into head-width token streams.

    For each tower: stream = final tokens + input embedding (when its shape matches) + the experts' stream
    corrections; head tokens = Linear(stream) + the experts' head-space corrections. Feature-map taps with more tokens
    than the final map are average-pooled onto the final grid before their expert.
    """

    def __init__(self, config: M2ISTConfig, vision: StreamShapes, text: StreamShapes,
                 vision_taps: TapNames, text_taps: TapNames) -> None:
        super().__init__()
        self.vision_taps = vision_taps
        self.text_taps = text_taps
        self.vision_grid = tuple(vision.grid) if vision.grid else None
        self.blocks = nn.ModuleList(
            M3ISA(
                vf, va, vision.stream_dim, tf, ta, text.stream_dim,
                bottleneck_dim=config.bottleneck_dim,
                interaction_dim=config.resolved_interaction_dim,
                head_hidden_size=config.head_hidden_size,
                scale=config.expert_scale,
                dropout=config.expert_dropout,
                interaction=config.interaction,
                interaction_heads=config.interaction_heads,
                gated=config.mixture == "gated",
            )
            for vf, va, tf, ta in zip(vision.ffn_dims, vision.attention_dims, text.ffn_dims, text.attention_dims)
        )
        self.vision_proj = nn.Linear(vision.stream_dim, config.head_hidden_size)
        self.text_proj = nn.Linear(text.stream_dim, config.head_hidden_size)

    @staticmethod
    def _tap(records: dict[str, torch.Tensor], name: str, num_tokens: int, grid: tuple[int, int] | None,
             dtype: torch.dtype) -> torch.Tensor:
        if name not in records:
            raise RuntimeError(f"Tap '{name}' recorded nothing during the tower forward; was its module skipped?")
        return match_grid(to_tokens(records[name]), num_tokens, grid).to(dtype)

    def forward(self, records: dict[str, torch.Tensor], vision: TowerOutput,
                text: TowerOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns vision tokens `(batch, Nv, head_hidden_size)` and text tokens `(batch, Nt, head_hidden_size)`."""
        dtype = self.vision_proj.weight.dtype
        nv, grid = vision.tokens.num_tokens, vision.tokens.grid or self.vision_grid
        nt = text.tokens.num_tokens
        vision_stream = vision.tokens.tensor.to(dtype)
        text_stream = text.tokens.tensor.to(dtype)
        if self.vision_taps.embeddings:
            vision_stream = vision_stream + self._tap(records, self.vision_taps.embeddings, nv, grid, dtype)
        if self.text_taps.embeddings:
            text_stream = text_stream + self._tap(records, self.text_taps.embeddings, nt, None, dtype)
        vision_head: list[torch.Tensor] = []
        text_head: list[torch.Tensor] = []
        layer_names = zip(self.vision_taps.ffn, self.vision_taps.attention, self.text_taps.ffn, self.text_taps.attention)
        for block, (vf, va, tf, ta) in zip(self.blocks, layer_names):
            vs, vh, ts, th = block(
                self._tap(records, vf, nv, grid, dtype),
                self._tap(records, va, nv, grid, dtype),
                self._tap(records, tf, nt, None, dtype),
                self._tap(records, ta, nt, None, dtype),
                vision.mask,
                text.mask,
            )
            vision_stream = vision_stream + vs
            text_stream = text_stream + ts
            if vh is not None:
                vision_head.append(vh)
            if th is not None:
                text_head.append(th)
        vision_tokens = self.vision_proj(vision_stream)
        text_tokens = self.text_proj(text_stream)
        if vision_head:
            vision_tokens = vision_tokens + torch.stack(vision_head).sum(0)
        if text_head:
            text_tokens = text_tokens + torch.stack(text_head).sum(0)
        return vision_tokens, text_tokens

    def adapter_parameters(self) -> int:
        """Parameters of the M3ISA experts only (the paper's 'tunable parameters'); projections excluded."""
        return sum(p.numel() for p in self.blocks.parameters())
