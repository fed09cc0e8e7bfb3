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
