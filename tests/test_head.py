"""The grounding head on its own: shapes, box range, the grid encoding, and clear errors."""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import SavedForBackward
from peft_m2ist.head import (
    GroundingHead,
    LeanFeedForwardEncoderLayer,
    PointerBox,
    grid_cell_centres,
    sine_grid_encoding,
)


def _head(**kw) -> GroundingHead:
    args = dict(dim=16, num_layers=1, num_heads=2, ffn_dim=32, dropout=0.0, max_text_tokens=5, num_vision_tokens=6)
    args.update(kw)
    return GroundingHead(**args).eval()


@pytest.mark.parametrize("box_head", ["pointer", "mlp"])
@pytest.mark.parametrize("grid", [(2, 3), None])
def test_boxes_are_cxcywh_in_unit_range(box_head, grid):
    head = _head(vision_grid=grid, box_head=box_head)
    boxes = head(torch.randn(3, 4, 16), torch.ones(3, 4, dtype=torch.long), torch.randn(3, 6, 16))
    assert boxes.shape == (3, 4) and ((boxes >= 0) & (boxes <= 1)).all()
    assert hasattr(head, "pointer") == (box_head == "pointer") and hasattr(head, "box_mlp") == (box_head == "mlp")


def test_cell_centres_are_row_major_xy():
    centres = grid_cell_centres((2, 3))
    torch.testing.assert_close(centres[0], torch.tensor([1 / 6, 1 / 4]))
    torch.testing.assert_close(centres[5], torch.tensor([5 / 6, 3 / 4]))


def test_pointer_centre_is_the_pointed_cell_plus_at_most_one_cell():
    pointer = PointerBox(8, 6, (2, 3))
    with torch.no_grad():  # point hard at token 4 (x = 1/2, y = 3/4): its key matches the query, the others do not
        pointer.query.weight.copy_(torch.eye(8) * 50)
        pointer.query.bias.zero_()
        pointer.key.weight.copy_(torch.eye(8))
        pointer.key.bias.zero_()
    reg = torch.zeros(1, 8)
    reg[0, 0] = 1.0
    vision = torch.zeros(1, 6, 8)
    vision[0, 4, 0] = 1.0
    box = pointer(reg, vision, torch.ones(1, 6))
    assert abs(box[0, 0] - 0.5) <= 1 / 3 + 1e-6 and abs(box[0, 1] - 0.75) <= 1 / 2 + 1e-6
    with torch.no_grad():
        pointer.mlp[-1].weight.zero_()
        pointer.mlp[-1].bias.zero_()
    torch.testing.assert_close(pointer(reg, vision, torch.ones(1, 6))[0, :2], torch.tensor([0.5, 0.75]), atol=1e-4,
                               rtol=0)


def test_pointer_ignores_padded_vision_tokens():
    head = _head(vision_grid=(2, 3))
    text, vision = torch.randn(1, 3, 16), torch.randn(1, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    before = head(text, torch.ones(1, 3, dtype=torch.long), vision, mask)
    vision[0, 4:] = torch.randn(2, 16) * 100
    torch.testing.assert_close(head(text, torch.ones(1, 3, dtype=torch.long), vision, mask), before, rtol=0,
                               atol=1e-5)


def test_unknown_box_head_is_refused():
    with pytest.raises(ValueError, match="box_head"):
        _head(box_head="argmax")


def test_grid_encoding_tells_cells_apart_and_is_not_saved():
    encoding = sine_grid_encoding((4, 4), 16)[0]
    assert encoding.shape == (16, 16)
    assert torch.cdist(encoding, encoding).add(torch.eye(16) * 10).min() > 1e-3
    head = _head(vision_grid=(2, 3))
    assert "vision_grid_encoding" not in head.state_dict()
    assert _head(vision_grid=None).vision_grid_encoding is None


def test_padding_does_not_change_the_prediction():
    head = _head()
    text, vision = torch.randn(1, 3, 16), torch.randn(1, 6, 16)
    short = head(text, torch.ones(1, 3, dtype=torch.long), vision)
    padded_text = torch.cat([text, torch.randn(1, 2, 16)], dim=1)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    torch.testing.assert_close(head(padded_text, mask, vision), short, rtol=0, atol=1e-5)


def test_wrong_sizes_raise():
    head = _head()
    with pytest.raises(ValueError, match="text tokens"):
        head(torch.randn(1, 6, 16), torch.ones(1, 6, dtype=torch.long), torch.randn(1, 6, 16))
    with pytest.raises(ValueError, match="vision tokens"):
        head(torch.randn(1, 2, 16), torch.ones(1, 2, dtype=torch.long), torch.randn(1, 5, 16))


def _saved_bytes(fn):
    """`fn()` and the bytes autograd keeps for backward while it runs (`benchmarks.common.SavedForBackward`)."""
    with SavedForBackward() as saved:
        out = fn()
    return out, saved.nbytes


def test_gradient_checkpointing_gives_the_same_boxes_and_gradients_for_less_memory():
    torch.manual_seed(0)
    plain = _head(num_layers=3, ffn_dim=256, dropout=0.1, vision_grid=(2, 3)).train()
    ckpt = _head(num_layers=3, ffn_dim=256, dropout=0.1, vision_grid=(2, 3), gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    text, mask = torch.randn(4, 5, 16), torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 5, [1] * 4 + [0]])
    vision = torch.randn(4, 6, 16)
    results = []
    for head in (plain, ckpt):
        torch.manual_seed(1)  # the same dropout masks in both runs; checkpointing replays them in backward
        boxes, saved = _saved_bytes(lambda head=head: head(text, mask, vision))
        boxes.sum().backward()
        results.append((boxes, saved, {n: p.grad for n, p in head.named_parameters()}))
    (boxes_a, saved_a, grads_a), (boxes_b, saved_b, grads_b) = results
    torch.testing.assert_close(boxes_b, boxes_a)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)
    assert saved_b < saved_a / 2, (saved_a, saved_b)


def test_gradient_checkpointing_runs_only_when_training_with_gradients(monkeypatch):
    import torch.utils.checkpoint

    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    head = _head(num_layers=2, gradient_checkpointing=True)  # eval mode
    text, mask, vision = torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.long), torch.randn(2, 6, 16)
    head(text, mask, vision)
    head.train()
    with torch.no_grad():
        head(text, mask, vision)
    assert calls == []
    head(text, mask, vision).sum().backward()
    assert len(calls) == 2  # one per layer


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
