"""Planning an adapter on a concrete pair: resolve the taps and measure every shape with one dummy forward pass."""

from __future__ import annotations

import logging
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
from ..towers.layouts import block_norms, count_blocks, find_layout, get_tower, resolve_taps
from ..towers.refusals import family_name
from ..towers.tokens import match_grid, output_tensor, to_tokens
from .config import M2ISTConfig

logger = logging.getLogger(__name__)

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


def _lines_up(record: torch.Tensor, final: TowerOutput) -> bool:
    """Whether a tap's output can be brought to the final tokens (same count, or a finer grid pooled onto theirs)."""
    try:
        match_grid(to_tokens(record), final.tokens.num_tokens, final.tokens.grid)
    except ValueError:
        return False
    return True


def _stream_shapes(records: dict[str, torch.Tensor], taps: TapNames, final: TowerOutput, prefix: str,
                   tappable: Callable[[], list[str]]) -> StreamShapes:
    num_tokens, grid = final.tokens.num_tokens, final.tokens.grid
    ffn_dims, attention_dims = [], []
    for kind, names, dims in (("", taps.ffn, ffn_dims), ("attention_", taps.attention, attention_dims)):
        for name in names:
            if name not in records:
                raise ValueError(f"The tap '{name}' (`{prefix}_{kind}layers`) did not run during a forward pass.")
            tokens = to_tokens(records[name])
            if tokens.num_tokens != num_tokens and not _lines_up(records[name], final):
                raise ValueError(
                    f"The tap '{name}' (`{prefix}_{kind}layers`) yields {tokens.num_tokens} tokens but the tower's "
                    f"output has {num_tokens}, and they cannot be put on one grid or sequence (a tower that pools "
                    f"tokens between its blocks, like Funnel). Blocks whose outputs line up with the final tokens, "
                    f"which can be tapped: {tappable()}."
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


def _tappable_blocks(container: nn.Module, tower_path: str, tower: nn.Module, run: Callable[[], TowerOutput],
                     ) -> list[str]:
    """The blocks of `tower` (full names) whose outputs line up with its final tokens, for a refusal's message."""
    layout = find_layout(tower)
    names = _full(tower_path, list(layout.blocks)) if layout is not None else []
    with frozen(tower):
        records, final = _probe(container, names, run)
    return [name for name in names if name in records and _lines_up(records[name], final)]


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
    # (a discovered depth counts only where that tower's taps are auto-resolved)
    depths = [count_blocks(vision_tower, discover=config.vision_layers is None),
              count_blocks(text_tower, discover=config.text_layers is None)]
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
    def tappable(kind: str) -> Callable[[], list[str]]:
        if kind == "vision":
            return lambda: _tappable_blocks(container, config.vision_tower, vision_tower, lambda: run_vision_tower(
                vision_tower, pixel_values, pixel_mask))
        return lambda: _tappable_blocks(container, config.text_tower, text_tower, lambda: run_text_tower(
            text_tower, input_ids, attention_mask))

    try:
        vision_shapes = _stream_shapes(records, vision_taps, v_out, "vision", tappable("vision"))
        text_shapes = _stream_shapes(records, text_taps, t_out, "text", tappable("text"))
    except ValueError as err:
        tower = text_tower if "(`text_" in str(err) else vision_tower
        raise ValueError(f"{family_name(tower)}: {err}") from None
    plan = AdapterPlan(vision_taps, text_taps, vision_shapes, text_shapes, image_size)
    for kind, tower, resolved, taps in (("vision", vision_tower, vision, vision_taps), ("text", text_tower, text,
                                                                                          text_taps)):
        plan.descriptions[kind] = _describe(kind, tower, resolved.source, taps)
        logger.info(plan.descriptions[kind])
    _plan_fidelity_choices(plan, config, text_tower, text.ffn, text.attention)
    return plan


def _describe(kind: str, tower: nn.Module, source: str, taps: TapNames) -> str:
    embedding = f"embedding '{taps.embeddings}'" if taps.embeddings else "no embedding tap"
    return (f"{kind} tower {family_name(tower)}: {len(taps.ffn)} layers tapped, FFN {taps.ffn}, attention "
            f"{taps.attention}, {embedding}; from the {source}")


def describe_taps(model: nn.Module, adapter_name: str | None = None) -> str:
    """What an adapter taps in each tower and why, one line per tower (as logged when it was built): the registered
    layout of the tower's `model_type`, the structure discovery found, or explicit tap fields (taps other than the
    ones auto-resolution gives). `model`: the `PeftModel` or its `M2ISTModel`."""
    tuner = getattr(model, "base_model", model)
    config: M2ISTConfig = tuner.peft_config[adapter_name or tuner.active_adapters[0]]
    lines = []
    for kind in ("vision", "text"):
        path = getattr(config, f"{kind}_tower")
        tower = get_tower(tuner.model, path, f"{kind}_tower")
        ffn, attention = getattr(config, f"{kind}_layers"), getattr(config, f"{kind}_attention_layers")
        try:
            auto = resolve_taps(tower, None, None, len(ffn), kind, config.tap_layer_spacing)
            source = auto.source if (auto.ffn, auto.attention) == (ffn, attention) else "explicit tap fields"
        except ValueError:
            source = "explicit tap fields"
        embedding = None
        if (config.tower_shapes or {}).get(kind, {}).get("has_embedding"):
            embedding = resolve_taps(tower, ffn, attention, len(ffn), kind).embeddings
        lines.append(_describe(kind, tower, source, TapNames(ffn, attention, embedding)))
    return "\n".join(lines)


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
