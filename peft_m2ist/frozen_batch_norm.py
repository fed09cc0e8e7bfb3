"""A leaner frozen batch norm for DETR-family backbones (`*FrozenBatchNorm2d` in transformers and torchvision).

Those modules compute `x * scale + bias` as two ops: while the second runs, the input, the product and the result
are all alive, three full-size feature maps. In a frozen ResNet at 640 px that transient sets the training-memory
peak of every method that keeps the backbone frozen (measured in `benchmarks/RESULTS.md`). `FusedFrozenBatchNorm2d`
computes the same affine map in one `torch.addcmul`, so only the input and the result are alive. It keeps the same
buffers (the state dict does not change) and saves nothing more for backward when gradients pass through it.

Its output keeps the input's dtype, as `nn.BatchNorm2d`'s does. The stock modules multiply by float32 buffers, so
under bf16 autocast they turn every bf16 convolution output back into a float32 map, which the next convolution
casts to bf16 again: feature maps twice the size, and a cast per convolution.
"""

from __future__ import annotations

import torch
from torch import nn

_BUFFERS = ("weight", "bias", "running_mean", "running_var")


class FusedFrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine weights on `(batch, channels, height, width)`, as one op.

    Takes over the buffers of the frozen batch norm it replaces (shared, not copied). The scale and shift are
    computed in the buffers' dtype and applied in the input's: the output has the input's dtype.
    """

    def __init__(self, frozen: nn.Module, eps: float = 1e-5) -> None:
        super().__init__()
        for name in _BUFFERS:
            self.register_buffer(name, getattr(frozen, name))
        self.eps = eps

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # like transformers' frozen batch norms
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return torch.addcmul(shift.view(1, -1, 1, 1).to(x.dtype), x, scale.view(1, -1, 1, 1).to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _is_frozen_batch_norm(module: nn.Module) -> bool:
    return (
        not isinstance(module, FusedFrozenBatchNorm2d)
        and type(module).__name__.endswith("FrozenBatchNorm2d")
        and all(isinstance(getattr(module, name, None), torch.Tensor) for name in _BUFFERS)
        and next(module.parameters(recurse=False), None) is None
    )


@torch.no_grad()
def _computes_the_same(original: nn.Module, fused: FusedFrozenBatchNorm2d) -> bool:
    """Both modules on a small random input `(1, channels, 2, 2)`: the fused one must give the original's output."""
    weight = fused.weight
    if weight.device.type == "meta":
        return True  # nothing to compute on; the buffers are filled later, and the class name already matched
    probe = torch.randn(1, weight.shape[0], 2, 2, generator=torch.Generator().manual_seed(0)).to(weight)
    tol = 1e-4 if torch.finfo(weight.dtype).bits > 16 else 2e-2  # one rounding fewer than the original's two ops
    return torch.allclose(fused(probe).float(), original(probe).float(), rtol=tol, atol=tol)


def fuse_frozen_batch_norms(model: nn.Module) -> int:
    """Replace every frozen batch norm in `model` (DETR's `DetrFrozenBatchNorm2d` and its siblings, torchvision's
    `FrozenBatchNorm2d`) by a `FusedFrozenBatchNorm2d` on the same buffers; returns how many were replaced.

    Same outputs up to float rounding, same state dict, less peak memory in the forward pass. A module whose output
    the fused one does not reproduce on a probe input is left as it is.

    Example:

        ```py
        >>> from transformers import DetrConfig, DetrModel
        >>> from peft_m2ist import fuse_frozen_batch_norms
        >>> detr = DetrModel(DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False))
        >>> fuse_frozen_batch_norms(detr)
        53
        ```
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not _is_frozen_batch_norm(child):
                continue
            fused = FusedFrozenBatchNorm2d(child, eps=float(getattr(child, "eps", 1e-5)))
            if _computes_the_same(child, fused):
                setattr(parent, name, fused)
                replaced += 1
    return replaced
