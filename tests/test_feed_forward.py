"""The head's transformer layer: its feed-forward block keeps less for backward, with the stock outputs and
gradients (`peft_m2ist.modeling.feed_forward`).

The recomputation tests also run on CUDA where there is one (the dropout mask is drawn and replayed by another
generator there): `python -m pytest -q tests/test_feed_forward.py` on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from benchmarks.measurement import LiveTensorPeak, SavedForBackward
from peft_m2ist.modeling.feed_forward import LeanFeedForwardEncoderLayer, RecomputedReLUFeedForward

DIM, FFN, BATCH, TOKENS = 16, 128, 3, 7
PADDING = torch.tensor([[False] * 7, [False] * 5 + [True] * 2, [False] * 7])
FFN_TENSOR = BATCH * TOKENS * FFN * 4  # bytes of one (batch, tokens, ffn_dim) float32 tensor
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _saved_bytes(fn, exclude: frozenset[int] = frozenset()):
    """`fn()` and the bytes autograd keeps for backward while it runs (`benchmarks.measurement.SavedForBackward`),
    storages in `exclude` (data pointers) left out."""
    with SavedForBackward(exclude) as saved:
        out = fn()
    return out, saved.nbytes


def _rng_state(device: str) -> torch.Tensor:
    """The state of the generator dropout draws from on `device`."""
    return torch.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state()


def _step(layer: torch.nn.Module, autocast: bool = False) -> dict:
    """One forward + backward of `layer` on fixed inputs, dropout seeded: outputs, grads, saved bytes (the
    parameters left out, as in the benchmarks' account), RNG after."""
    device = next(layer.parameters()).device.type
    x = torch.randn(BATCH, TOKENS, DIM, generator=torch.Generator().manual_seed(2)).to(device).requires_grad_()
    torch.manual_seed(1)  # the same dropout masks in every layer (seeds CUDA too)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        params = frozenset(p.data_ptr() for p in layer.parameters())
        out, saved = _saved_bytes(lambda: layer(x, src_key_padding_mask=PADDING.to(device)), params)
    (out.float() * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
    return {"out": out, "saved": saved, "x_grad": x.grad, "rng": _rng_state(device),
            "grads": {n: p.grad for n, p in layer.named_parameters()}}


def _layers(dropout: float, *kinds: str, device: str = "cpu") -> list[torch.nn.Module]:
    """Layers with the same weights, in training mode: "stock" (`nn.TransformerEncoderLayer`), "lean", "recomputed"."""
    torch.manual_seed(0)
    stock = torch.nn.TransformerEncoderLayer(DIM, 2, FFN, dropout, batch_first=True)
    built = {"stock": stock, "lean": LeanFeedForwardEncoderLayer(DIM, 2, FFN, dropout, batch_first=True),
             "recomputed": LeanFeedForwardEncoderLayer(DIM, 2, FFN, dropout, batch_first=True, recompute_hidden=True)}
    for layer in built.values():
        layer.load_state_dict(stock.state_dict())
        layer.train()
    return [built[k].to(device) for k in kinds]


def _assert_same_step(a: dict, b: dict, **tol) -> None:
    if not tol and a["out"].is_cuda:  # CUDA's matmuls may sum in another order than autograd's own
        tol = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(b["out"], a["out"], rtol=0, atol=0)
    torch.testing.assert_close(b["x_grad"], a["x_grad"], **tol)
    assert a["grads"].keys() == b["grads"].keys()
    for name in a["grads"]:
        torch.testing.assert_close(b["grads"][name], a["grads"][name], msg=name, **tol)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lean_feed_forward_matches_the_stock_layer_and_keeps_less_for_backward(dropout):
    torch.manual_seed(0)
    stock = torch.nn.TransformerEncoderLayer(16, 2, 128, dropout, batch_first=True).train()
    lean = LeanFeedForwardEncoderLayer(16, 2, 128, dropout, batch_first=True).train()
    lean.load_state_dict(stock.state_dict())
    padding = torch.tensor([[False] * 7, [False] * 5 + [True] * 2, [False] * 7])
    results = []
    for layer in (stock, lean):
        x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
        torch.manual_seed(1)  # the same dropout masks in both layers
        out, saved = _saved_bytes(lambda layer=layer, x=x: layer(x, src_key_padding_mask=padding))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out, saved, x.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (out_a, saved_a, xgrad_a, grads_a), (out_b, saved_b, xgrad_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    torch.testing.assert_close(xgrad_b, xgrad_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)
    ffn_tensor = 3 * 7 * 128 * 4  # bytes of one (batch, tokens, ffn_dim) float32 tensor
    # stock keeps the ReLU output, the dropout mask (float on CPU) and the dropout output; without dropout the
    # ReLU output is the next Linear's input too, so only one tensor is saved either way
    assert saved_a - saved_b == (2 * ffn_tensor if dropout else 0), (saved_a, saved_b)


def test_lean_feed_forward_keeps_the_inference_fast_path_and_refuses_other_activations():
    layer = LeanFeedForwardEncoderLayer(16, 2, 32, 0.1, batch_first=True).eval()
    stock = torch.nn.TransformerEncoderLayer(16, 2, 32, 0.1, batch_first=True).eval()
    stock.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), stock(x))
    assert layer.activation_relu_or_gelu == stock.activation_relu_or_gelu
    with pytest.raises(ValueError, match="ReLU"):
        LeanFeedForwardEncoderLayer(16, 2, 32, 0.1, activation="gelu")
    with pytest.raises(ValueError, match="ReLU"):
        LeanFeedForwardEncoderLayer(16, 2, 32, 0.1, torch.nn.functional.gelu)  # positionally too
    assert LeanFeedForwardEncoderLayer(16, 2, 32, 0.1, torch.nn.ReLU()).activation_relu_or_gelu == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_recomputed_feed_forward_matches_the_stock_layer_and_keeps_no_hidden_tensor(dropout, device):
    stock, recomputed = _layers(dropout, "stock", "recomputed", device=device)
    a, b = _step(stock), _step(recomputed)
    _assert_same_step(a, b)  # the dropout masks are replayed in backward, so the gradients are the stock ones
    # stock keeps the ReLU output, the dropout mask (float on CPU, bool on CUDA) and the dropout output (with
    # dropout 0 the ReLU output only); the recomputing block keeps none of them, only its input, which linear1
    # keeps anyway
    mask = FFN_TENSOR if device == "cpu" else FFN_TENSOR // 4
    assert a["saved"] - b["saved"] == (2 * FFN_TENSOR + mask if dropout else FFN_TENSOR), (a["saved"], b["saved"])


def test_recomputed_feed_forward_works_without_biases():
    torch.manual_seed(0)
    stock = torch.nn.TransformerEncoderLayer(DIM, 2, FFN, 0.3, batch_first=True, bias=False).train()
    recomputed = LeanFeedForwardEncoderLayer(DIM, 2, FFN, 0.3, batch_first=True, bias=False, recompute_hidden=True)
    recomputed.load_state_dict(stock.state_dict())
    _assert_same_step(_step(stock), _step(recomputed.train()))


@pytest.mark.parametrize("device", DEVICES)
def test_recomputing_leaves_the_random_stream_where_the_stock_layer_leaves_it(device):
    stock, recomputed = _layers(0.3, "stock", "recomputed", device=device)
    assert torch.equal(_step(recomputed)["rng"], _step(stock)["rng"])  # the replay runs on a forked generator


@pytest.mark.parametrize("device", DEVICES)
def test_recomputed_feed_forward_replays_the_masks_of_interleaved_layers(device):
    """Two layers' forwards draw masks one after the other; each layer's backward must replay its own."""
    stored = torch.nn.Sequential(*_layers(0.3, "lean", "lean", device=device))
    recomputed = torch.nn.Sequential(*_layers(0.3, "recomputed", "recomputed", device=device))
    recomputed.load_state_dict(stored.state_dict())
    runs = []
    for model in (stored, recomputed):
        x = torch.randn(BATCH, TOKENS, DIM, generator=torch.Generator().manual_seed(2)).to(device).requires_grad_()
        torch.manual_seed(1)
        model(x).square().sum().backward()
        runs.append([x.grad] + [p.grad for p in model.parameters()])
    tol = {} if device == "cpu" else {"rtol": 1e-4, "atol": 1e-5}
    for got, want in zip(runs[1], runs[0]):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_recomputed_feed_forward_under_bf16_autocast_matches_the_stored_one(device):
    stored, recomputed = _layers(0.3, "lean", "recomputed", device=device)
    a, b = _step(stored, autocast=True), _step(recomputed, autocast=True)
    assert b["out"].dtype == a["out"].dtype
    assert all(g.dtype == torch.float32 for g in b["grads"].values())  # float32 parameters get float32 gradients
    _assert_same_step(a, b, rtol=2e-2, atol=2e-2)  # recomputed in bf16, as the forward computed it
    # stored: the bf16 hidden tensor and autocast's bf16 copies of both weights; recomputed: neither (the float32
    # weights are cast again in backward) and the same bf16 copy of the input
    assert a["saved"] - b["saved"] == FFN_TENSOR // 2 + 2 * FFN * DIM * 2, (a["saved"], b["saved"])


def test_recomputing_applies_only_with_gradients_and_keeps_the_inference_fast_path():
    stock, recomputed = _layers(0.3, "stock", "recomputed")
    x = torch.randn(2, 5, DIM)
    with torch.no_grad():
        torch.testing.assert_close(recomputed.eval()(x), stock.eval()(x))
        recomputed.train()
        torch.manual_seed(1)
        out = recomputed(x)
    assert not out.requires_grad


def test_recomputing_forward_holds_no_more_than_dropout_needs():
    """While the block's dropout runs, only its input, its mask (float on CPU) and its output are alive."""
    torch.manual_seed(0)
    linear1, linear2 = torch.nn.Linear(DIM, FFN), torch.nn.Linear(FFN, DIM)
    x = torch.randn(BATCH, TOKENS, DIM, requires_grad=True)
    with LiveTensorPeak() as tracker:
        RecomputedReLUFeedForward.apply(x, linear1.weight, linear1.bias, linear2.weight, linear2.bias, 0.3, True)
    assert tracker.peak <= 3 * FFN_TENSOR + BATCH * TOKENS * DIM * 4, (tracker.peak, tracker.peak_op)
