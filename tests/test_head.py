"""The grounding head on its own: shapes, box range, the grid encoding, and clear errors."""

from __future__ import annotations

import pytest
import torch

from peft_m2ist.head import GroundingHead, sine_grid_encoding


def _head(**kw) -> GroundingHead:
    args = dict(dim=16, num_layers=1, num_heads=2, ffn_dim=32, dropout=0.0, max_text_tokens=5, num_vision_tokens=6)
    args.update(kw)
    return GroundingHead(**args).eval()


def test_boxes_are_cxcywh_in_unit_range():
    head = _head(vision_grid=(2, 3))
    boxes = head(torch.randn(3, 4, 16), torch.ones(3, 4, dtype=torch.long), torch.randn(3, 6, 16))
    assert boxes.shape == (3, 4) and ((boxes > 0) & (boxes < 1)).all()


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
