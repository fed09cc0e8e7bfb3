"""Planning an adapter on a concrete pair: resolve the taps and measure every shape with one dummy forward pass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import torch
from torch import nn

from ..modeling.experts import interaction_dim
from ..modeling.stream_shapes import AdapterPlan, StreamShapes, TapNames
from ..towers.forward import (
    TowerOutput,
    default_image_size,
    frozen,
    num_channels,
    run_text_tower,
    run_vision_tower,
)
from ..towers.layouts import block_norms, count_blocks, get_tower, resolve_taps
from ..towers.tokens import output_tensor, to_tokens
from .config import M2ISTConfig

SHAPE_KEYS = tuple(f.name for f in fields(StreamShapes))
"""The keys of each tower's entry in `M2ISTConfig.tower_shapes` (every one saved since 0.1.0)."""


def _full(tower_path: str, names: list[str]) -> list[str]:
    return [f"{tower_path}.{name}" for name in names]


def _probe(container: nn.Module, names: list[str], run: Callable[[], object]) -> tuple[dict[str, torch.Tensor], object]:
    """Run `run()` with forward hooks on `names`; returns the recorded outputs and run()'s result."""
    records: dict[str, torch.Tensor] = {}
    handles = []
    for name in set(names):
        module = container.get_submodule(name)

        def hook(_module, _args, output, name=name):
            records[name] = output_tensor(output)

        handles.append(module.register_forward_hook(hook))
    try:
        result = run()
    finally:
        for handle in handles:
            handle.remove()
    return records, result


def _stream_shapes(records: dict[str, torch.Tensor], taps: TapNames, final: TowerOutput, prefix: str) -> StreamShapes:
    num_tokens, grid = final.tokens.num_tokens, final.tokens.grid
    ffn_dims, attention_dims = [], []
    for kind, names, dims in (("", taps.ffn, ffn_dims), ("attention_", taps.attention, attention_dims)):
        for name in names:
            if name not in records:
                raise ValueError(f"The tap '{name}' (`{prefix}_{kind}layers`) did not run during a forward pass.")
            tokens = to_tokens(records[name])
            if tokens.num_tokens != num_tokens and (tokens.grid is None or grid is None or final.tokens.prefix):
                raise ValueError(
                    f"The tap '{name}' (`{prefix}_{kind}layers`) yields {tokens.num_tokens} tokens but the tower's "
                    f"output has {num_tokens}; tap modules whose outputs line up with the final tokens."
                )
            dims.append(tokens.dim)
    has_embedding = False
    if taps.embeddings and taps.embeddings in records:
        emb = to_tokens(records[taps.embeddings])
        same_count = emb.num_tokens == num_tokens or (
            emb.grid is not None and grid is not None and final.tokens.prefix == 0
        )
        has_embedding = same_count and emb.dim == final.tokens.dim
    if not has_embedding:
        taps.embeddings = None
    return StreamShapes(final.tokens.dim, num_tokens, list(grid) if grid else None, ffn_dims, attention_dims,
                        has_embedding, final.tokens.prefix, final.patch_grid)


def plan_adapter(container: nn.Module, config: M2ISTConfig) -> AdapterPlan:
    """Resolve `config`'s taps on `container` and measure the shapes with a dummy image and a dummy phrase."""
    vision_tower = get_tower(container, config.vision_tower, "vision_tower")
    text_tower = get_tower(container, config.text_tower, "text_tower")
    for kind, tower in (("vision", vision_tower), ("text", text_tower)):
        if any(p.device.type == "meta" for p in tower.parameters()):
            raise ValueError(
                f"The {kind} tower has weights on the 'meta' device (built without them, e.g. under accelerate's "
                "`init_empty_weights`): load its weights before `get_peft_model`, which runs the towers once to "
                "measure the taps."
            )
    # auto-resolved towers tap the same number of layers: the smallest of the request and both depths
    depths = [count_blocks(vision_tower), count_blocks(text_tower)]
    num_layers = min([config.num_tapped_layers, *[d for d in depths if d]])
    spacing = config.tap_layer_spacing
    vision = resolve_taps(vision_tower, config.vision_layers, config.vision_attention_layers, num_layers, "vision",
                          spacing)
    text = resolve_taps(text_tower, config.text_layers, config.text_attention_layers, num_layers, "text", spacing)
    if len(vision.ffn) != len(text.ffn):
        raise ValueError(
            f"The vision tower has {len(vision.ffn)} tapped layers and the text tower {len(text.ffn)}; M3ISA pairs "
            "them one to one. Set `vision_layers`/`text_layers` (and the attention ones) to lists of equal length."
        )
    vision_taps = TapNames(_full(config.vision_tower, vision.ffn), _full(config.vision_tower, vision.attention),
                           f"{config.vision_tower}.{vision.embeddings}" if vision.embeddings else None)
    text_taps = TapNames(_full(config.text_tower, text.ffn), _full(config.text_tower, text.attention),
                         f"{config.text_tower}.{text.embeddings}" if text.embeddings else None)

    positions = getattr(getattr(text_tower, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and config.max_text_tokens > positions:
        raise ValueError(
            f"`max_text_tokens` is {config.max_text_tokens} but the text tower has position embeddings for "
            f"{positions} tokens (its config's `max_position_embeddings`); set `max_text_tokens` <= {positions}."
        )
    image_size = config.image_size or default_image_size(vision_tower)
    param = next(vision_tower.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    # float32, as an image processor returns them; `run_vision_tower` casts them to the tower's dtype
    pixel_values = torch.zeros(1, num_channels(vision_tower), image_size, image_size, device=device)
    pixel_mask = torch.ones(1, image_size, image_size, device=device, dtype=torch.long)
    input_ids = torch.ones(1, config.max_text_tokens, dtype=torch.long, device=device)
    attention_mask = torch.ones_like(input_ids)

    names = vision_taps.all() + text_taps.all()
    with frozen(vision_tower, text_tower):
        records, (v_out, t_out) = _probe(
            container, names,
            lambda: (run_vision_tower(vision_tower, pixel_values, pixel_mask),
                     run_text_tower(text_tower, input_ids, attention_mask)),
        )
    vision_shapes = _stream_shapes(records, vision_taps, v_out, "vision")
    text_shapes = _stream_shapes(records, text_taps, t_out, "text")
    plan = AdapterPlan(vision_taps, text_taps, vision_shapes, text_shapes, image_size)
    _plan_fidelity_choices(plan, config, text_tower, text.ffn, text.attention)
    return plan


def _plan_fidelity_choices(plan: AdapterPlan, config: M2ISTConfig, text_tower: nn.Module, text_ffn: list[str],
                           text_attention: list[str]) -> None:
    """Check the fidelity fields that depend on the towers and find the frozen norms they apply; raises a
    `ValueError` before any tap is placed."""
    width = interaction_dim(config, plan.vision.stream_dim)
    if config.interaction_text_path == "concat" and plan.text.stream_dim <= width:
        raise ValueError(
            f"`interaction_text_path='concat'` concatenates a Linear(bottleneck_dim, text width - interaction width) "
            f"with the shared up-projection to the text width (the authors' 512 + 256 = 768 on BERT-base and "
            f"DETR); here the text tower is {plan.text.stream_dim} wide and the interaction width {width}, so "
            "there is nothing to concatenate. Use a text tower wider than the interaction width, or "
            "`interaction_text_path='to_head'` (without preset='paper')."
        )
    if config.language_expert_output_norm == "tower":
        plan.text_ffn_norms = block_norms(text_tower, text_ffn, "ffn", "language_expert_output_norm")
    if config.interaction_text_output_norm == "tower":
        plan.text_attention_norms = block_norms(text_tower, text_attention, "attention",
                                                "interaction_text_output_norm")
    for norms in (plan.text_ffn_norms, plan.text_attention_norms):
        if norms is not None and any(tuple(n.normalized_shape) != (plan.text.stream_dim,) for n in norms):
            raise ValueError(
                f"The text tower's block LayerNorms are not {plan.text.stream_dim} wide (its token width), so they "
                "cannot normalise the experts' text outputs."
            )


def check_saved_shapes_are_complete(config: M2ISTConfig) -> None:
    """Every saved tower shape has all of `SHAPE_KEYS`; adapters saved before 0.1.0 lack some and are refused."""
    saved = config.tower_shapes
    if not saved:
        return
    missing = [f"{tower}.{key}" for tower in ("vision", "text") for key in SHAPE_KEYS if key not in saved.get(tower, {})]
    if missing:
        raise ValueError(
            f"This adapter was saved by a pre-release version of peft-m2ist: its `tower_shapes` lack {missing}, so "
            "it cannot be rebuilt as it was trained. Retrain it (or resave it with peft-m2ist 0.1.0, which works only "
            "where its vision tower yields a feature map)."
        )


def check_plan_matches_config(plan: AdapterPlan, config: M2ISTConfig) -> None:
    """An adapter saved for other tower shapes (`config.tower_shapes`) must not be loaded onto this pair."""
    saved = config.tower_shapes
    if not saved:
        return
    current = {"vision": plan.vision.to_dict(), "text": plan.text.to_dict()}
    for tower in ("vision", "text"):
        for key in SHAPE_KEYS:
            if saved[tower][key] != current[tower][key]:
                raise ValueError(
                    f"it was built for a {tower} tower with {key}={saved[tower][key]!r}, but the given "
                    f"pair has {key}={current[tower][key]!r}."
                )


def record_plan(plan: AdapterPlan, config: M2ISTConfig) -> None:
    """Write the resolved taps and shapes into the config, so the saved adapter rebuilds exactly the same."""
    v, t = len(config.vision_tower) + 1, len(config.text_tower) + 1
    config.vision_layers = [n[v:] for n in plan.vision_taps.ffn]
    config.vision_attention_layers = [n[v:] for n in plan.vision_taps.attention]
    config.text_layers = [n[t:] for n in plan.text_taps.ffn]
    config.text_attention_layers = [n[t:] for n in plan.text_taps.attention]
    config.image_size = plan.image_size
    config.target_modules = plan.target_modules
    config.tower_shapes = {"vision": plan.vision.to_dict(), "text": plan.text.to_dict()}
