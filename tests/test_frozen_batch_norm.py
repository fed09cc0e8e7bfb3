"""`fuse_frozen_batch_norms` and `fold_frozen_batch_norms`: DETR's frozen batch norms as one op, or folded into the
convolution before them; same outputs, state dict and gradients, less at the forward's peak."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_towers import detr_resnet
from torch import nn
from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d

from benchmarks.measurement import LiveTensorPeak, SavedForBackward
from peft_m2ist import (
    FoldedFrozenBatchNorm2d,
    FrozenBatchNormFoldedConv2d,
    FusedFrozenBatchNorm2d,
    fold_frozen_batch_norms,
    fuse_frozen_batch_norms,
)


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


def _saved_bytes_and_gradients(model: nn.Module, pixels: torch.Tensor) -> tuple[int, dict[str, torch.Tensor]]:
    """Train every parameter of `model` through one backbone pass: bytes saved for backward, parameter gradients."""
    model.requires_grad_(True)
    with SavedForBackward(exclude={t.data_ptr() for t in [*model.parameters(), *model.buffers()]}) as saved:
        out = _backbone_maps(model, pixels)
    out.square().mean().backward()
    return saved.nbytes, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("prepare_reference", "prepare_candidate"),
    [(lambda model: None, fuse_frozen_batch_norms), (fuse_frozen_batch_norms, fold_frozen_batch_norms)],
    ids=["fused vs stock", "folded vs fused"],
)
def test_gradients_match_and_nothing_more_is_saved(prepare_reference, prepare_candidate):
    """Convolutions that train (full fine-tuning) get the same gradients through fused norms, and through folded layers
    and their in-place ReLUs, and keep no more for backward: in particular a folded convolution that trains keeps no
    scaled copy of its weight (it applies the norm after the convolution instead)."""
    reference = _detr_with_statistics()
    prepare_reference(reference)
    candidate = copy.deepcopy(reference)
    prepare_candidate(candidate)
    pixels = torch.randn(2, 3, 64, 64)
    saved_reference, grads_reference = _saved_bytes_and_gradients(reference, pixels)
    saved_candidate, grads_candidate = _saved_bytes_and_gradients(candidate, pixels)
    assert saved_candidate <= saved_reference, (saved_reference, saved_candidate)
    assert grads_candidate.keys() == grads_reference.keys() and any("convolution" in n for n in grads_reference)
    for name in grads_reference:
        torch.testing.assert_close(grads_candidate[name], grads_reference[name], rtol=1e-4, atol=1e-5, msg=name)


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


# ------------------------------------------------------------------------------------------------ folding
def _conv_layers_with_frozen_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(getattr(m, "normalization", None)).__name__ == "DetrFrozenBatchNorm2d"]


def test_folded_convs_give_the_same_outputs_and_state_dict():
    stock = _detr_with_statistics()
    folded = copy.deepcopy(stock)
    layers = _conv_layers_with_frozen_norms(folded)
    assert layers and fold_frozen_batch_norms(folded) == len(layers) == len(_frozen_norms(stock))
    for layer in layers:
        assert isinstance(layer.convolution, FrozenBatchNormFoldedConv2d)
        assert isinstance(layer.normalization, FoldedFrozenBatchNorm2d)
        assert layer.convolution.folded_norm is layer.normalization
    in_place = [m for m in folded.modules() if isinstance(m, nn.ReLU) and m.inplace]
    residual_blocks = [m for m in folded.modules() if type(m).__name__ == "ResNetBasicLayer"]
    assert residual_blocks and all(block.activation in in_place for block in residual_blocks)
    assert folded.state_dict().keys() == stock.state_dict().keys()
    for name, value in stock.state_dict().items():
        torch.testing.assert_close(folded.state_dict()[name], value, rtol=0, atol=0, msg=name)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(_backbone_maps(folded, pixels), _backbone_maps(stock, pixels))
    assert fold_frozen_batch_norms(folded) == 0  # already folded


def test_folded_convs_follow_loaded_weights_and_statistics():
    """The fold is computed from the current buffers: a state dict loaded afterwards takes effect."""
    folded = _detr_with_statistics()
    fold_frozen_batch_norms(folded)
    other = _detr_with_statistics()
    for norm in _frozen_norms(other):
        norm.running_mean.add_(1.0)
        norm.weight.mul_(2.0)
    folded.load_state_dict(other.state_dict(), strict=True)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps, reference = _backbone_maps(folded, pixels), _backbone_maps(other, pixels)
    torch.testing.assert_close(maps, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    copied = copy.deepcopy(folded)  # the copy folds its own norms, not the original's
    layers = [m for m in copied.modules() if isinstance(getattr(m, "convolution", None), FrozenBatchNormFoldedConv2d)]
    assert layers and all(m.convolution.folded_norm is m.normalization for m in layers)


def test_folding_lowers_the_frozen_forward_peak_below_fusing():
    """In a conv layer the fused norm writes a second map beside the convolution's, and the ReLU a third while the
    norm's is alive; folded, the convolution's output is the only map (the ReLU runs in place on it)."""
    fused = _detr_with_statistics()
    fuse_frozen_batch_norms(fused)
    folded = copy.deepcopy(fused)
    fold_frozen_batch_norms(folded)
    pixels = torch.randn(2, 3, 64, 64)
    stem_peaks, backbone_peaks = {}, {}
    for name, model in (("fused", fused), ("folded", folded)):
        stem = next(m for n, m in model.named_modules() if n.endswith("embedder.embedder"))  # conv, norm, ReLU
        with torch.no_grad(), LiveTensorPeak() as tracker:
            stem(pixels)
        stem_peaks[name] = tracker.peak
        with torch.no_grad(), LiveTensorPeak() as tracker:
            _backbone_maps(model, pixels)
        backbone_peaks[name] = tracker.peak
    stem_map = 2 * 8 * 32 * 32 * 4  # bytes of the stem's (batch, 8, 32, 32) float32 output
    small = stem_map // 10  # besides the maps: per-channel scale and shift, and the folded (8, 3, 7, 7) weight
    assert 2 * stem_map <= stem_peaks["fused"] < 2 * stem_map + small, stem_peaks
    assert stem_map <= stem_peaks["folded"] < stem_map + small, stem_peaks
    assert backbone_peaks["folded"] < backbone_peaks["fused"], backbone_peaks


def test_folded_convs_under_bf16_autocast():
    stock = _detr_with_statistics()
    folded = copy.deepcopy(stock)
    fold_frozen_batch_norms(folded)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        maps, reference = _backbone_maps(folded, pixels), _backbone_maps(stock, pixels)
    assert maps.dtype == torch.bfloat16
    torch.testing.assert_close(maps.float(), reference.float(), rtol=0.05, atol=0.05)


class ConvLayer(nn.Module):
    """A transformers-style conv layer with a convolution bias."""

    def __init__(self) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(3, 4, 3, padding=1)
        self.normalization = DetrFrozenBatchNorm2d(4)
        self.normalization.running_var.fill_(4.0)
        self.normalization.running_mean.fill_(0.5)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.normalization(self.convolution(x)))


class ConvLayerUsingTheConvOutputTwice(ConvLayer):
    """Laid out like a transformers conv layer, but the convolution's output is used after the norm too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.convolution(x)
        return self.activation(self.normalization(conv)) + conv


def test_layers_that_compute_something_else_are_not_folded():
    layer = ConvLayerUsingTheConvOutputTwice()
    expected = layer(torch.ones(1, 3, 5, 5))
    assert fold_frozen_batch_norms(layer) == 0
    assert type(layer.convolution) is nn.Conv2d and not layer.activation.inplace
    assert isinstance(layer.normalization, FusedFrozenBatchNorm2d)  # fused, which is exact here
    torch.testing.assert_close(layer(torch.ones(1, 3, 5, 5)), expected)


def test_m2ist_on_a_folded_tower_matches_the_stock_tower():
    """Side-tuning a DETR tower whose norms are folded: same loss and adapter gradients as on the stock tower."""
    from peft import get_peft_model
    from tiny_towers import batch, build_pair, tiny_config

    results = []
    for fold in (False, True):
        pair = build_pair("detr_resnet+clip_text")
        for norm in _frozen_norms(pair):
            norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=torch.Generator().manual_seed(1)) + 0.5)
        if fold:
            assert fold_frozen_batch_norms(pair) == len(_frozen_norms(build_pair("detr_resnet+clip_text")))
        torch.manual_seed(0)
        model = get_peft_model(pair, tiny_config())
        loss = model(**batch()).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_stock, grads_stock), (loss_folded, grads_folded) = results
    torch.testing.assert_close(loss_folded, loss_stock, rtol=1e-4, atol=1e-5)
    assert grads_folded.keys() == grads_stock.keys() and grads_stock
    for name in grads_stock:
        torch.testing.assert_close(grads_folded[name], grads_stock[name], rtol=1e-3, atol=1e-5, msg=name)


def test_a_training_bias_of_a_frozen_weight_convolution_still_gets_its_gradient():
    torch.manual_seed(0)
    stock = ConvLayer()
    folded = copy.deepcopy(stock)
    assert fold_frozen_batch_norms(folded) == 1
    pixels = torch.randn(2, 3, 5, 5)
    for layer in (stock, folded):
        layer.convolution.weight.requires_grad_(False)
        layer(pixels).square().sum().backward()
    assert folded.convolution.bias.grad is not None
    torch.testing.assert_close(folded.convolution.bias.grad, stock.convolution.bias.grad)
