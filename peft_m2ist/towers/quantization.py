"""Frozen towers kept in int8: weight-only quantization, activations and computation in float32.

`set_tower_dtype(tower, "int8")` (what ``--tower_dtype int8`` does) puts the tower in float32 and then replaces the
weights of its convolutions, linears and embeddings by int8 values with one float32 scale per output channel (per row
of an embedding): symmetric, ``weight ~= int8 * scale``, so about a quarter of their float32 bytes. What stays in float32:
biases, normalisation layers (LayerNorm, BatchNorm) and anything that is not one of those three module types. Every
forward dequantizes the weight it needs and computes in the input's dtype, so the tower's outputs are float32 maps,
close to the float32 tower's (within the rounding of the weights).

* ``nn.Linear``: torchao's `Int8WeightOnlyConfig` (``torchao.quantization.quantize_``).
* ``nn.Embedding``: torchao's `IntxWeightOnlyConfig` with int8 weights, one scale per row (per token).
* ``nn.Conv2d``: `Int8WeightOnlyConv2d`, here: torchao's weight-only int8 tensors do not run ``aten.convolution``.
  A convolution that applies a folded frozen batch norm (`FrozenBatchNormFoldedConv2d`) is quantized with the norm
  folded in (its weight times the norm's scale), so folding first and quantizing after gives one int8 convolution.

The quantized weights are not parameters any more (int8 buffers, or torchao tensor subclasses that never require a
gradient): a tower in int8 is frozen by construction. Its state dict is not a float32 one, which does not matter
here: an adapter saves only its own weights, and loading one rebuilds and re-quantizes the towers it records.
CUDA's 4- and 8-bit formats (bitsandbytes) are not this module's business.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .frozen_batch_norm import FrozenBatchNormFoldedConv2d

__all__ = [
    "FLOAT_TOWER_DTYPES",
    "QUANTIZED_TOWER_DTYPES",
    "TOWER_DTYPE_CHOICES",
    "Int8WeightOnlyConv2d",
    "plain_tensors",
    "quantize_tower_weights",
    "quantized_modules",
    "set_tower_dtype",
    "tensor_bytes",
    "tower_is_quantized",
    "tower_weight_bytes",
]

FLOAT_TOWER_DTYPES = ("bfloat16", "float16", "float32")
"""The floating dtypes a tower can be kept in (``tower.to(dtype)``)."""
QUANTIZED_TOWER_DTYPES = ("int8",)
"""The weight-only quantized formats a tower can be kept in (`quantize_tower_weights`)."""
TOWER_DTYPE_CHOICES = (*FLOAT_TOWER_DTYPES, *QUANTIZED_TOWER_DTYPES)
"""Every value of ``--tower_dtype`` and of the ``dtype`` of `M2ISTConfig.base_towers`."""

_INT8_MAX = 127


class Int8WeightOnlyConv2d(nn.Module):
    """A frozen ``nn.Conv2d`` with an int8 weight and one float32 scale per output channel (symmetric, per channel).

    Buffers: ``weight_int8`` ``(out_channels, in_channels / groups, kh, kw)`` int8, ``weight_scale``
    ``(out_channels,)`` float32 and ``bias`` ``(out_channels,)`` float32 (or ``None``). Forward dequantizes the weight
    in the input's dtype (and memory format) and convolves: input and output are ``(batch, channels, height, width)``.
    Built from a convolution by `from_conv`; a `FrozenBatchNormFoldedConv2d` gives its weight and bias with the norm
    folded in.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, groups: int) -> None:
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=(1, 2, 3)).clamp(min=torch.finfo(torch.float32).tiny) / _INT8_MAX
        quantized = torch.round(weight / scale.view(-1, 1, 1, 1)).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
        self.register_buffer("weight_int8", quantized.contiguous())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.out_channels, self.in_channels = weight.shape[0], weight.shape[1] * groups
        self.kernel_size = tuple(weight.shape[2:])

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> Int8WeightOnlyConv2d:
        """The int8 copy of `conv` (zero padding only: ``ValueError`` for another ``padding_mode``)."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"Int8WeightOnlyConv2d takes convolutions with padding_mode='zeros', got "
                             f"{conv.padding_mode!r}")
        weight, bias = conv.weight, conv.bias
        if isinstance(conv, FrozenBatchNormFoldedConv2d):
            norm = conv.folded_norm
            weight, bias = fuse_conv_bn_weights(weight.float(), None if bias is None else bias.float(),
                                                norm.running_mean.float(), norm.running_var.float(), norm.eps,
                                                norm.weight.float(), norm.bias.float())
        return cls(weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``weight_int8 * weight_scale`` in `dtype`: ``(out_channels, in_channels / groups, kh, kw)``."""
        return self.weight_int8.to(dtype) * self.weight_scale.to(dtype).view(-1, 1, 1, 1)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight, made at each access: for code that reads a convolution's weight (ViT's
        patch embedding casts its input to ``projection.weight.dtype``)."""
        return self.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight(x.dtype)
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            weight = weight.contiguous(memory_format=torch.channels_last)  # the fast path of a channels-last tower
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}, weight=int8 per channel")


def plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold `tensor`'s data: itself, or the inner tensors of a tensor subclass (a torchao
    quantized weight: its int8 values, scales, ...), so that bytes and digests see what is really stored."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, nn.Parameter):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [inner for name in names for inner in plain_tensors(getattr(tensor, name))]


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of what `tensor` stores (of its inner tensors for a quantized tensor subclass)."""
    return sum(t.numel() * t.element_size() for t in plain_tensors(tensor))


def tower_weight_bytes(module: nn.Module) -> int:
    """Bytes of `module`'s parameters and buffers (each tensor once), quantized ones at their stored size."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(tensor_bytes(t) for t in tensors.values())


def _is_quantized_tensor(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and len(plain_tensors(tensor)) > 1


def quantized_modules(module: nn.Module) -> dict[str, int]:
    """How many convolutions, linears and embeddings of `module` hold int8 weights."""
    counts = {"conv2d": 0, "linear": 0, "embedding": 0}
    for child in module.modules():
        if isinstance(child, Int8WeightOnlyConv2d):
            counts["conv2d"] += 1
        elif isinstance(child, (nn.Linear, nn.Embedding)) and _is_quantized_tensor(child.weight):
            counts["linear" if isinstance(child, nn.Linear) else "embedding"] += 1
    return counts


def tower_is_quantized(module: nn.Module) -> bool:
    """Whether `quantize_tower_weights` quantized anything in `module`."""
    return any(quantized_modules(module).values())


def _torchao_quantize(module: nn.Module) -> None:
    """torchao's weight-only int8 on `module`'s float linears (per output row) and embeddings (per token)."""
    with warnings.catch_warnings():  # torchao's CPU wheels warn about their CUDA extensions at import
        warnings.simplefilter("ignore")
        try:
            from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerAxis, quantize_
        except ImportError as error:
            raise ImportError("int8 towers need torchao: pip install 'peft-m2ist[int8]' (or torchao>=0.18)") from error

    def plain(kind):
        return lambda child, _name: type(child) is kind and not _is_quantized_tensor(child.weight)

    quantize_(module, Int8WeightOnlyConfig(), filter_fn=plain(nn.Linear))
    quantize_(module, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
              filter_fn=plain(nn.Embedding))


@torch.no_grad()
def quantize_tower_weights(tower: nn.Module) -> nn.Module:
    """Quantize `tower`'s convolutions, linears and embeddings to int8 weights, in place, and return it.

    The tower is put in float32 first (activations and computation stay float32). Convolutions become
    `Int8WeightOnlyConv2d` (after `fold_frozen_batch_norms`, if that is to be applied: a folded norm is quantized with
    its convolution); linears and embeddings get torchao's weight-only int8 tensors. Modules already quantized are
    left as they are, so a second call changes nothing. Every remaining parameter is frozen (``requires_grad=False``).
    """
    tower.to(torch.float32)
    for parent in list(tower.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and child.padding_mode == "zeros":
                setattr(parent, name, Int8WeightOnlyConv2d.from_conv(child))
    _torchao_quantize(tower)
    tower.requires_grad_(False)
    return tower


def set_tower_dtype(tower: nn.Module, dtype: str | torch.dtype) -> nn.Module:
    """Keep `tower` in `dtype` (a floating torch dtype or its name, or ``"int8"``), in place; returns it.

    A floating dtype is ``tower.to(dtype)``; ``"int8"`` is `quantize_tower_weights`. Raises ``ValueError`` naming the
    allowed values for anything else.
    """
    name = str(dtype).removeprefix("torch.")
    if name in QUANTIZED_TOWER_DTYPES:
        return quantize_tower_weights(tower)
    torch_dtype = getattr(torch, name, None)
    if not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
        raise ValueError(f"tower dtype {dtype!r} is neither a torch floating-point dtype (e.g. 'float32', "
                         f"'bfloat16') nor one of {list(QUANTIZED_TOWER_DTYPES)}")
    return tower.to(torch_dtype)
