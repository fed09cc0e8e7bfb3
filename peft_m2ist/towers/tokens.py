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
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], (tuple, list)):
        return output_tensor(output[0])  # PVTv2's stages return ((hidden_states, ...), height, width)
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


class TokenGrid(tuple):
    """A grid `(height, width)` of a tower's final tokens that also counts the tokens following it in the tower's own
    output (`trailing`: YOLOS's detection tokens, after its patches).

    The library reads such a tower's tokens, and every tap shaped like them, with the trailing tokens moved before
    the grid (`grid_last`), so the grid is always the last `height * width` tokens and every non-grid token a prefix
    token: the grid encoding, the pointer cells and the pixel-mask-derived token mask read the right tokens.
    """

    trailing: int

    def __new__(cls, grid: tuple[int, int], trailing: int = 0) -> TokenGrid:
        made = super().__new__(cls, (int(grid[0]), int(grid[1])))
        made.trailing = int(trailing)
        return made

    def __reduce__(self):  # copies and pickles keep `trailing`
        return (TokenGrid, (tuple(self), self.trailing))


def grid_last(tensor: torch.Tensor, trailing: int) -> torch.Tensor:
    """`(batch, prefix + grid + trailing, dim)` -> `(batch, trailing + prefix + grid, dim)`: the `trailing` last
    tokens moved to the front, so the grid's tokens come last."""
    if not trailing:
        return tensor
    return torch.cat([tensor[:, -trailing:], tensor[:, :-trailing]], dim=1)


def _finer_grid(num_tokens: int, grid: tuple[int, int]) -> tuple[tuple[int, int], int] | None:
    """The grid `(height * k, width * k)` (integer `k >= 2`, or the grid itself without prefix tokens) that
    `num_tokens` tokens tile after the fewest prefix tokens (at most `MAX_PREFIX_TOKENS`): an earlier stage of a hierarchical tower (Swin, PVT, Hiera, FocalNet),
    whose token sequences carry no grid of their own."""
    if num_tokens == grid[0] * grid[1]:  # the final grid itself, without the final tokens' prefix (PVT's [CLS])
        return tuple(grid), 0
    k = 2
    while (grid[0] * k) * (grid[1] * k) <= num_tokens:
        prefix = num_tokens - (grid[0] * k) * (grid[1] * k)
        if prefix <= MAX_PREFIX_TOKENS:
            return (grid[0] * k, grid[1] * k), prefix
        k += 1
    return None


def match_grid(tokens: Tokens, num_tokens: int, grid: tuple[int, int] | None) -> torch.Tensor:
    """Bring a tap's `tokens` to the tower's final `(batch, num_tokens, dim)` layout.

    A tap with the final token count is returned as it is (reordered by `grid_last` when the final `grid` is a
    `TokenGrid` with trailing tokens). A tap on a finer grid (a CNN feature map, or an earlier stage of a
    hierarchical tower, whose grid is `(height * k, width * k)` after a few prefix tokens) is average-pooled onto the
    final grid; where the final tokens have prefix tokens ([CLS]), the tap's own prefix tokens fill them when it has
    as many, else its grid's mean over all cells.
    """
    if tokens.num_tokens == num_tokens:
        return grid_last(tokens.tensor, getattr(grid, "trailing", 0))
    final_prefix = num_tokens - grid[0] * grid[1] if grid is not None else 0
    tap_grid, tap_prefix = tokens.grid, 0
    if tap_grid is None and grid is not None and not getattr(grid, "trailing", 0):
        tap_grid, tap_prefix = _finer_grid(tokens.num_tokens, grid) or (None, 0)
    if tap_grid is None or grid is None:
        raise ValueError(
            f"A tap yields {tokens.num_tokens} tokens but the tower's output has {num_tokens}; only feature maps "
            "with a spatial grid can be resampled. Tap modules whose outputs have the final token count."
        )
    if final_prefix < 0 or (final_prefix and tokens.grid is not None):
        raise ValueError(
            f"A feature-map tap cannot be pooled onto a tower output of {num_tokens} tokens whose grid {grid} "
            "leaves tokens outside it ([CLS] and the like). Tap modules whose outputs have the final token count."
        )
    b, _, d = tokens.tensor.shape
    h, w = tap_grid
    grid_map = tokens.tensor[:, tap_prefix:].transpose(1, 2).reshape(b, d, h, w)
    pooled = nn.functional.adaptive_avg_pool2d(grid_map, grid).flatten(2).transpose(1, 2)
    if not final_prefix:
        return pooled
    if tap_prefix == final_prefix:
        extra = tokens.tensor[:, :tap_prefix]
    else:
        extra = pooled.mean(dim=1, keepdim=True).expand(b, final_prefix, d)
    return torch.cat([extra, pooled], dim=1)


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


def find_token_grid(image_size: tuple[int, int], num_tokens: int) -> tuple[tuple[int, int], int] | None:
    """The grid `(ceil(H / s), ceil(W / s))` (stride `s` a power of two, 2 to 64) that the last tokens of a
    `(batch, tokens, dim)` output tile after the fewest prefix tokens (at most `MAX_PREFIX_TOKENS`), for towers
    whose stages merge patches (Swin, PVT, Hiera, FocalNet: no `patch_size` grid fits their final tokens)."""
    best = None
    for stride in (2, 4, 8, 16, 32, 64):
        grid = (-(-image_size[0] // stride), -(-image_size[1] // stride))
        prefix = num_tokens - grid[0] * grid[1]
        if 0 <= prefix <= MAX_PREFIX_TOKENS and (best is None or prefix < best[1]):
            best = (grid, prefix)
    return best
