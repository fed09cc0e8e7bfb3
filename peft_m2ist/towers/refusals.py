"""Towers that cannot be side-tuned, refused by name before anything is built, with the family and the reason."""

from __future__ import annotations

from torch import nn


def family_name(tower: nn.Module) -> str:
    """`ViTMAEModel (model_type 'vit_mae')`: how messages name a tower's family."""
    model_type = getattr(getattr(tower, "config", None), "model_type", None)
    return f"{type(tower).__name__} (model_type {model_type!r})"


def check_tower_is_usable(tower: nn.Module, prefix: str) -> None:
    """Refuse a tower that is random in eval mode: one that masks a random share of its patches (ViTMAE's
    `mask_ratio`), whose tokens, and so a saved adapter's predictions, would change from call to call. (With
    `mask_ratio=0`, `run_vision_tower` keeps ViTMAE's patches in order.)"""
    config = getattr(tower, "config", None)
    mask_ratio = getattr(config, "mask_ratio", None)
    # Hiera's config has a `mask_ratio` too, used only by its embeddings built for MAE pre-training (`is_mae`)
    masks = getattr(getattr(tower, "embeddings", None), "is_mae", True)
    if isinstance(mask_ratio, (int, float)) and mask_ratio > 0 and masks:
        raise ValueError(
            f"The {prefix} tower {family_name(tower)} masks {mask_ratio:.0%} of its patches at random even in eval "
            "mode (`config.mask_ratio`), so its tokens change from call to call and a saved adapter would not "
            "predict the same boxes again. Build it with `mask_ratio=0` (e.g. `from_pretrained(..., "
            "mask_ratio=0.0)`): every patch is then kept, in order."
        )
