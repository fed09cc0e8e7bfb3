"""Patch towers (ViT, CLIP, DINOv2): their patch tokens get a grid, padded patches a 0 in the token mask."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from peft import get_peft_model
from tiny_towers import IMAGE_SIZE, batch, build_pair, tiny_config

from peft_m2ist.towers import Tokens, match_grid, patch_grid, run_vision_tower

PATCH_PAIRS = ["vit+bert", "clip", "dual_encoder(vit+bert)", "dinov2+roberta"]


def _vit(**config):
    return tf.ViTModel(tf.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, **config)).eval()


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
def test_patch_grid_fits_the_token_count_or_gives_none(patch_size, image_size, num_tokens, expected):
    tower = torch.nn.Module()
    tower.config = type("Config", (), {"patch_size": patch_size})()
    assert patch_grid(tower, image_size, num_tokens) == expected


def test_towers_without_a_patch_size_get_no_grid():
    assert patch_grid(torch.nn.Linear(2, 2), (32, 32), 17) is None


def test_padded_patches_are_masked_and_the_cls_token_is_kept():
    tower = _vit(image_size=IMAGE_SIZE, patch_size=8)
    pixel_mask = torch.ones(2, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.long)
    pixel_mask[0, :, 16:] = 0  # right half padding: patch columns 2 and 3
    pixel_mask[1, 24:] = 0  # bottom quarter padding: patch row 3
    out = run_vision_tower(tower, torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE), pixel_mask)
    assert out.tokens.grid == (4, 4) and out.tokens.prefix == 1 and out.patches
    expected_first = torch.tensor([1] + [1, 1, 0, 0] * 4)
    expected_second = torch.tensor([1] + [1] * 12 + [0] * 4)
    torch.testing.assert_close(out.mask, torch.stack([expected_first, expected_second]))
    assert run_vision_tower(tower, torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE), None).mask is None


def test_a_feature_map_tap_is_not_pooled_onto_a_grid_with_a_cls_token():
    tap = Tokens(torch.randn(1, 64, 8), (8, 8))
    with pytest.raises(ValueError, match="outside it"):
        match_grid(tap, 17, (4, 4))
    assert match_grid(tap, 16, (4, 4)).shape == (1, 16, 8)


@pytest.mark.parametrize("pair_name", PATCH_PAIRS)
def test_patch_pairs_record_their_grid_and_the_pointer_uses_the_cells(pair_name):
    model = get_peft_model(build_pair(pair_name), tiny_config())
    shapes = model.peft_config["default"].tower_shapes["vision"]
    assert (shapes["num_tokens"], shapes["grid"], shapes["prefix_tokens"], shapes["patch_grid"]) == (17, [4, 4], 1, True)
    head = model.base_model.m2ist_head["default"]
    assert head.pointer.token_centres.shape == (16, 2) and head.pointer.prefix_tokens == 1
    assert not any("token_centres" in name for name, _ in head.named_parameters())  # fixed cells, nothing learned
    assert head.vision_grid_encoding.shape == (1, 17, 16) and not head.vision_grid_encoding[0, 0].any()


@pytest.mark.parametrize("interaction", ["shared", "cross_attention"])
def test_padded_patches_do_not_change_the_prediction(interaction):
    model = get_peft_model(build_pair("vit+bert"), tiny_config(interaction=interaction)).eval()
    inputs = batch(labels=False)
    inputs["pixel_mask"][:, :, 16:] = 0
    features = model.base_model.encode_towers(**inputs)
    with torch.no_grad():
        before = model(tower_features=features).pred_boxes
        # what a padded patch holds reaches the head only as a masked key: the prediction must not move
        padded = features["vision_mask"][0].eq(0)
        features["vision"][0, padded] = torch.randn(int(padded.sum()), features["vision"].shape[-1]) * 100
        for name in [k for k in features if k.startswith("tap:") and "vision_model" in k]:
            features[name][0, padded] = torch.randn(int(padded.sum()), features[name].shape[-1]) * 100
        after = model(tower_features=features).pred_boxes
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
