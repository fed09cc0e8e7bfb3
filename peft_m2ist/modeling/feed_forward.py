"""The grounding head's transformer layer, with a feed-forward block that keeps little for backward.

A post-norm `nn.TransformerEncoderLayer` with a ReLU feed-forward block `linear2(dropout(relu(linear1(x))))`. Its
hidden tensor `(batch, tokens, ffn_dim)` is the widest activation of the layer (`ffn_dim` is 8x `dim` in TransVG's
head), and stock autograd keeps three of them per layer. Two levels of saving, both with the stock forward ops (same
outputs, same random masks) and the same gradients up to float rounding:

- `ReLUDropout`: one hidden tensor instead of three (`recompute_hidden=False`).
- `RecomputedReLUFeedForward`: no hidden tensor at all; backward recomputes it from the block's input, replaying the
  dropout mask (`LeanFeedForwardEncoderLayer(recompute_hidden=True)`, `M2ISTConfig.head_recompute_feed_forward`).
  That costs one `linear1` matmul and one dropout draw more per layer and step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import get_device_states, set_device_states


class ReLUDropout(torch.autograd.Function):
    """`dropout(relu(x), p)` that keeps only its output for backward.

    Stock autograd keeps the ReLU's output and the dropout mask (a float mask on CPU, a bool one on CUDA) besides the
    dropout's output, which the next Linear keeps as its input. All three are `(batch, tokens, ffn_dim)`, the widest
    activations of a transformer layer. The output alone is enough: it is positive exactly where the ReLU was active
    and the unit was kept, and there the derivative is the dropout scale `1 / (1 - p)`. Forward runs the stock ops,
    so outputs and random masks are the same; gradients agree up to float rounding.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        out = F.dropout(F.relu(x), p, training)
        ctx.scale = _dropout_scale(p, training)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (out,) = ctx.saved_tensors
        return _relu_dropout_backward(grad_out, out, ctx.scale), None, None


def _dropout_scale(p: float, training: bool) -> float:
    """The factor dropout applies to kept units (1 when it is off; p = 1 zeroes everything, nothing to scale)."""
    return 1.0 / (1.0 - p) if training and 0 < p < 1 else 1.0


def _relu_dropout_backward(grad_out: torch.Tensor, out: torch.Tensor, scale: float) -> torch.Tensor:
    """Gradient of `dropout(relu(x))` from its output: `grad_out * scale` where `out > 0`, else 0."""
    grad_in = torch.ops.aten.threshold_backward(grad_out, out, 0)  # one kernel
    return grad_in.mul_(scale) if scale != 1.0 else grad_in


class _RNGSnapshot:
    """The random state dropout draws from for `x`: the CPU's and, for `x` on an accelerator, its device's (taken and
    restored with `torch.utils.checkpoint`'s own helpers), to replay the same mask later."""

    def __init__(self, x: torch.Tensor) -> None:
        self.device_type = x.device.type
        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(x)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block with the generators at the snapshot; their current state is restored afterwards."""
        with torch.random.fork_rng(devices=self.devices, device_type=self.device_type):
            torch.set_rng_state(self.cpu_state)
            set_device_states(self.devices, self.device_states, device_type=self.device_type)
            yield


class RecomputedReLUFeedForward(torch.autograd.Function):
    """`linear2(dropout(relu(linear1(x))))` that keeps only `x` for backward, not the `(..., ffn_dim)` hidden tensor.

    Backward runs `linear1`, ReLU and dropout again (the dropout mask replayed from a snapshot of the random state,
    as `torch.utils.checkpoint` does) and then the stock gradient formulas; `linear2` is not run again. Under
    autocast the recomputation uses the dtype the forward computed in. `x`: `(..., dim)`; weights as `nn.Linear`'s.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight1: torch.Tensor, bias1: torch.Tensor, weight2: torch.Tensor,
                bias2: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        ctx.p, ctx.training = p, training
        ctx.rng = _RNGSnapshot(x) if training and p > 0 else None
        hidden = _relu_dropout_in_forward(x, weight1, bias1, p, training)
        ctx.compute_dtype = hidden.dtype  # the autocast dtype where autocast is on
        # x as linear1 computed with it (the copy stock autograd would keep); the weights as they are: they stay alive
        ctx.save_for_backward(x.to(hidden.dtype), weight1, bias1, weight2)
        return F.linear(hidden, weight2, bias2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight1, bias1, weight2 = ctx.saved_tensors
        dtype = ctx.compute_dtype
        weight1, bias1, weight2 = (None if t is None else t.to(dtype) for t in (weight1, bias1, weight2))
        with torch.autocast(x.device.type, enabled=False), (ctx.rng.replay() if ctx.rng else contextlib.nullcontext()):
            hidden = _relu_dropout_in_forward(x, weight1, bias1, ctx.p, ctx.training)
        grad_out = grad_out.to(dtype)
        needs_x, needs_w1, needs_b1, needs_w2, needs_b2 = ctx.needs_input_grad[:5]
        grad_rows, hidden_rows = grad_out.reshape(-1, grad_out.shape[-1]), hidden.reshape(-1, hidden.shape[-1])
        grad_w2 = grad_rows.t().mm(hidden_rows) if needs_w2 else None
        grad_b2 = grad_rows.sum(0) if needs_b2 else None
        grad_pre = _relu_dropout_backward(grad_out.matmul(weight2), hidden, _dropout_scale(ctx.p, ctx.training))
        del hidden, hidden_rows
        pre_rows = grad_pre.reshape(-1, grad_pre.shape[-1])
        grad_w1 = pre_rows.t().mm(x.reshape(-1, x.shape[-1])) if needs_w1 else None
        grad_b1 = pre_rows.sum(0) if needs_b1 else None
        grad_x = grad_pre.matmul(weight1) if needs_x else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None


def _relu_dropout_in_forward(x: torch.Tensor, weight1: torch.Tensor, bias1: torch.Tensor | None, p: float,
                             training: bool) -> torch.Tensor:
    """`dropout(relu(linear1(x)))` outside autograd, with the stock ops and random draws. The ReLU runs in place on
    `linear1`'s output, which nothing else holds: while dropout runs, its input, its mask and its output are the only
    `(..., ffn_dim)` tensors alive."""
    return F.dropout(F.relu_(F.linear(x, weight1, bias1)), p, training)


class LeanFeedForwardEncoderLayer(nn.TransformerEncoderLayer):
    """`nn.TransformerEncoderLayer` (ReLU) whose feed-forward block keeps little for backward: same parameters, state
    dict, outputs and inference fast path.

    Without `recompute_hidden` the block keeps one `(batch, tokens, ffn_dim)` tensor instead of three (`ReLUDropout`),
    which roughly halves a layer's saved activations. With it the block keeps none (`RecomputedReLUFeedForward`), for
    one more `linear1` matmul and dropout draw in backward: with TransVG's `ffn_dim = 8 x dim` that is another
    `8 x (batch, tokens, dim)` less per layer, about 40% of what the head keeps at paper scale.
    """

    def __init__(self, *args, recompute_hidden: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.activation_relu_or_gelu != 1:  # torch's own marker: 1 for ReLU ("relu", F.relu or nn.ReLU)
            raise ValueError("LeanFeedForwardEncoderLayer implements the ReLU feed-forward block only.")
        self.recompute_hidden = recompute_hidden

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:  # overrides torch's feed-forward block
        if self.recompute_hidden and torch.is_grad_enabled():
            out = RecomputedReLUFeedForward.apply(x, self.linear1.weight, self.linear1.bias, self.linear2.weight,
                                                  self.linear2.bias, self.dropout.p, self.training)
            return self.dropout2(out)
        hidden = ReLUDropout.apply(self.linear1(x), self.dropout.p, self.training)
        return self.dropout2(self.linear2(hidden))

    def forward_with_positions(self, src: torch.Tensor, positions: torch.Tensor,
                               src_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The post-norm layer with `positions` added to the queries and keys of its self-attention, not to the
        values (DETR's and TransVG's encoder layer, `M2ISTConfig.head_positions="attention"`); same parameters.
        `src` `(batch, tokens, dim)`, `positions` broadcastable to it, mask `(batch, tokens)` with True = ignore."""
        if self.norm_first:
            raise ValueError("forward_with_positions implements the post-norm layer only.")
        query_key = src + positions
        attended = self.self_attn(query_key, query_key, src, key_padding_mask=src_key_padding_mask,
                                  need_weights=False)[0]
        hidden = self.norm1(src + self.dropout1(attended))
        return self.norm2(hidden + self._ff_block(hidden))
