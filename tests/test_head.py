"""The grounding head on its own: shapes, box range, the grid encoding, and clear errors."""

from __future__ import annotations

import pytest
import torch

from benchmarks.measurement import SavedForBackward
from peft_m2ist import M2ISTConfig
from peft_m2ist.modeling.head import (
    GroundingHead,
    PointerBox,
    grid_cell_centres,
    sine_grid_encoding,
)


def _head(num_vision_tokens: int = 6, vision_grid: tuple[int, int] | None = None, vision_prefix_tokens: int = 0,
          **fields) -> GroundingHead:
    """A small head built from an `M2ISTConfig` whose head fields default to a 16-wide, 1-layer head."""
    sizes = dict(head_hidden_size=16, head_num_hidden_layers=1, head_num_attention_heads=2, head_intermediate_size=32,
                 head_dropout=0.0, max_text_tokens=5)
    config = M2ISTConfig(**{**sizes, **fields})
    return GroundingHead(config, num_vision_tokens, vision_grid, vision_prefix_tokens).eval()


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


def test_pointer_never_points_at_prefix_tokens():
    pointer = PointerBox(8, 7, (2, 3), prefix_tokens=1)
    reg, vision = torch.randn(2, 8), torch.randn(2, 7, 8)
    before = pointer(reg, vision, torch.ones(2, 7))
    vision[:, 0] = torch.randn(2, 8) * 100  # a [CLS] token that would win any pointer contest
    torch.testing.assert_close(pointer(reg, vision, torch.ones(2, 7)), before, rtol=0, atol=1e-6)


def test_grid_that_does_not_fit_after_the_prefix_is_dropped():
    head = _head(num_vision_tokens=7, vision_grid=(2, 3), vision_prefix_tokens=1)
    assert head.pointer.token_centres.shape == (6, 2) and head.vision_grid_encoding.shape == (1, 7, 16)
    unfit = _head(num_vision_tokens=7, vision_grid=(2, 3))  # 7 tokens, 6 cells, no prefix declared
    assert unfit.vision_grid_encoding is None and unfit.pointer.prefix_tokens == 0
    assert isinstance(unfit.pointer.token_centres, torch.nn.Parameter)


def test_unknown_box_head_is_refused():
    with pytest.raises(ValueError, match=r"`box_head` must be one of \('pointer', 'mlp'\), got 'argmax'"):
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


THREE_LAYERS = dict(head_num_hidden_layers=3, head_intermediate_size=256, head_dropout=0.1)


def _saved_bytes(fn):
    """`fn()` and the bytes autograd keeps for backward while it runs (`benchmarks.measurement.SavedForBackward`)."""
    with SavedForBackward() as saved:
        out = fn()
    return out, saved.nbytes


def test_gradient_checkpointing_gives_the_same_boxes_and_gradients_for_less_memory():
    torch.manual_seed(0)
    plain = _head(**THREE_LAYERS, vision_grid=(2, 3)).train()
    ckpt = _head(**THREE_LAYERS, vision_grid=(2, 3), head_gradient_checkpointing=True).train()
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
    head = _head(head_num_hidden_layers=2, head_gradient_checkpointing=True)  # eval mode
    text, mask, vision = torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.long), torch.randn(2, 6, 16)
    head(text, mask, vision)
    head.train()
    with torch.no_grad():
        head(text, mask, vision)
    assert calls == []
    head(text, mask, vision).sum().backward()
    assert len(calls) == 2  # one per layer


def test_recomputed_feed_forward_gives_the_same_boxes_and_gradients_without_the_hidden_tensors():
    torch.manual_seed(0)
    stored = _head(**THREE_LAYERS, vision_grid=(2, 3), head_recompute_feed_forward=False).train()
    recomputed = _head(**THREE_LAYERS, vision_grid=(2, 3)).train()  # the default
    recomputed.load_state_dict(stored.state_dict())
    text, mask, vision = torch.randn(4, 5, 16), torch.tensor([[1] * 5, [1] * 3 + [0] * 2] * 2), torch.randn(4, 6, 16)
    results = []
    for head in (stored, recomputed):
        torch.manual_seed(1)
        boxes, saved = _saved_bytes(lambda head=head: head(text, mask, vision))
        boxes.sum().backward()
        results.append((boxes, saved, {n: p.grad for n, p in head.named_parameters()}))
    (boxes_a, saved_a, grads_a), (boxes_b, saved_b, grads_b) = results
    torch.testing.assert_close(boxes_b, boxes_a, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)
    # per layer: one (batch, 1 + 5 + 6 tokens, ffn_dim) float32 tensor less; linear1's bias, a parameter counted
    # here (the benchmarks' account leaves parameters out), more
    assert saved_a - saved_b == 3 * (4 * 12 * 256 * 4 - 256 * 4), (saved_a, saved_b)


def test_checkpointed_layers_do_not_recompute_their_feed_forward_twice():
    def recompute(**fields) -> list[bool]:
        return [layer.recompute_hidden for layer in _head(head_num_hidden_layers=2, **fields).encoder.layers]

    assert all(recompute())
    assert not any(recompute(head_gradient_checkpointing=True))
    assert not any(recompute(head_recompute_feed_forward=False))
