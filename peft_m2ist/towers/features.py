"""`TowerFeatures`: what the frozen towers hand the side network for one batch, as a typed container.

The towers are frozen, so these features can be computed once (`encode_towers`), cached, and fed back with
`forward(tower_features=...)`. `to_tensors` / `from_tensors` convert to and from a flat `dict[str, Tensor]` (every
value with the batch first), the form a feature cache stores per sample and a `DataLoader` collates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

TAP_KEY_PREFIX = "tap:"
"""Prefix of the taps' keys in the flat dict of `TowerFeatures.to_tensors` (`tap:<full module name>`)."""
_REQUIRED_KEYS = ("vision", "text", "text_mask")


@dataclass
class TowerFeatures:
    """The frozen towers' outputs for one batch.

    Attributes:
        vision: the vision tower's final tokens `(batch, Nv, Dv)`.
        text: the text tower's final tokens `(batch, Nt, Dt)`.
        text_mask: `(batch, Nt)`, 1 = real token.
        vision_mask: `(batch, Nv)`, 1 = real image content, for vision tokens on a grid with a `pixel_mask`; `None`:
            every vision token is real.
        taps: full module name (in the container) -> recorded output `(batch, tokens, dim)`; vision taps already
            pooled onto the final grid, so each has the final token count of its tower.
    """

    vision: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    vision_mask: torch.Tensor | None = None
    taps: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.vision.shape[0]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """A flat dict: `vision`, `text`, `text_mask`, `vision_mask` (when there is one) and `tap:<name>` per tap."""
        tensors = {"vision": self.vision, "text": self.text, "text_mask": self.text_mask}
        if self.vision_mask is not None:
            tensors["vision_mask"] = self.vision_mask
        tensors.update({f"{TAP_KEY_PREFIX}{name}": tensor for name, tensor in self.taps.items()})
        return tensors

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> TowerFeatures:
        """The inverse of `to_tensors` (for instance a batch that a `DataLoader` collated from a feature cache)."""
        missing = [key for key in _REQUIRED_KEYS if key not in tensors]
        extra = [key for key in tensors if key not in (*_REQUIRED_KEYS, "vision_mask")
                 and not key.startswith(TAP_KEY_PREFIX)]
        if missing or extra:
            raise ValueError(
                f"`tower_features` must be the `TowerFeatures` that `encode_towers` returns or its `to_tensors()` "
                f"dict (keys {list(_REQUIRED_KEYS)}, optionally `vision_mask`, and `{TAP_KEY_PREFIX}<module name>`); "
                f"missing keys: {missing}, unknown keys: {extra}."
            )
        taps = {key[len(TAP_KEY_PREFIX):]: value for key, value in tensors.items() if key.startswith(TAP_KEY_PREFIX)}
        return cls(tensors["vision"], tensors["text"], tensors["text_mask"], tensors.get("vision_mask"), taps)

    @classmethod
    def coerce(cls, features: object) -> TowerFeatures:
        """`features` as `TowerFeatures`: itself, or built from a `to_tensors()` dict; anything else is a `TypeError`."""
        if isinstance(features, TowerFeatures):
            return features
        if isinstance(features, Mapping):
            return cls.from_tensors(features)
        raise TypeError(
            "`tower_features` must be the `TowerFeatures` that `encode_towers` returns, or the flat dict of its "
            f"`to_tensors()` (what a DataLoader over a feature cache collates); got {type(features).__name__}."
        )
