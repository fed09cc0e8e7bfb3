"""The registry of tower families: finding a tower, counting its blocks and resolving its taps."""

from __future__ import annotations

import pytest
from tiny_towers import bert, mobilenet_v2, vit

from peft_m2ist import VisionTextPair
from peft_m2ist.towers.layouts import (
    TOWER_LAYOUTS,
    count_blocks,
    evenly_spaced,
    get_tower,
    resolve_taps,
    tower_model_type,
)


@pytest.mark.parametrize("num_blocks,count,expected", [
    (12, 6, [1, 3, 5, 7, 9, 11]),  # BERT-base, 6 taps
    (6, 6, [0, 1, 2, 3, 4, 5]),  # DETR's encoder
    (2, 6, [0, 1]),  # more taps asked than blocks: every block
    (5, 1, [4]),  # always the last block
])
def test_evenly_spaced_blocks_always_include_the_last(num_blocks, count, expected):
    assert evenly_spaced(num_blocks, count) == expected


def test_get_tower_names_the_config_field_to_fix():
    pair = VisionTextPair(vit(), bert())
    assert get_tower(pair, "vision_model", "vision_tower") is pair.vision_model
    with pytest.raises(ValueError, match=r"M2ISTConfig\.vision_tower"):
        get_tower(pair, "image_encoder", "vision_tower")


def test_auto_taps_follow_the_layout_of_the_model_type():
    tower = bert()
    assert tower_model_type(tower) == "bert" and count_blocks(tower) == 2
    taps = resolve_taps(tower, None, None, 1, "text")
    layout = TOWER_LAYOUTS["bert"]
    assert taps.ffn == [f"encoder.layer.1.{layout.ffn}"] and taps.attention == [f"encoder.layer.1.{layout.attention}"]
    assert taps.embeddings == "embeddings"
    # CNN blocks: the block itself is both taps, and there is no embedding tap
    cnn = resolve_taps(mobilenet_v2(), None, None, 2, "vision")
    assert cnn.ffn == cnn.attention and cnn.embeddings is None


def test_explicit_ffn_taps_get_the_attention_of_their_block_and_nested_taps_are_refused():
    tower = bert()
    taps = resolve_taps(tower, ["encoder.layer.0.output"], None, 2, "text")
    assert taps.attention == ["encoder.layer.0.attention"]
    with pytest.raises(ValueError, match="must not be nested"):
        resolve_taps(tower, ["encoder.layer.0"], ["encoder.layer.0.attention"], 2, "text")
    with pytest.raises(ValueError, match="matches no module"):
        resolve_taps(tower, r"nothing\.here", None, 2, "text")


def _family(name: str):
    from tiny_families import TEXT_FAMILIES, VISION_FAMILIES

    return next(f for f in VISION_FAMILIES + TEXT_FAMILIES if f.name == name)


def _tiny_config(**overrides):
    from peft_m2ist import M2ISTConfig

    return M2ISTConfig(bottleneck_dim=8, head_hidden_size=16, head_num_hidden_layers=1, head_num_attention_heads=2,
                       head_intermediate_size=32, max_text_tokens=6, image_size=32, **overrides)


def test_yolos_detection_tokens_after_the_grid_are_read_as_prefix_tokens():
    import torch

    from peft_m2ist.towers.forward import run_vision_tower

    tower = _family("yolos").build()
    image = torch.randn(1, 3, 32, 32)
    raw = tower(pixel_values=image).last_hidden_state  # [CLS], 16 patches, 4 detection tokens
    out = run_vision_tower(tower, image, torch.ones(1, 32, 32, dtype=torch.long))
    assert tuple(out.tokens.grid) == (4, 4) and out.tokens.grid.trailing == 4 and out.tokens.prefix == 5
    # the bottom-right cell (the last token read) is the tower's token 16, not its last one (20)
    assert torch.equal(out.tokens.tensor[:, -1], raw[:, 16]) and torch.equal(out.tokens.tensor[:, :4], raw[:, 17:])


def test_a_tower_random_in_eval_mode_is_refused_by_name():
    import transformers as tf
    from peft import get_peft_model

    from peft_m2ist import VisionTextPair

    masked = tf.ViTMAEModel(tf.ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64, image_size=32, patch_size=8, mask_ratio=0.75))
    with pytest.raises(ValueError, match=r"ViTMAEModel \(model_type 'vit_mae'\).*mask_ratio=0"):
        get_peft_model(VisionTextPair(masked, bert()), _tiny_config())


@pytest.mark.parametrize("vision_family", ["deit", "swin"])
def test_explicit_and_discovered_taps_build_the_same_side_network(vision_family):
    from peft import get_peft_model

    from peft_m2ist import VisionTextPair

    family = _family(vision_family)
    discovered = get_peft_model(VisionTextPair(family.build(), bert()), _tiny_config())
    config = discovered.peft_config["default"]
    explicit = get_peft_model(VisionTextPair(family.build(), bert()), _tiny_config(
        vision_layers=list(config.vision_layers), vision_attention_layers=list(config.vision_attention_layers)))

    def side(model):
        return {n: tuple(p.shape) for n, p in model.named_parameters() if ".m2ist_side." in n}

    assert side(explicit) == side(discovered) and side(discovered)
    assert explicit.peft_config["default"].tower_shapes == config.tower_shapes
