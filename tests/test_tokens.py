"""Token utilities: module outputs as token sequences, patch grids, pooling taps onto a grid, grid token masks."""

from __future__ import annotations

import pytest
import torch

from peft_m2ist.towers.tokens import (
    Tokens,
    find_patch_grid,
    grid_token_mask,
    match_grid,
    output_tensor,
    to_tokens,
)


@pytest.mark.parametrize(
    "patch_size,image_size,num_tokens,expected",
    [
        (8, (32, 32), 17, ((4, 4), 1)),  # ViT: [CLS] + 4 x 4
        (8, (32, 32), 16, ((4, 4), 0)),  # SigLIP: patches only
        (14, (224, 224), 261, ((16, 16), 5)),  # DINOv2 with registers: [CLS] + 4 registers + 16 x 16
        ([8, 4], (32, 32), 33, ((4, 8), 1)),  # non-square patches
        (4, (32, 32), 17, None),  # fewer tokens than patches: a tower that merges patches (Swin)
        (8, (32, 32), 60, None),  # far more tokens than patches
    ],
)
def test_find_patch_grid_fits_the_token_count_or_gives_none(patch_size, image_size, num_tokens, expected):
    tower = torch.nn.Module()
    tower.config = type("Config", (), {"patch_size": patch_size})()
    assert find_patch_grid(tower, image_size, num_tokens) == expected


def test_towers_without_a_patch_size_get_no_grid():
    assert find_patch_grid(torch.nn.Linear(2, 2), (32, 32), 17) is None


def test_a_feature_map_tap_is_not_pooled_onto_a_grid_with_a_cls_token():
    tap = Tokens(torch.randn(1, 64, 8), (8, 8))
    with pytest.raises(ValueError, match="outside it"):
        match_grid(tap, 17, (4, 4))
    assert match_grid(tap, 16, (4, 4)).shape == (1, 16, 8)


def test_feature_maps_become_row_major_tokens_with_their_grid():
    feature_map = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    tokens = to_tokens(feature_map)
    assert tokens.tensor.shape == (2, 8, 3) and tokens.grid == (2, 4) and tokens.prefix == 0
    torch.testing.assert_close(tokens.tensor[:, 5], feature_map[:, :, 1, 1])  # row 1, column 1
    sequence = torch.randn(2, 5, 3)
    assert to_tokens(sequence).tensor is sequence and to_tokens(sequence).grid is None
    with pytest.raises(ValueError, match="batch, tokens, dim"):
        to_tokens(torch.randn(2, 3))


def test_a_larger_feature_map_tap_is_average_pooled_onto_the_final_grid():
    tap = to_tokens(torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4))
    pooled = match_grid(tap, 4, (2, 2))
    torch.testing.assert_close(pooled[0, :, 0], torch.tensor([2.5, 4.5, 10.5, 12.5]))
    with pytest.raises(ValueError, match="only feature maps"):
        match_grid(Tokens(torch.randn(1, 7, 2)), 4, (2, 2))


def test_grid_token_mask_samples_the_pixel_mask_and_keeps_prefix_tokens():
    pixel_mask = torch.ones(1, 8, 8, dtype=torch.long)
    pixel_mask[:, :, 4:] = 0  # right half padded
    assert grid_token_mask(pixel_mask, (2, 2)).tolist() == [[1, 0, 1, 0]]
    assert grid_token_mask(pixel_mask, (2, 2), prefix=1).tolist() == [[1, 1, 0, 1, 0]]


def test_output_tensor_takes_the_main_tensor_of_any_module_output():
    x = torch.randn(1, 2, 3)
    assert output_tensor(x) is x and output_tensor((x, None)) is x
    assert output_tensor(type("Out", (), {"last_hidden_state": x})()) is x
    with pytest.raises(TypeError, match="Cannot take a tensor"):
        output_tensor({"x": x})
