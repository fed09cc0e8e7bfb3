"""A leaner frozen batch norm for DETR-family backbones (`*FrozenBatchNorm2d` in transformers and torchvision).

Those modules compute `x * scale + bias` as two ops: while the second runs, the input, the product and the result
are all alive, three full-size feature maps. In a frozen ResNet at 640 px that transient sets the training-memory
peak of every method that keeps the backbone frozen (measured in `benchmarks/RESULTS.md`). `FusedFrozenBatchNorm2d`
computes the same affine map in one `torch.addcmul`, so only the input and the result are alive. It keeps the same
buffers (the state dict does not change) and saves nothing more for backward when gradients pass through it.

Its output keeps the input's dtype, as `nn.BatchNorm2d`'s does. The stock modules multiply by float32 buffers, so
under bf16 autocast they turn every bf16 convolution output back into a float32 map, which the next convolution
casts to bf16 again: feature maps twice the size, and a cast per convolution.

`fold_frozen_batch_norms` goes one step further where a frozen batch norm directly follows a convolution (transformers'
conv layers: `convolution`, `normalization`, `activation`): the convolution applies the norm's scale and shift through
its weight and bias (`FrozenBatchNormFoldedConv2d`), so the norm's feature map is never made, and the ReLU after it runs
in place on the convolution's output, which nothing else holds.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

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


class FoldedFrozenBatchNorm2d(FusedFrozenBatchNorm2d):
    """A frozen batch norm whose affine map the convolution before it applies (`FrozenBatchNormFoldedConv2d`): it keeps
    the buffers where they were (the state dict does not change) and passes its input through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return super().extra_repr() + ", folded into the convolution before it"


class FrozenBatchNormFoldedConv2d(nn.Conv2d):
    """`nn.Conv2d` followed by a frozen batch norm, as one convolution: `conv(x, weight * scale, bias * scale + shift)`.

    Shares the original convolution's parameters (same state-dict entries). The fold is computed at every call from the
    current weights and buffers, a weight-sized product against the feature map the norm no longer writes, so it
    follows `load_state_dict` and moves to another device or dtype with the model. A convolution whose weight gets a
    gradient, or whose bias does (it trains, e.g. in full fine-tuning), is not folded at that call: autograd would keep
    the scaled copy of its weight for backward. It convolves and applies the norm in one op, as
    `FusedFrozenBatchNorm2d` does. Input and output are `(batch, channels, height, width)`.
    """

    def __init__(self, conv: nn.Conv2d, norm: FoldedFrozenBatchNorm2d) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        self.weight = conv.weight
        self.bias = conv.bias
        # a plain attribute, not a submodule: the norm stays registered (and in the state dict) where it was
        object.__setattr__(self, "folded_norm", norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.folded_norm
        if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in (self.weight, self.bias)):
            return FusedFrozenBatchNorm2d.forward(norm, super().forward(x))
        # torch's own conv + batch-norm fusion formula (it returns detached parameters: only for convolutions that
        # get no gradient, as here)
        weight, bias = fuse_conv_bn_weights(self.weight, self.bias, norm.running_mean, norm.running_var, norm.eps,
                                            norm.weight, norm.bias)
        return self._conv_forward(x, weight, bias)


# transformers' residual blocks whose last activation runs on a tensor the block made (and already added to in place)
_RESIDUAL_BLOCKS = ("ResNetBasicLayer", "ResNetBottleNeckLayer")
_IN_PLACE_ACTIVATIONS = (nn.ReLU, nn.ReLU6)


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


def _in_place(activation: nn.Module) -> nn.Module | None:
    """An in-place copy of a stateless ReLU / ReLU6 module, or None for anything else (or one already in place)."""
    if type(activation) in _IN_PLACE_ACTIVATIONS and not activation.inplace:
        return type(activation)(inplace=True)
    return None


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


@torch.no_grad()
def _replace_if_same(parent: nn.Module, in_channels: int, replacements: dict[str, nn.Module]) -> bool:
    """Swap `parent`'s children for `replacements` if `parent` computes the same on a random `(1, in_channels, 9, 9)`
    input afterwards (compared in float32); otherwise put the originals back."""
    weight = next(parent.parameters(), None)
    if weight is None or weight.device.type == "meta":
        return False
    probe = torch.randn(1, in_channels, 9, 9, generator=torch.Generator().manual_seed(0)).to(weight)
    originals = {name: getattr(parent, name) for name in replacements}
    was_training = parent.training
    parent.eval()
    try:
        expected = parent(probe).float()
        for name, module in replacements.items():
            setattr(parent, name, module)
        tol = 1e-4 if torch.finfo(weight.dtype).bits > 16 else 3e-2
        same = torch.allclose(parent(probe.clone()).float(), expected, rtol=tol, atol=tol)
    except Exception:  # a parent that does not take such an input: leave it as it was
        same = False
    if not same:
        for name, module in originals.items():
            setattr(parent, name, module)
    parent.train(was_training)
    return same


def fold_frozen_batch_norms(model: nn.Module, inplace_activations: bool = True) -> int:
    """Fold every frozen batch norm that directly follows a convolution into that convolution; returns how many.

    Frozen batch norms (DETR's `DetrFrozenBatchNorm2d` and its siblings) are first fused
    (`fuse_frozen_batch_norms`). Then, in each conv layer laid out as transformers lays them out (children
    `convolution`, an `nn.Conv2d`, and `normalization`), the convolution becomes a `FrozenBatchNormFoldedConv2d` that
    applies the norm's scale and shift through its weight and bias, and the norm a `FoldedFrozenBatchNorm2d` that passes
    its input through. The norm's output map is never made: one full-size feature map less per conv layer, in time and
    at the forward's peak. With `inplace_activations`, the layer's ReLU (or ReLU6) then runs in place on the
    convolution's output, and so does the ReLU after the residual add of transformers' ResNet blocks, whose input the
    block itself made; autograd allows both (a convolution keeps its input for backward, not its output).

    The state dict does not change, outputs agree up to float rounding, and gradients are exact; a convolution that
    trains applies its norm after it instead (see `FrozenBatchNormFoldedConv2d`). Each change is checked on a probe
    input of its layer, and undone if the layer then computes something else. `nn.BatchNorm2d` is not folded: in
    training mode it normalises with batch statistics.

    Example:

        ```py
        >>> from transformers import DetrConfig, DetrModel
        >>> from peft_m2ist import fold_frozen_batch_norms
        >>> detr = DetrModel(DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False))
        >>> fold_frozen_batch_norms(detr)
        53
        ```
    """
    fuse_frozen_batch_norms(model)
    folded = 0
    for parent in list(model.modules()):
        conv, norm = getattr(parent, "convolution", None), getattr(parent, "normalization", None)
        if (type(conv) is not nn.Conv2d or type(norm) is not FusedFrozenBatchNorm2d or _has_hooks(conv)
                or _has_hooks(norm)):
            continue
        folded_norm = FoldedFrozenBatchNorm2d(norm, norm.eps)
        replacements = {"convolution": FrozenBatchNormFoldedConv2d(conv, folded_norm), "normalization": folded_norm}
        activation = _in_place(getattr(parent, "activation", None)) if inplace_activations else None
        if activation is not None:
            replacements["activation"] = activation
        folded += _replace_if_same(parent, conv.in_channels, replacements)
    if inplace_activations:
        for block in list(model.modules()):
            activation = _in_place(getattr(block, "activation", None))
            first_conv = next((m for m in block.modules() if isinstance(m, nn.Conv2d)), None)
            if type(block).__name__ in _RESIDUAL_BLOCKS and activation is not None and first_conv is not None:
                _replace_if_same(block, first_conv.in_channels, {"activation": activation})
    return folded
