"""Running the frozen towers: eval mode, no gradients, each tower's inputs and its final tokens.

`run_vision_tower` and `run_text_tower` call a tower the way its family expects (DETR's encoder without its decoder,
SigLIP2's NaFlex patches) and return its final tokens `(batch, tokens, dim)` with their grid and token mask.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from .layouts import tower_model_type
from .tokens import (
    TokenGrid,
    Tokens,
    find_patch_grid,
    find_token_grid,
    grid_last,
    grid_token_mask,
    output_tensor,
    to_tokens,
)


@contextmanager
def frozen(*towers: nn.Module) -> Iterator[None]:
    """Run `towers` in eval mode under `torch.no_grad()`, restoring each module's training flag afterwards."""
    modes = [(m, m.training) for tower in towers for m in tower.modules()]
    for tower in towers:
        tower.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


@lru_cache(maxsize=64)
def _forward_accepts(module_type: type, name: str) -> bool:
    try:
        return name in inspect.signature(module_type.forward).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class TowerOutput:
    """A tower's final tokens `(batch, tokens, dim)`, their grid if any, and a token mask `(batch, tokens)` if any.

    `patch_grid` is True when the grid is a patch tower's patch layout (`find_patch_grid`) rather than a feature map's.
    """

    tokens: Tokens
    mask: torch.Tensor | None = None
    patch_grid: bool = False


def is_detr_like(tower: nn.Module) -> bool:
    """A DETR-family model (DETR, Conditional DETR, Table Transformer): a CNN backbone, an input projection, a
    transformer encoder and a decoder of object queries, of which only the encoder's tokens tile the image."""
    return all(hasattr(tower, name) for name in ("backbone", "input_projection", "encoder", "decoder"))


def _run_detr_encoder(detr: nn.Module, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> TowerOutput:
    """A DETR-family model's backbone, input projection and transformer encoder; the decoder is never run.

    DETR and Conditional DETR build the position embeddings from the backbone's last map themselves
    (`position_embedding`); Table Transformer's backbone returns them with its maps (as `object_queries`)."""
    b, _, h, w = pixel_values.shape
    if pixel_mask is None:
        pixel_mask = torch.ones((b, h, w), device=pixel_values.device, dtype=torch.long)
    if hasattr(detr, "position_embedding"):
        feature_map, mask = detr.backbone(pixel_values, pixel_mask)[-1]
        projected = detr.input_projection(feature_map)
        position = detr.position_embedding(shape=feature_map.shape, device=pixel_values.device,
                                           dtype=pixel_values.dtype, mask=mask)
        position = position.flatten(2).transpose(1, 2)
        position_kwargs = {"spatial_position_embeddings": position}
    else:
        features, positions = detr.backbone(pixel_values, pixel_mask)
        feature_map, mask = features[-1]
        projected = detr.input_projection(feature_map)
        position_kwargs = {"object_queries": positions[-1].flatten(2).transpose(1, 2)}
    flat_mask = mask.flatten(1)
    encoded = detr.encoder(inputs_embeds=projected.flatten(2).transpose(1, 2), attention_mask=flat_mask,
                           **position_kwargs)
    grid = tuple(projected.shape[-2:])
    return TowerOutput(Tokens(output_tensor(encoded), grid), flat_mask.long())


def floating_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of `module`'s first floating-point parameter (`None` if it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


NAFLEX_MODEL_TYPES = frozenset({"siglip2_vision_model"})
"""Vision towers that take images cut into patches (`(batch, patches, channels * patch * patch)`) together with
`spatial_shapes` and `pixel_attention_mask`, as SigLIP2's NaFlex image processor returns them."""


def naflex_inputs(tower: nn.Module, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """A NaFlex tower's inputs for a batch of `(batch, channels, H, W)` images: the `(H // p) x (W // p)` patches
    in row-major order, each flattened (patch row, patch column, channel) as SigLIP2's image processor does, every
    patch attended to (the token mask keeps the head off padded ones, as for the other patch towers)."""
    if pixel_values.dim() != 4:
        raise ValueError(
            f"The {type(tower).__name__} tower takes images (batch, channels, height, width) here and cuts them into "
            f"patches itself; got pixel_values of shape {tuple(pixel_values.shape)} (already patchified by an image "
            "processor?). Pass the images resized to a multiple of the patch size instead."
        )
    patch = int(tower.config.patch_size)
    b, c, h, w = pixel_values.shape
    rows, cols = h // patch, w // patch
    if rows < 1 or cols < 1:
        raise ValueError(f"Images of {h} x {w} pixels are smaller than one {patch} x {patch} patch.")
    patches = pixel_values[:, :, : rows * patch, : cols * patch].reshape(b, c, rows, patch, cols, patch)
    patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(b, rows * cols, patch * patch * c)
    spatial_shapes = torch.tensor([[rows, cols]], device=pixel_values.device, dtype=torch.long).repeat(b, 1)
    attention = torch.ones(b, rows * cols, device=pixel_values.device, dtype=torch.long)
    return {"pixel_values": patches, "pixel_attention_mask": attention, "spatial_shapes": spatial_shapes}


def run_vision_tower(tower: nn.Module, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> TowerOutput:
    """Run the vision tower on `(batch, channels, H, W)` images; returns its final tokens `(batch, Nv, Dv)` and, for
    tokens on a grid, a token mask `(batch, Nv)` from the `(batch, H, W)` `pixel_mask`.

    Feature maps are flattened onto their grid; a patch tower's tokens get their patch grid (`find_patch_grid`). The
    tower itself sees every pixel (ViTs take no pixel mask), but the token mask keeps the head off padded patches.

    `pixel_values` are cast to the tower's dtype first, so a tower loaded in bf16 or fp16 (frozen weights in half
    the memory) takes the fp32 images an image processor returns.
    """
    dtype = floating_dtype(tower)
    if dtype is not None and pixel_values.is_floating_point():
        pixel_values = pixel_values.to(dtype)
    if is_detr_like(tower):
        return _run_detr_encoder(tower, pixel_values, pixel_mask)
    if tower_model_type(tower) in NAFLEX_MODEL_TYPES:
        kwargs = naflex_inputs(tower, pixel_values)
    else:
        kwargs = {"pixel_values": pixel_values}
    if pixel_mask is not None and _forward_accepts(type(tower), "pixel_mask"):
        kwargs["pixel_mask"] = pixel_mask
    kwargs.update(_patches_in_order(tower, pixel_values))
    tokens = to_tokens(output_tensor(tower(**kwargs)))
    found = None
    if tokens.grid is None:
        image_size = tuple(pixel_values.shape[-2:])
        trailing = trailing_tokens(tower)
        found = find_patch_grid(tower, image_size, tokens.num_tokens - trailing)
        if found is None:
            found = find_token_grid(image_size, tokens.num_tokens - trailing)
        if found is not None and trailing:
            grid, prefix = found
            found = TokenGrid(grid, trailing), prefix + trailing
            tokens = Tokens(grid_last(tokens.tensor, trailing), *found)
    if found is not None:
        tokens = Tokens(tokens.tensor, *found)
    mask = None
    if pixel_mask is not None and tokens.grid is not None:
        mask = grid_token_mask(pixel_mask, tokens.grid, tokens.prefix)
    return TowerOutput(tokens, mask, patch_grid=found is not None)


def trailing_tokens(tower: nn.Module) -> int:
    """How many tokens follow the patch grid in a vision tower's output, from its config: YOLOS's
    `num_detection_tokens` (every other extra token, [CLS], distillation, registers, comes before the grid)."""
    return int(getattr(getattr(tower, "config", None), "num_detection_tokens", 0) or 0)


def _patches_in_order(tower: nn.Module, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """For a tower that shuffles its patches by a `noise` input (ViTMAE, built with `mask_ratio=0`): increasing noise,
    so every patch is kept in its own place instead of a random order on every call."""
    patch = getattr(getattr(tower, "config", None), "patch_size", None)
    if not (_forward_accepts(type(tower), "noise") and isinstance(patch, int) and patch > 0):
        return {}
    num_patches = (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch)
    noise = torch.arange(num_patches, device=pixel_values.device, dtype=torch.float32)
    return {"noise": noise.expand(pixel_values.shape[0], num_patches)}


def run_text_tower(tower: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TowerOutput:
    """Run the text tower on `(batch, L)` token ids; returns its final tokens `(batch, L, Dt)` and the attention mask
    as token mask."""
    out = tower(input_ids=input_ids, attention_mask=attention_mask)
    return TowerOutput(to_tokens(output_tensor(out)), attention_mask.long())


def default_image_size(tower: nn.Module) -> int:
    """The square image size a vision tower was configured for (its config's `image_size`), else 640."""
    config = getattr(tower, "config", None)
    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if not size:
        # NaFlex towers (SigLIP2) have no image size, but a square grid of `num_patches` position embeddings
        num_patches, patch = getattr(config, "num_patches", None), getattr(config, "patch_size", None)
        if isinstance(num_patches, int) and isinstance(patch, int) and num_patches > 0 and patch > 0:
            size = int(num_patches**0.5) * patch
    return int(size) if size else 640


def num_channels(tower: nn.Module) -> int:
    """The number of image channels a vision tower takes (its config's `num_channels`, else 3)."""
    return int(getattr(getattr(tower, "config", None), "num_channels", 3) or 3)
