"""The grounding head: [REG] + text tokens + vision tokens -> transformer -> one `cxcywh` box.

Two ways to read the box off the transformer (`M2ISTConfig.box_head`):

- `"mlp"` (TransVG, the paper's head): a 3-layer MLP on the [REG] output regresses the box.
- `"pointer"` (ours, the default): [REG] points at the vision tokens (one softmax over them); the box centre is the
  pointer-weighted mean of the tokens' cell centres plus an MLP offset of at most one cell, and the MLP gives the size.
  Same [REG] token, transformer and L1 + GIoU loss, but the loss reaches the selection directly instead of through a
  regression that first has to learn where every token sits: with the training example's config on the built-in
  benchmark the MLP head stays below chance where the pointer head reaches 75-80% Acc@0.5 (docs/results.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils import checkpoint as activation_checkpoint

from .feed_forward import LeanFeedForwardEncoderLayer
from .settings import HeadSettings


def sine_grid_encoding(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2D sine/cosine encoding `(1, h * w, dim)` of the cell centres of an `h x w` grid (row-major).

    Half the channels encode y, half x, each as sin/cos at geometric frequencies, so the head reads absolute
    coordinates off a vision token without learning them.
    """
    h, w = grid
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1)))
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    angles_y = yy.reshape(-1, 1) * freqs * 2 * torch.pi
    angles_x = xx.reshape(-1, 1) * freqs * 2 * torch.pi
    encoding = torch.cat([angles_y.sin(), angles_y.cos(), angles_x.sin(), angles_x.cos()], dim=1)
    padded = torch.zeros(h * w, dim)
    padded[:, : encoding.shape[1]] = encoding
    return padded.unsqueeze(0)


class BoxMLP(nn.Sequential):
    """`num_layers` Linear layers with ReLU between them: `(batch, dim)` -> `(batch, 4)` logits."""

    def __init__(self, dim: int, num_layers: int = 3) -> None:
        layers: list[nn.Module] = []
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, dim), nn.ReLU()]
        layers.append(nn.Linear(dim, 4))
        super().__init__(*layers)


def grid_cell_centres(grid: tuple[int, int]) -> torch.Tensor:
    """Cell centres `(h * w, 2)` as `(x, y)` normalised to [0, 1], row-major like the vision tokens."""
    h, w = grid
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


class PointerBox(nn.Module):
    """Box from [REG] pointing at vision tokens: `(batch, dim)` + `(batch, N, dim)` -> `(batch, 4)` `cxcywh` in [0, 1].

    Pointer weights `softmax(q(reg) . k(token) / sqrt(dim))` over the real vision tokens; centre = weighted mean of the
    token centres + `tanh` offset of at most one cell; width and height from a sigmoid. Token centres are the grid's
    cell centres for grid towers, or learned (starting at the image centre) for towers without a grid. With a grid,
    the first `prefix_tokens` vision tokens (a ViT's [CLS]: no place in the image) are not pointed at.
    """

    def __init__(self, dim: int, num_vision_tokens: int, vision_grid: tuple[int, int] | None,
                 prefix_tokens: int = 0) -> None:
        super().__init__()
        self.prefix_tokens = prefix_tokens if vision_grid is not None else 0
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, 4))
        self.scale = dim**-0.5
        if vision_grid is not None:
            self.register_buffer("token_centres", grid_cell_centres(vision_grid), persistent=False)
            self.register_buffer("max_offset", torch.tensor([1.0 / vision_grid[1], 1.0 / vision_grid[0]]),
                                 persistent=False)
        else:
            self.token_centres = nn.Parameter(torch.full((num_vision_tokens, 2), 0.5))
            self.register_buffer("max_offset", torch.tensor([0.5, 0.5]), persistent=False)

    def forward(self, reg: torch.Tensor, vision: torch.Tensor, vision_mask: torch.Tensor) -> torch.Tensor:
        vision, vision_mask = vision[:, self.prefix_tokens :], vision_mask[:, self.prefix_tokens :]
        logits = torch.einsum("bd,bnd->bn", self.query(reg), self.key(vision)) * self.scale
        logits = logits.masked_fill(~vision_mask.bool(), torch.finfo(logits.dtype).min)
        weights = logits.softmax(dim=-1)
        centre = weights @ self.token_centres.to(weights.dtype)
        pooled = torch.einsum("bn,bnd->bd", weights, vision)
        out = self.mlp(torch.cat([reg, pooled], dim=-1))
        centre = (centre + torch.tanh(out[:, :2]) * self.max_offset.to(out.dtype)).clamp(0.0, 1.0)
        return torch.cat([centre, out[:, 2:].sigmoid()], dim=-1)


class GroundingHead(nn.Module):
    """TransVG-style grounding head.

    Reads its sizes and options from `config` (`HeadSettings`: the `head_*` fields, `max_text_tokens`, `box_head`).
    A learned [REG] token is prepended to the text tokens and the vision tokens; the sequence is layer-normalised
    (the two towers' streams can differ in scale by orders of magnitude); a learned position embedding covers
    the `1 + max_text_tokens + num_vision_tokens` slots; a post-norm transformer encoder mixes them; the box, `cxcywh`
    normalised to [0, 1], comes from `PointerBox` (`box_head="pointer"`) or from a 3-layer MLP and a sigmoid on the
    [REG] output (`box_head="mlp"`, TransVG's). With a `vision_grid` `(h, w)` (a feature map's, or a patch tower's
    patches after `vision_prefix_tokens` leading tokens such as [CLS]) the vision tokens get a fixed sine encoding of
    their cell and the pointer uses the cell centres; without one, the pointer learns a centre per token.

    `head_dropout` applies to the residual and feed-forward paths; `head_attention_dropout` (default 0) to the
    attention probabilities, which with a non-zero value have to be stored for backward.

    Training memory, two options with the same outputs and gradients (dropout masks replayed):
    `head_recompute_feed_forward` makes each layer's feed-forward block recompute its `(batch, tokens,
    head_intermediate_size)` hidden tensor in backward (one more `linear1` matmul and dropout draw per layer;
    `LeanFeedForwardEncoderLayer`), about 40% less activation memory for TransVG's head. With
    `head_gradient_checkpointing` each layer keeps only its input and runs its whole forward again in backward
    (`torch.utils.checkpoint`, about one more head forward per step): one `(batch, tokens, dim)` tensor per layer plus
    the layer being recomputed.

    TransVG's head, by `config` fields: `head_input_norm=False` (no input LayerNorm), `head_grid_encoding="none"`
    (learned positions only), `head_positions="attention"` (positions added to the queries and keys of every layer,
    not once to the input) and `head_init="transvg"` ([REG] and positions N(0, 1), every matrix of the transformer
    layers xavier-uniform, so the layers also start different from each other).
    """

    def __init__(
        self,
        config: HeadSettings,
        num_vision_tokens: int,
        vision_grid: tuple[int, int] | None = None,
        vision_prefix_tokens: int = 0,
    ) -> None:
        super().__init__()
        dim, max_text_tokens = config.head_hidden_size, config.max_text_tokens
        self.gradient_checkpointing = config.head_gradient_checkpointing
        self.positions, init = config.head_positions, config.head_init
        if vision_grid is not None and vision_grid[0] * vision_grid[1] != num_vision_tokens - vision_prefix_tokens:
            vision_grid = None
        if vision_grid is None:
            vision_prefix_tokens = 0
        self.max_text_tokens = max_text_tokens
        self.num_vision_tokens = num_vision_tokens
        self.input_norm = nn.LayerNorm(dim) if config.head_input_norm else nn.Identity()
        encoding = None  # prefix tokens have no place in the image: no grid encoding
        if vision_grid is not None and config.head_grid_encoding == "sine":
            encoding = nn.functional.pad(sine_grid_encoding(vision_grid, dim), (0, 0, vision_prefix_tokens, 0))
        self.register_buffer("vision_grid_encoding", encoding, persistent=False)
        self.reg_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + max_text_tokens + num_vision_tokens, dim))
        if init == "transvg":  # nn.Embedding's init, as TransVG's reg_token and vl_pos_embed
            nn.init.normal_(self.reg_token)
            nn.init.normal_(self.position_embedding)
        else:
            nn.init.trunc_normal_(self.reg_token, std=0.02)
            nn.init.trunc_normal_(self.position_embedding, std=0.02)
        # a checkpointed layer recomputes everything anyway: recomputing its feed-forward block too would do it twice
        layer = LeanFeedForwardEncoderLayer(
            dim, config.head_num_attention_heads, config.head_intermediate_size, config.head_dropout, batch_first=True,
            recompute_hidden=config.head_recompute_feed_forward and not self.gradient_checkpointing)
        # `dropout` covers the residual and feed-forward paths; dropout on the attention probabilities is separate
        # because it forces the attention kernel to keep a (tokens x tokens) probability map per head for backward.
        layer.self_attn.dropout = config.head_attention_dropout
        self.encoder = nn.TransformerEncoder(layer, config.head_num_hidden_layers, enable_nested_tensor=False)
        if init == "transvg":  # TransVG's _reset_parameters, after the layers were cloned
            for param in self.encoder.parameters():
                if param.dim() > 1:
                    nn.init.xavier_uniform_(param)
        self.box_head = config.box_head
        if self.box_head == "pointer":
            self.pointer = PointerBox(dim, num_vision_tokens, vision_grid, vision_prefix_tokens)
        else:
            self.box_mlp = BoxMLP(dim)

    def forward(
        self,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        vision_tokens: torch.Tensor,
        vision_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict one box per sample.

        Args:
            text_tokens: `(batch, L, dim)` with `L <= max_text_tokens`.
            text_mask: `(batch, L)`, 1 = real token, 0 = padding.
            vision_tokens: `(batch, num_vision_tokens, dim)`.
            vision_mask: `(batch, num_vision_tokens)`, 1 = real image content, or `None` (all real).

        Returns:
            `(batch, 4)` boxes `cxcywh`, normalised to [0, 1].
        """
        batch, text_len, _ = text_tokens.shape
        if text_len > self.max_text_tokens:
            raise ValueError(f"The head was built for at most {self.max_text_tokens} text tokens, got {text_len}.")
        if vision_tokens.shape[1] != self.num_vision_tokens:
            raise ValueError(
                f"The head was built for {self.num_vision_tokens} vision tokens, got {vision_tokens.shape[1]}: "
                "feed images of the size the adapter was configured with (`M2ISTConfig.image_size`)."
            )
        if vision_mask is None:
            vision_mask = torch.ones(vision_tokens.shape[:2], dtype=torch.long, device=vision_tokens.device)
        reg = self.reg_token.expand(batch, -1, -1)
        tokens = torch.cat([reg, text_tokens, vision_tokens], dim=1)
        positions = self.position_table(text_len)
        keep = torch.cat([torch.ones_like(text_mask[:, :1]), text_mask, vision_mask.to(text_mask.dtype)], dim=1)
        if self.positions == "attention":
            hidden = self._encode_with_positions(self.input_norm(tokens), positions, ~keep.bool())
        else:
            hidden = self._encode(self.input_norm(tokens) + positions, ~keep.bool())
        if self.box_head == "pointer":
            return self.pointer(hidden[:, 0], hidden[:, 1 + text_len :], vision_mask)
        return self.box_mlp(hidden[:, 0]).sigmoid()

    def position_table(self, text_len: int) -> torch.Tensor:
        """The positions of the `1 + text_len + num_vision_tokens` slots the layers see, `(1, tokens, dim)`: the
        learned embedding of [REG] and the first `text_len` text slots, then of the vision slots (plus their fixed
        sine grid encoding when the head has one)."""
        vision_positions = self.position_embedding[:, 1 + self.max_text_tokens :]
        if self.vision_grid_encoding is not None:
            vision_positions = vision_positions + self.vision_grid_encoding
        return torch.cat([self.position_embedding[:, : 1 + text_len], vision_positions], dim=1)

    def _encode(self, hidden: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """Run the transformer layers on `(batch, tokens, dim)`; `padding` is `(batch, tokens)`, True = ignore."""
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return self.encoder(hidden, src_key_padding_mask=padding)
        for layer in self.encoder.layers:
            hidden = activation_checkpoint.checkpoint(layer, hidden, src_key_padding_mask=padding, use_reentrant=False)
        return hidden

    def _encode_with_positions(self, hidden: torch.Tensor, positions: torch.Tensor,
                               padding: torch.Tensor) -> torch.Tensor:
        """The layers with `positions` added to every layer's queries and keys (`positions="attention"`)."""
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.encoder.layers:
            if checkpointed:
                hidden = activation_checkpoint.checkpoint(layer.forward_with_positions, hidden, positions, padding,
                                                          use_reentrant=False)
            else:
                hidden = layer.forward_with_positions(hidden, positions, padding)
        return hidden
