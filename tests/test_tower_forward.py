"""Running the frozen towers: patch grids and token masks, NaFlex patches, image sizes, eval mode."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from tiny_towers import IMAGE_SIZE, siglip2_vision

from peft_m2ist.towers.forward import default_image_size, naflex_inputs, run_vision_tower


def _vit(**config):
    return tf.ViTModel(tf.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, **config)).eval()


def test_padded_patches_are_masked_and_the_cls_token_is_kept():
    tower = _vit(image_size=IMAGE_SIZE, patch_size=8)
    pixel_mask = torch.ones(2, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.long)
    pixel_mask[0, :, 16:] = 0  # right half padding: patch columns 2 and 3
    pixel_mask[1, 24:] = 0  # bottom quarter padding: patch row 3
    out = run_vision_tower(tower, torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE), pixel_mask)
    assert out.tokens.grid == (4, 4) and out.tokens.prefix == 1 and out.patch_grid
    expected_first = torch.tensor([1] + [1, 1, 0, 0] * 4)
    expected_second = torch.tensor([1] + [1] * 12 + [0] * 4)
    torch.testing.assert_close(out.mask, torch.stack([expected_first, expected_second]))
    assert run_vision_tower(tower, torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE), None).mask is None


def test_siglip2_towers_get_the_patches_their_image_processor_would_cut():
    """NaFlex (SigLIP2) towers take flattened patches: (patch row, patch column, channel), row-major over the grid."""
    tower = siglip2_vision().eval()
    images = torch.randn(2, 3, 32, 24)
    inputs = naflex_inputs(tower, images)
    assert inputs["pixel_values"].shape == (2, 4 * 3, 8 * 8 * 3)
    assert inputs["spatial_shapes"].tolist() == [[4, 3], [4, 3]] and inputs["pixel_attention_mask"].all()
    for row, col in [(0, 0), (1, 2), (3, 1)]:
        cut = images[:, :, row * 8 : (row + 1) * 8, col * 8 : (col + 1) * 8].permute(0, 2, 3, 1).flatten(1)
        torch.testing.assert_close(inputs["pixel_values"][:, row * 3 + col], cut)

    out = run_vision_tower(tower, images, None)
    with torch.no_grad():
        direct = tower(**inputs).last_hidden_state
    torch.testing.assert_close(out.tokens.tensor, direct)
    assert (out.tokens.grid, out.tokens.prefix, out.patch_grid) == ((4, 3), 0, True)
    # no `image_size` in a SigLIP2 config: the probe's default image covers its grid of position embeddings
    assert default_image_size(tower) == 32
    with pytest.raises(ValueError, match="cuts them into patches itself"):
        run_vision_tower(tower, inputs["pixel_values"], None)
