"""Building one adapter's side network and grounding head from its config and plan, on its towers' device; their
parameter counts."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from accelerate import init_empty_weights
from torch import nn

from ..modeling.head import GroundingHead
from ..modeling.side_network import M2ISTSideNetwork
from ..modeling.stream_shapes import AdapterPlan
from .budget import check_parameter_budget
from .config import M2ISTConfig


def has_meta_tensors(module: nn.Module) -> bool:
    return any(t.device.type == "meta" for t in (*module.parameters(), *module.buffers()))


def tower_device(tower: nn.Module) -> torch.device | None:
    param = next(tower.parameters(), None)
    return None if param is None else param.device


def build_head(config: M2ISTConfig, plan: AdapterPlan) -> GroundingHead:
    """The adapter's grounding head, for the vision tokens the plan measured."""
    vision = plan.vision
    return GroundingHead(config, vision.num_tokens, tuple(vision.grid) if vision.grid else None, vision.prefix_tokens)


def check_adapter_budget(config: M2ISTConfig, plan: AdapterPlan) -> None:
    """A `ValueError` before anything is allocated when the side network or the head would be absurdly large
    (`budget`)."""
    check_parameter_budget({
        "side network": lambda: M2ISTSideNetwork(config, plan),
        "grounding head": lambda: build_head(config, plan),
    })


def build_adapter_modules(config: M2ISTConfig, plan: AdapterPlan, vision_tower: nn.Module,
                          low_cpu_mem_usage: bool = False) -> tuple[M2ISTSideNetwork, GroundingHead]:
    """The side network and the head, on the vision tower's device. Under `low_cpu_mem_usage` (also PeftModel's own
    `init_empty_weights`) their weights stay on 'meta' until the saved ones are assigned; `move_to_tower_device`
    moves them once loaded."""
    with init_empty_weights() if low_cpu_mem_usage else nullcontext():
        side = M2ISTSideNetwork(config, plan)
        head = build_head(config, plan)
    if not low_cpu_mem_usage:
        move_to_tower_device((side, head), vision_tower)
    return side, head


def move_to_tower_device(modules: tuple[nn.Module, ...], vision_tower: nn.Module) -> None:
    """Move `modules` onto the vision tower's device, except any that still has weights on 'meta'."""
    device = tower_device(vision_tower)
    for module in modules:
        if device is not None and not has_meta_tensors(module):
            module.to(device)


def parameter_counts(side: M2ISTSideNetwork, head: GroundingHead, towers: nn.Module) -> dict[str, int]:
    """Parameter counts of one adapter: experts only (the paper's measure), projections + head, towers."""
    experts = side.adapter_parameters()
    side_total = sum(p.numel() for p in side.parameters())
    head_total = sum(p.numel() for p in head.parameters())
    tower_total = sum(p.numel() for p in towers.parameters())
    return {
        "adapter_only": experts,
        "projections_and_head": side_total - experts + head_total,
        "adapter_and_head": side_total + head_total,
        "towers": tower_total,
        "total": tower_total + side_total + head_total,
    }
