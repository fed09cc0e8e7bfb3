"""A ceiling on the size of the modules an adapter builds, checked on the 'meta' device before anything is allocated.

A mistyped size (`head_intermediate_size=2**40`) would otherwise reach the allocator and fail there, or swap the
machine, with an error that names no field. Each module is first built on the 'meta' device (shapes only, no memory),
its parameters counted, and a `ValueError` raised when one exceeds `MAX_MODULE_PARAMETERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

MAX_MODULE_PARAMETERS = 1_000_000_000
"""Most parameters one module of an adapter (its side network, its grounding head) may have: 10^9, about 4 GB in
float32. The paper's side network has about 3 million and its head about 8.5 million, so no real configuration comes
near it; a size field set orders of magnitude too large does."""

SIZE_FIELDS = {
    "side network": ("bottleneck_dim", "interaction_dim", "head_hidden_size", "num_tapped_layers"),
    "grounding head": ("head_hidden_size", "head_num_hidden_layers", "head_intermediate_size", "max_text_tokens"),
}


def count_parameters_on_meta(build: Callable[[], nn.Module]) -> int:
    """Parameters of the module `build()` returns, built on the 'meta' device (no memory is allocated)."""
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def check_parameter_budget(builders: Mapping[str, Callable[[], nn.Module]],
                           limit: int = MAX_MODULE_PARAMETERS) -> dict[str, int]:
    """Count each module's parameters on 'meta'; raise a `ValueError` naming the module, its count, the ceiling and the
    config fields that size it when one exceeds `limit`. Returns the counts."""
    counts = {}
    for what, build in builders.items():
        count = count_parameters_on_meta(build)
        if count > limit:
            fields = ", ".join(f"`{name}`" for name in SIZE_FIELDS.get(what, ()))
            raise ValueError(
                f"The {what} of this adapter would allocate {count:,} parameters, more than the ceiling of "
                f"{limit:,} per module (peft_m2ist.tuner.budget.MAX_MODULE_PARAMETERS); check the size fields of the "
                f"M2ISTConfig ({fields})."
            )
        counts[what] = count
    return counts
