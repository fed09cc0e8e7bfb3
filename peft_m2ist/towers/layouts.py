"""The registry of tower families and their tap points, and resolving what to tap in a given tower.

Per `model_type` (like peft's target-module mappings), `TOWER_LAYOUTS` says where a tower's blocks are and which child
of a block feeds which expert; `get_tower` finds a tower in its container, and `resolve_taps` turns the config's tap
fields (`None`: auto, a list of module names or a regex) into module names relative to the tower.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .discovery import BlockLayout, discover_layout
from .refusals import check_tower_is_usable


@dataclass(frozen=True)
class TowerLayout:
    """Where the blocks of one tower architecture are.

    Attributes:
        blocks: candidate dotted paths of the `nn.ModuleList` holding the tower's blocks (first existing one wins;
            several because module names moved between transformers releases).
        ffn: child of a block whose output feeds the modality expert (`""`: the block itself): the FFN's output before
            the residual and any norm.
        attention: child of a block whose output feeds the interactive expert (`""`: the block itself).
        embeddings: dotted path of the module whose output is the tower's input embedding, added to the side stream,
            or candidate paths of it (first existing one wins, as for `blocks`); `None`: none.
        ffn_norm: child of a block: the frozen LayerNorm that ends its FFN (post-norm towers), which
            `language_expert_output_norm="tower"` applies to the language expert's output; `None`: none.
        attention_norm: child of a block: the frozen LayerNorm that ends its attention sub-block, which
            `interaction_text_output_norm="tower"` applies to the interactive expert's text output; `None`: none.
    """

    blocks: tuple[str, ...]
    ffn: str
    attention: str
    embeddings: str | tuple[str, ...] | None
    ffn_norm: str | None = None
    attention_norm: str | None = None

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
# post-norm BERT-family blocks end their FFN and their attention in a LayerNorm (residual included)
_BERT_NORMS = ("output.LayerNorm", "attention.output.LayerNorm")


TOWER_LAYOUTS: dict[str, TowerLayout] = {
    "vit": TowerLayout(("layers", "encoder.layer"), "mlp", "attention", "embeddings"),
    "dinov2": TowerLayout(("encoder.layer", "layers"), "mlp", "attention", "embeddings"),
    "clip_vision_model": TowerLayout(("encoder.layers", "vision_model.encoder.layers"), "mlp", "self_attn",
                                     "pre_layrnorm"),
    "clip_text_model": TowerLayout(("encoder.layers", "text_model.encoder.layers"), "mlp", "self_attn", "embeddings"),
    # BERT-family blocks: the FFN tap is `output.dense`, the FFN's output before the dropout, the residual and the
    # LayerNorm of `output` (as every other family's `mlp` tap, and as the authors' language expert reads it)
    "bert": TowerLayout(("encoder.layer",), "output.dense", "attention", "embeddings", *_BERT_NORMS),
    "roberta": TowerLayout(("encoder.layer",), "output.dense", "attention", "embeddings", *_BERT_NORMS),
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
    "chinese_clip_text_model": TowerLayout(("encoder.layer",), "output.dense", "attention", "embeddings",
                                           *_BERT_NORMS),
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


def find_layout(tower: nn.Module, discover: bool = True) -> BlockLayout | None:
    """The blocks of `tower` and what to tap in them: the registered layout of its `model_type` (which wins), else,
    with `discover`, the one `discover_layout` finds from its modules; `None` where neither applies."""
    model_type = tower_model_type(tower)
    layout = TOWER_LAYOUTS.get(model_type)
    if layout is not None:
        path = _blocks_path(tower, layout)
        blocks = () if path is None else tuple(f"{path}.{i}" for i in range(len(tower.get_submodule(path))))
        return BlockLayout(blocks, layout.ffn, layout.attention, layout.embedding_candidates,
                           f"registered layout of model_type {model_type!r}: {len(blocks)} blocks at '{path}'")
    return discover_layout(tower) if discover else None


def count_blocks(tower: nn.Module, discover: bool = False) -> int | None:
    """Number of blocks of a tower whose `model_type` has a registered layout (with `discover`, also of one whose
    blocks `discover_layout` finds), else `None`."""
    layout = find_layout(tower, discover)
    return len(layout.blocks) if layout is not None and layout.blocks else None


def first_blocks(num_blocks: int, count: int) -> list[int]:
    """The first `count` block indices (`M2ISTConfig.tap_layer_spacing="first"`, the authors' layers 0-5)."""
    return list(range(min(count, num_blocks)))


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
    source: str = ""


def resolve_taps(
    tower: nn.Module,
    ffn_spec: list[str] | str | None,
    attention_spec: list[str] | str | None,
    num_layers: int,
    prefix: str,
    spacing: str = "even",
) -> ResolvedTaps:
    """Resolve the tap names of one tower from the config fields `{prefix}_layers` / `{prefix}_attention_layers`;
    auto-resolved blocks are `"even"`ly spaced or the `"first"` ones (`M2ISTConfig.tap_layer_spacing`)."""
    layout = find_layout(tower)
    needs_auto = ffn_spec is None or attention_spec is None
    if needs_auto and (layout is None or not layout.blocks):
        model_type = tower_model_type(tower)
        known = ", ".join(sorted(TOWER_LAYOUTS))
        raise ValueError(
            f"Cannot auto-resolve the taps of the {prefix} tower ({type(tower).__name__}, model_type={model_type!r}; "
            f"registered: {known}): it has no `nn.ModuleList` of blocks to discover. Set "
            f"`M2ISTConfig.{prefix}_layers` and `M2ISTConfig.{prefix}_attention_layers` to module names or regexes."
        )
    check_tower_is_usable(tower, prefix)
    embeddings = next((c for c in (layout.embeddings if layout is not None else ()) if _has_module(tower, c)), None)

    if ffn_spec is None:
        indices = (first_blocks if spacing == "first" else evenly_spaced)(len(layout.blocks), num_layers)
        ffn = [_join(layout.blocks[i], layout.ffn) for i in indices]
    else:
        ffn = _match_spec(tower, ffn_spec, f"{prefix}_layers")
    if attention_spec is None:
        if ffn_spec is None:
            attention = [_join(layout.blocks[i], layout.attention) for i in indices]
        else:
            attention = []
            for name in ffn:
                block = _enclosing_block(name, layout.blocks)
                attention.append(_join(block, layout.attention) if block is not None else name)
    else:
        attention = _match_spec(tower, attention_spec, f"{prefix}_attention_layers")
    if len(attention) != len(ffn):
        raise ValueError(
            f"The {prefix} tower has {len(ffn)} `{prefix}_layers` taps but {len(attention)} "
            f"`{prefix}_attention_layers` taps; they pair up one to one."
        )
    _check_not_nested(ffn + attention, prefix)
    source = layout.source if layout is not None else "no registered or discovered layout"
    if ffn_spec is not None or attention_spec is not None:
        source = f"explicit tap fields ({source})"
    return ResolvedTaps(ffn=ffn, attention=attention, embeddings=embeddings, source=source)


def _has_module(tower: nn.Module, path: str) -> bool:
    try:
        tower.get_submodule(path)
    except AttributeError:
        return False
    return True


def _enclosing_block(name: str, blocks: tuple[str, ...]) -> str | None:
    """The block (one of `blocks`) that `name` lies in, if any."""
    return next((block for block in blocks if name.startswith(block + ".")), None)


def _check_not_nested(names: list[str], prefix: str) -> None:
    unique = sorted(set(names))
    for outer in unique:
        for inner in unique:
            if inner.startswith(outer + "."):
                raise ValueError(
                    f"{prefix} taps must not be nested: '{inner}' lies inside '{outer}'. Tap sibling modules "
                    "(for instance a block's attention and its FFN), not a block and one of its children."
                )


def block_norms(tower: nn.Module, tap_names: list[str], kind: str, field_name: str) -> list[nn.LayerNorm]:
    """The frozen LayerNorm ending the FFN (`kind="ffn"`) or attention (`kind="attention"`) of the block of each
    tap in `tap_names` (relative to `tower`), from the layout of the tower's `model_type`; a `ValueError` naming
    `field_name` where the tower has none."""
    model_type = tower_model_type(tower)
    layout = TOWER_LAYOUTS.get(model_type)
    path = getattr(layout, f"{kind}_norm") if layout is not None else None
    found = find_layout(tower, discover=False)
    blocks = found.blocks if found is not None and found.blocks else None
    with_norms = sorted(t for t, lay in TOWER_LAYOUTS.items() if getattr(lay, f"{kind}_norm"))
    if path is None or blocks is None:
        raise ValueError(
            f"`{field_name}='tower'` applies the frozen LayerNorm that ends each tapped text block's {kind} (a "
            f"post-norm tower: model_type {', '.join(with_norms)}); the text tower ({type(tower).__name__}, "
            f"model_type={model_type!r}) has none. Set `{field_name}='none'` (or drop preset='paper')."
        )
    norms = []
    for name in tap_names:
        block = _enclosing_block(name, blocks)
        try:
            norm = tower.get_submodule(_join(block, path)) if block is not None else None
        except AttributeError:
            norm = None
        if not isinstance(norm, nn.LayerNorm):
            raise ValueError(
                f"`{field_name}='tower'`: the tap '{name}' lies in no block of the text tower with a LayerNorm at "
                f"'{path}'; tap the blocks under '{blocks[0].rsplit('.', 1)[0]}'."
            )
        norms.append(norm)
    return norms
