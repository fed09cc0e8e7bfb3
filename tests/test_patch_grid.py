"""Patch towers (ViT, CLIP, DINOv2): their patch tokens get a grid, padded patches a 0 in the token mask."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_towers import batch, build_pair, tiny_config

PATCH_PAIRS = ["vit+bert", "clip", "dual_encoder(vit+bert)", "dinov2+roberta"]


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
        padded = features.vision_mask[0].eq(0)
        features.vision[0, padded] = torch.randn(int(padded.sum()), features.vision.shape[-1]) * 100
        for name in [k for k in features.taps if "vision_model" in k]:
            features.taps[name][0, padded] = torch.randn(int(padded.sum()), features.taps[name].shape[-1]) * 100
        after = model(tower_features=features).pred_boxes
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
