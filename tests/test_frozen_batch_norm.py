"""`fuse_frozen_batch_norms`: DETR's frozen batch norms as one op, same outputs, state dict and gradients."""

from __future__ import annotations

import copy

import torch
from torch import nn

from benchmarks.common import LiveTensorPeak, SavedForBackward
from peft_m2ist import FusedFrozenBatchNorm2d, fuse_frozen_batch_norms
from tests.tiny_towers import detr_resnet


def _frozen_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "DetrFrozenBatchNorm2d"]


def _detr_with_statistics() -> nn.Module:
    """A tiny DETR whose frozen batch norms hold non-trivial statistics and affine weights."""
    torch.manual_seed(0)
    detr = detr_resnet().eval()
    for norm in _frozen_norms(detr):
        for name in ("weight", "bias", "running_mean"):
            getattr(norm, name).copy_(torch.randn_like(getattr(norm, name)))
        norm.running_var.copy_(torch.rand_like(norm.running_var) + 0.5)
    return detr


def _backbone_maps(detr: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.long)
    return detr.backbone(pixels, mask)[-1][0]  # the last stage's (batch, channels, h, w) map


def test_fused_norms_give_the_same_outputs_and_state_dict():
    stock = _detr_with_statistics()
    fused = copy.deepcopy(stock)
    originals = _frozen_norms(fused)
    assert originals and fuse_frozen_batch_norms(fused) == len(originals)
    assert not _frozen_norms(fused)
    replacements = [m for m in fused.modules() if isinstance(m, FusedFrozenBatchNorm2d)]
    assert all(new.running_var is old.running_var for new, old in zip(replacements, originals))  # shared buffers
    assert fused.state_dict().keys() == stock.state_dict().keys()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(_backbone_maps(fused, pixels), _backbone_maps(stock, pixels))
    # a state dict with batch-norm counters (as torchvision's checkpoints have) still loads strictly
    state = {k: v.clone() for k, v in stock.state_dict().items()}
    norm_prefix = next(n for n, m in fused.named_modules() if isinstance(m, FusedFrozenBatchNorm2d))
    state[f"{norm_prefix}.num_batches_tracked"] = torch.tensor(7)
    fused.load_state_dict(state, strict=True)
    assert fuse_frozen_batch_norms(fused) == 0  # already fused: nothing left to replace


def test_fused_norms_lower_the_frozen_forward_peak():
    stock = _detr_with_statistics()
    fused = copy.deepcopy(stock)
    fuse_frozen_batch_norms(fused)
    pixels = torch.randn(2, 3, 64, 64)
    peaks = {}
    for name, model in (("stock", stock), ("fused", fused)):
        with torch.no_grad(), LiveTensorPeak() as tracker:
            _backbone_maps(model, pixels)
        peaks[name] = tracker.peak
    widest_map = 2 * 8 * 32 * 32 * 4  # bytes of the stem's (batch, 8, 32, 32) float32 output
    assert peaks["stock"] - peaks["fused"] >= widest_map, peaks


def test_gradients_through_fused_norms_match_and_save_nothing_more():
    stock = _detr_with_statistics()
    fused = copy.deepcopy(stock)
    fuse_frozen_batch_norms(fused)
    pixels = torch.randn(2, 3, 64, 64)
    results = []
    for model in (stock, fused):
        model.requires_grad_(True)
        with SavedForBackward(exclude={t.data_ptr() for t in [*model.parameters(), *model.buffers()]}) as saved:
            out = _backbone_maps(model, pixels)
        out.square().mean().backward()
        results.append((saved.nbytes, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (saved_stock, grads_stock), (saved_fused, grads_fused) = results
    assert saved_fused <= saved_stock, (saved_stock, saved_fused)
    assert grads_fused.keys() == grads_stock.keys() and grads_stock
    for name in grads_stock:
        torch.testing.assert_close(grads_fused[name], grads_stock[name], rtol=1e-4, atol=1e-5, msg=name)


class LooseFrozenBatchNorm2d(nn.Module):
    """Named like a frozen batch norm, with the same buffers, but another formula: must be left alone."""

    def __init__(self, n: int) -> None:
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, torch.rand(n) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1)


def test_modules_that_compute_something_else_are_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), LooseFrozenBatchNorm2d(4))
    assert fuse_frozen_batch_norms(model) == 0
    assert isinstance(model[1], LooseFrozenBatchNorm2d)


def test_half_precision_towers_are_fused_too():
    stock = _detr_with_statistics().to(torch.bfloat16)
    fused = copy.deepcopy(stock)
    assert fuse_frozen_batch_norms(fused) == len(_frozen_norms(stock))
    pixels = torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(_backbone_maps(fused, pixels), _backbone_maps(stock, pixels), rtol=0.05, atol=0.05)


def test_fused_norms_keep_bf16_maps_under_autocast():
    """Under bf16 autocast the stock norms promote each bf16 convolution output to a float32 map (their buffers are
    float32); the fused ones keep it in bf16, as `nn.BatchNorm2d` does, with the same values up to bf16 rounding."""
    stock = _detr_with_statistics()
    fused = copy.deepcopy(stock)
    fuse_frozen_batch_norms(fused)
    pixels = torch.randn(2, 3, 64, 64)
    stem_outputs, peaks = {}, {}
    for name, model in (("stock", stock), ("fused", fused)):
        stem_norm = next(m for m in model.modules() if type(m).__name__.endswith("FrozenBatchNorm2d"))
        handle = stem_norm.register_forward_hook(lambda _m, _i, out, name=name: stem_outputs.__setitem__(name, out))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), LiveTensorPeak() as tracker:
            maps = _backbone_maps(model, pixels)
        handle.remove()
        peaks[name] = tracker.peak
        if name == "stock":
            reference = maps
    assert stem_outputs["stock"].dtype == torch.float32 and stem_outputs["fused"].dtype == torch.bfloat16
    assert maps.dtype == torch.bfloat16
    torch.testing.assert_close(maps.float(), reference.float(), rtol=0.05, atol=0.05)
    widest_map = 2 * 8 * 32 * 32 * 4  # bytes of the stem's (batch, 8, 32, 32) map in float32
    assert peaks["stock"] - peaks["fused"] >= widest_map, peaks
