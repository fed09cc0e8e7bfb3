"""Finding the towers in a container, resolving what to tap in them, and running them frozen.

Everything here is about the *frozen* side of the model: where the vision and text towers live, which of their
modules feed the side network (per `model_type`, like peft's target-module mappings), how a tap's output becomes a
token sequence `(batch, tokens, dim)`, and how each tower is run under `torch.no_grad()` in eval mode.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn


@dataclass(frozen=True)
class TowerLayout:
    """Where the blocks of one tower architecture are.

    Attributes:
        blocks: candidate dotted paths of the `nn.ModuleList` holding the tower's blocks (first existing one wins;
            several because module names moved between transformers releases).
        ffn: child of a block whose output feeds the modality expert (`""`: the block itself).
        attention: child of a block whose output feeds the interactive expert (`""`: the block itself).
        embeddings: dotted path of the module whose output is the tower's input embedding, added to the side stream,
            or candidate paths of it (first existing one wins, as for `blocks`); `None`: none.
    """

    blocks: tuple[str, ...]
    ffn: str
    attention: str
    embeddings: str | tuple[str, ...] | None

    @property
    def embedding_candidates(self) -> tuple[str, ...]:
        if self.embeddings is None:
            return ()
        return (self.embeddings,) if isinstance(self.embeddings, str) else self.embeddings


# Sub-models of the dual-encoder families (SigLIP, Chinese-CLIP, CLIPSeg, OWL-ViT, ...) come in two shapes: the
# stand-alone `*VisionModel` / `*TextModel`, and the tower a container (`SiglipModel`, `OwlViTModel`) holds as
# `vision_model` / `text_model`. Depending on the family and the transformers release, one of them wraps the
# transformer in a `vision_model` / `text_model` attribute, hence both paths for the blocks and the embeddings.
_VISION_BLOCKS = ("encoder.layers", "vision_model.encoder.layers")
_TEXT_BLOCKS = ("encoder.layers", "text_model.encoder.layers")
_VISION_EMBEDDINGS = ("embeddings", "vision_model.embeddings")
_TEXT_EMBEDDINGS = ("embeddings", "text_model.embeddings")
# the norm between the patch embeddings ([CLS] + patches + positions) and the encoder: CLIP and CLIPSeg spell it
# `pre_layrnorm` (and so does Chinese-CLIP), OWL-ViT and OWLv2 `pre_layernorm`
_CLIP_PRE_NORM = ("pre_layrnorm", "vision_model.pre_layrnorm")
_OWL_PRE_NORM = ("pre_layernorm", "vision_model.pre_layernorm")


TOWER_LAYOUTS: dict[str, TowerLayout] = {
    "vit": TowerLayout(("layers", "encoder.layer"), "mlp", "attention", "embeddings"),
    "dinov2": TowerLayout(("encoder.layer", "layers"), "mlp", "attention", "embeddings"),
    "clip_vision_model": TowerLayout(("encoder.layers", "vision_model.encoder.layers"), "mlp", "self_attn",
                                     "pre_layrnorm"),
    "clip_text_model": TowerLayout(("encoder.layers", "text_model.encoder.layers"), "mlp", "self_attn", "embeddings"),
    "bert": TowerLayout(("encoder.layer",), "output", "attention", "embeddings"),
    "roberta": TowerLayout(("encoder.layer",), "output", "attention", "embeddings"),
    "mobilenet_v2": TowerLayout(("layer",), "", "", None),
    "resnet": TowerLayout(("encoder.stages",), "", "", None),
    "detr": TowerLayout(("encoder.layers",), "mlp", "self_attn", "input_projection"),
    # SigLIP / SigLIP2: no [CLS] token and no norm before the encoder: the embedding tap is the embeddings module
    "siglip_vision_model": TowerLayout(_VISION_BLOCKS, "mlp", "self_attn", _VISION_EMBEDDINGS),
    "siglip_text_model": TowerLayout(_TEXT_BLOCKS, "mlp", "self_attn", _TEXT_EMBEDDINGS),
    "siglip2_vision_model": TowerLayout(_VISION_BLOCKS, "mlp", "self_attn", _VISION_EMBEDDINGS),
    "siglip2_text_model": TowerLayout(_TEXT_BLOCKS, "mlp", "self_attn", _TEXT_EMBEDDINGS),
    # Chinese-CLIP: a CLIP vision tower and a BERT text tower
    "chinese_clip_vision_model": TowerLayout(_VISION_BLOCKS, "mlp", "self_attn", _CLIP_PRE_NORM),
    "chinese_clip_text_model": TowerLayout(("encoder.layer",), "output", "attention", "embeddings"),
    "clipseg_vision_model": TowerLayout(_VISION_BLOCKS, "mlp", "self_attn", _CLIP_PRE_NORM),
    "clipseg_text_model": TowerLayout(_TEXT_BLOCKS, "mlp", "self_attn", _TEXT_EMBEDDINGS),
    "owlvit_vision_model": TowerLayout(_VISION_BLOCKS, "mlp", "self_attn", _OWL_PRE_NORM),
    "owlvit_text_model": TowerLayout(_TEXT_BLOCKS, "mlp", "self_attn", _TEXT_EMBEDDINGS),
    "owlv2_vision_model": TowerLayout(_VISION_BLOCKS, "mlp", "self_attn", _OWL_PRE_NORM),
    "owlv2_text_model": TowerLayout(_TEXT_BLOCKS, "mlp", "self_attn", _TEXT_EMBEDDINGS),
}


def get_tower(container: nn.Module, path: str, field_name: str) -> nn.Module:
    """Return the tower at dotted `path` in `container`, with an error naming the config field to fix."""
    try:
        tower = container.get_submodule(path)
    except AttributeError:
        children = [name for name, _ in container.named_children()]
        raise ValueError(
            f"No module '{path}' in {type(container).__name__} (children: {children}). Set `M2ISTConfig.{field_name}` "
            "to the dotted path of the tower, or wrap your towers in `peft_m2ist.VisionTextPair`."
        ) from None
    return tower


def tower_model_type(tower: nn.Module) -> str | None:
    config = getattr(tower, "config", None)
    return getattr(config, "model_type", None)


def _blocks_path(tower: nn.Module, layout: TowerLayout) -> str | None:
    for path in layout.blocks:
        try:
            module = tower.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList):
            return path
    return None


def count_blocks(tower: nn.Module) -> int | None:
    """Number of blocks of a tower whose `model_type` has a known layout, else `None`."""
    layout = TOWER_LAYOUTS.get(tower_model_type(tower))
    path = _blocks_path(tower, layout) if layout is not None else None
    return len(tower.get_submodule(path)) if path is not None else None


def evenly_spaced(num_blocks: int, count: int) -> list[int]:
    """`count` block indices spread over `num_blocks`, always including the last block."""
    count = min(count, num_blocks)
    if count == num_blocks:
        return list(range(num_blocks))
    return sorted({round((i + 1) * num_blocks / count) - 1 for i in range(count)})


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _match_spec(tower: nn.Module, spec: list[str] | str, field_name: str) -> list[str]:
    """Module names (relative to `tower`) named by a list or matched by a regex, in module order."""
    names = [name for name, _ in tower.named_modules() if name]
    if isinstance(spec, str):
        pattern = re.compile(spec)
        matched = [name for name in names if pattern.fullmatch(name)]
        if not matched:
            raise ValueError(f"`{field_name}` pattern {spec!r} matches no module of the tower.")
        return matched
    unknown = [name for name in spec if name not in set(names)]
    if unknown:
        close = [n for n in names if any(n.endswith(u.split(".")[-1]) for u in unknown)][:8]
        raise ValueError(f"`{field_name}` names unknown modules {unknown}; modules with similar names: {close}.")
    return list(spec)


@dataclass
class ResolvedTaps:
    """Module names (relative to one tower) that feed the side network, one entry per tapped layer."""

    ffn: list[str]
    attention: list[str]
    embeddings: str | None


def resolve_taps(
    tower: nn.Module,
    ffn_spec: list[str] | str | None,
    attention_spec: list[str] | str | None,
    num_layers: int,
    prefix: str,
) -> ResolvedTaps:
    """Resolve the tap names of one tower from the config fields `{prefix}_layers` / `{prefix}_attention_layers`."""
    model_type = tower_model_type(tower)
    layout = TOWER_LAYOUTS.get(model_type)
    blocks = _blocks_path(tower, layout) if layout is not None else None
    needs_auto = ffn_spec is None or attention_spec is None
    if needs_auto and blocks is None:
        known = ", ".join(sorted(TOWER_LAYOUTS))
        raise ValueError(
            f"Cannot auto-resolve the taps of the {prefix} tower ({type(tower).__name__}, model_type={model_type!r}; "
            f"known: {known}). Set `M2ISTConfig.{prefix}_layers` and `M2ISTConfig.{prefix}_attention_layers` to module "
            "names or regexes."
        )
    embeddings = None
    for candidate in layout.embedding_candidates if layout is not None else ():
        try:
            tower.get_submodule(candidate)
        except AttributeError:
            continue
        embeddings = candidate
        break

    if ffn_spec is None:
        num_blocks = len(tower.get_submodule(blocks))
        indices = evenly_spaced(num_blocks, num_layers)
        ffn = [_join(blocks, str(i), layout.ffn) for i in indices]
    else:
        ffn = _match_spec(tower, ffn_spec, f"{prefix}_layers")
    if attention_spec is None:
        if ffn_spec is None:
            attention = [_join(blocks, str(i), layout.attention) for i in indices]
        else:
            attention = []
            for name in ffn:
                block = _enclosing_block(name, blocks)
                attention.append(_join(block, layout.attention) if block is not None else name)
    else:
        attention = _match_spec(tower, attention_spec, f"{prefix}_attention_layers")
    if len(attention) != len(ffn):
        raise ValueError(
            f"The {prefix} tower has {len(ffn)} `{prefix}_layers` taps but {len(attention)} "
            f"`{prefix}_attention_layers` taps; they pair up one to one."
        )
    _check_not_nested(ffn + attention, prefix)
    return ResolvedTaps(ffn=ffn, attention=attention, embeddings=embeddings)


def _enclosing_block(name: str, blocks: str | None) -> str | None:
    if blocks is None or not name.startswith(blocks + "."):
        return None
    index = name[len(blocks) + 1 :].split(".")[0]
    return _join(blocks, index) if index.isdigit() else None


def _check_not_nested(names: list[str], prefix: str) -> None:
    unique = sorted(set(names))
    for outer in unique:
        for inner in unique:
            if inner.startswith(outer + "."):
                raise ValueError(
                    f"{prefix} taps must not be nested: '{inner}' lies inside '{outer}'. Tap sibling modules "
                    "(for instance a block's attention and its FFN), not a block and one of its children."
                )


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
    """Resample `tokens` to `num_tokens` tokens (average pooling over the grid when both sides are maps)."""
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

    `patches` is True when the grid is a patch tower's patch layout (`patch_grid`) rather than a feature map's.
    """

    tokens: Tokens
    mask: torch.Tensor | None = None
    patches: bool = False


def _run_detr_encoder(detr: nn.Module, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> TowerOutput:
    """DETR's backbone, input projection and transformer encoder; the decoder is never run."""
    b, _, h, w = pixel_values.shape
    if pixel_mask is None:
        pixel_mask = torch.ones((b, h, w), device=pixel_values.device, dtype=torch.long)
    feature_map, mask = detr.backbone(pixel_values, pixel_mask)[-1]
    projected = detr.input_projection(feature_map)
    position = detr.position_embedding(shape=feature_map.shape, device=pixel_values.device,
                                       dtype=pixel_values.dtype, mask=mask)
    position = position.flatten(2).transpose(1, 2)
    flat_mask = mask.flatten(1)
    encoded = detr.encoder(inputs_embeds=projected.flatten(2).transpose(1, 2), attention_mask=flat_mask,
                           spatial_position_embeddings=position)
    grid = tuple(projected.shape[-2:])
    return TowerOutput(Tokens(encoded.last_hidden_state, grid), flat_mask.long())


def floating_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of `module`'s first floating-point parameter (`None` if it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


MAX_PREFIX_TOKENS = 16
"""The most leading non-patch tokens ([CLS], distillation, registers) a patch tower's output may have."""


def patch_grid(tower: nn.Module, image_size: tuple[int, int], num_tokens: int) -> tuple[tuple[int, int], int] | None:
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


def grid_token_mask(pixel_mask: torch.Tensor, grid: tuple[int, int], prefix: int = 0) -> torch.Tensor:
    """`(batch, H, W)` pixel mask -> `(batch, prefix + h * w)` token mask (nearest cell sample; prefix tokens are 1)."""
    mask = nn.functional.interpolate(pixel_mask[:, None].float(), size=grid, mode="nearest").flatten(1).long()
    if prefix:
        mask = torch.cat([mask.new_ones(mask.shape[0], prefix), mask], dim=1)
    return mask


def run_vision_tower(tower: nn.Module, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> TowerOutput:
    """Run the vision tower; returns its final tokens and, for tokens on a grid, a token mask from `pixel_mask`.

    Feature maps are flattened onto their grid; a patch tower's tokens get their patch grid (`patch_grid`). The
    tower itself sees every pixel (ViTs take no pixel mask), but the token mask keeps the head off padded patches.

    `pixel_values` are cast to the tower's dtype first, so a tower loaded in bf16 or fp16 (frozen weights in half
    the memory) takes the fp32 images an image processor returns.
    """
    dtype = floating_dtype(tower)
    if dtype is not None and pixel_values.is_floating_point():
        pixel_values = pixel_values.to(dtype)
    if tower_model_type(tower) == "detr":
        return _run_detr_encoder(tower, pixel_values, pixel_mask)
    if tower_model_type(tower) in NAFLEX_MODEL_TYPES:
        kwargs = naflex_inputs(tower, pixel_values)
    else:
        kwargs = {"pixel_values": pixel_values}
    if pixel_mask is not None and _forward_accepts(type(tower), "pixel_mask"):
        kwargs["pixel_mask"] = pixel_mask
    tokens = to_tokens(output_tensor(tower(**kwargs)))
    found = None if tokens.grid is not None else patch_grid(tower, tuple(pixel_values.shape[-2:]), tokens.num_tokens)
    if found is not None:
        tokens = Tokens(tokens.tensor, *found)
    mask = None
    if pixel_mask is not None and tokens.grid is not None:
        mask = grid_token_mask(pixel_mask, tokens.grid, tokens.prefix)
    return TowerOutput(tokens, mask, patches=found is not None)


def run_text_tower(tower: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TowerOutput:
    """Run the text tower; returns its final tokens and the attention mask as token mask."""
    out = tower(input_ids=input_ids, attention_mask=attention_mask)
    return TowerOutput(to_tokens(output_tensor(out)), attention_mask.long())


def default_image_size(tower: nn.Module) -> int:
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
    return int(getattr(getattr(tower, "config", None), "num_channels", 3) or 3)

