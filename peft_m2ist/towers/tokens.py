"""Token utilities: module outputs as token sequences `(batch, tokens, dim)`, their grids and their masks.

A tower's output, or a tapped module's, is either a token sequence `(batch, tokens, dim)` or a CNN feature map
`(batch, channels, h, w)`. Both become `Tokens`: the sequence, and the `(height, width)` grid its last tokens tile
when they do (a feature map's cells, or a patch tower's patch grid after a few prefix tokens such as [CLS]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def output_tensor(output: object) -> torch.Tensor:
    """The main tensor of a module output (a tensor, a tuple whose first item is one, or a `ModelOutput`)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise TypeError(f"Cannot take a tensor from a module output of type {type(output).__name__}.")


@dataclass
class Tokens:
    """A token sequence `(batch, tokens, dim)` and, when its tokens tile the image, their grid `(height, width)`.

    The grid covers the last `height * width` tokens in row-major order; the first `prefix` tokens lie outside it
    (a ViT's [CLS], distillation or register tokens). Feature maps have a grid and no prefix.
    """

    tensor: torch.Tensor
    grid: tuple[int, int] | None = None
    prefix: int = 0

    @property
    def num_tokens(self) -> int:
        return self.tensor.shape[1]

    @property
    def dim(self) -> int:
        return self.tensor.shape[2]


def to_tokens(x: torch.Tensor) -> Tokens:
    """Turn `(batch, tokens, dim)` or a CNN map `(batch, channels, h, w)` into `Tokens` (maps are flattened)."""
    if x.dim() == 4:
        h, w = x.shape[-2:]
        return Tokens(x.flatten(2).transpose(1, 2), (h, w))
    if x.dim() == 3:
        return Tokens(x)
    raise ValueError(f"A tapped output must be (batch, tokens, dim) or (batch, channels, h, w); got {tuple(x.shape)}.")


def match_grid(tokens: Tokens, num_tokens: int, grid: tuple[int, int] | None) -> torch.Tensor:
    """Resample `tokens` to `(batch, num_tokens, dim)` (average pooling over the grid when both sides are maps)."""
    if tokens.num_tokens == num_tokens:
        return tokens.tensor
    if tokens.grid is None or grid is None:
        raise ValueError(
            f"A tap yields {tokens.num_tokens} tokens but the tower's output has {num_tokens}; only feature maps "
            "with a spatial grid can be resampled. Tap modules whose outputs have the final token count."
        )
    if grid[0] * grid[1] != num_tokens:
        raise ValueError(
            f"A feature-map tap cannot be pooled onto a tower output of {num_tokens} tokens whose grid {grid} "
            "leaves tokens outside it ([CLS] and the like). Tap modules whose outputs have the final token count."
        )
    b, _, d = tokens.tensor.shape
    h, w = tokens.grid
    grid_map = tokens.tensor.transpose(1, 2).reshape(b, d, h, w)
    pooled = nn.functional.adaptive_avg_pool2d(grid_map, grid)
    return pooled.flatten(2).transpose(1, 2)


MAX_PREFIX_TOKENS = 16
"""The most leading non-patch tokens ([CLS], distillation, registers) a patch tower's output may have."""


def find_patch_grid(
    tower: nn.Module, image_size: tuple[int, int], num_tokens: int
) -> tuple[tuple[int, int], int] | None:
    """The patch grid `(height, width)` and prefix length of a patch tower's `(batch, tokens, dim)` output, if any.

    A tower whose config has a `patch_size` (ViT, CLIP, SigLIP, DINOv2, ...) cuts an `H x W` image into
    `(H // patch) x (W // patch)` patches; its output is those patch tokens, row-major, after up to
    `MAX_PREFIX_TOKENS` others ([CLS], registers). Returns `None` when the token count does not fit that layout (a
    tower that pools or merges patches, or one without a `patch_size`).
    """
    patch = getattr(getattr(tower, "config", None), "patch_size", None)
    if isinstance(patch, (list, tuple)):
        patch = tuple(int(p) for p in patch[:2]) if len(patch) >= 2 else (int(patch[0]),) * 2
    elif isinstance(patch, int) and patch > 0:
        patch = (patch, patch)
    else:
        return None
    grid = (image_size[0] // patch[0], image_size[1] // patch[1])
    prefix = num_tokens - grid[0] * grid[1]
    if min(grid) < 1 or not 0 <= prefix <= MAX_PREFIX_TOKENS:
        return None
    return grid, prefix


def grid_token_mask(pixel_mask: torch.Tensor, grid: tuple[int, int], prefix: int = 0) -> torch.Tensor:
    """`(batch, H, W)` pixel mask -> `(batch, prefix + h * w)` token mask (nearest cell sample; prefix tokens are 1)."""
    mask = nn.functional.interpolate(pixel_mask[:, None].float(), size=grid, mode="nearest").flatten(1).long()
    if prefix:
        mask = torch.cat([mask.new_ones(mask.shape[0], prefix), mask], dim=1)
    return mask
