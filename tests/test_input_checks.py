"""Clear errors naming the argument instead of torch errors: token ids, empty batches, non-finite pixels, malformed
`tower_shapes`, damaged adapter configs and absurd sizes."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_towers import VOCAB, batch, build_pair, tiny_config

from peft_m2ist import M2ISTConfig, M2ISTTapLayer
from peft_m2ist.tuner.budget import MAX_MODULE_PARAMETERS


@pytest.fixture(scope="module", params=["vit+bert", "clip"])
def model(request):
    return get_peft_model(build_pair(request.param), tiny_config())


def _set_token(b, value):
    b["input_ids"][1, 2] = value


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda b: _set_token(b, VOCAB), rf"`input_ids` contains the token id {VOCAB} but the text tower's vocabulary "
                                         rf"has {VOCAB} tokens"),
        (lambda b: _set_token(b, VOCAB + 1000), rf"`input_ids` contains the token id {VOCAB + 1000}"),
        (lambda b: _set_token(b, -100), "`input_ids` contains the negative token id -100"),
        (lambda b: b.update({k: v[:0] for k, v in b.items()}), r"`pixel_values` holds no images \(batch size 0\)"),
        (lambda b: b["pixel_values"].__setitem__((0, 1, 2, 3), float("nan")), "`pixel_values` contains NaN or inf"),
        (lambda b: b["pixel_values"].__setitem__((1, 0, 0, 0), float("-inf")), "`pixel_values` contains NaN or inf"),
    ],
)
def test_bad_values_are_named(model, change, match):
    inputs = batch()
    change(inputs)
    with pytest.raises(ValueError, match=match):
        model(**inputs)
    with pytest.raises(ValueError, match=match):
        model.encode_towers(**{k: v for k, v in inputs.items() if k != "labels"})
    assert not model.base_model._m2ist_recorder.active
    assert model(**batch()).pred_boxes.shape == (2, 4)


def test_the_largest_valid_token_id_passes(model):
    inputs = batch()
    inputs["input_ids"][0, 0] = VOCAB - 1
    inputs["input_ids"][1, 0] = 0
    assert torch.isfinite(model(**inputs).loss)


SHAPES = {"stream_dim": 32, "num_tokens": 17, "grid": [4, 4], "ffn_dims": [32], "attention_dims": [32],
          "has_embedding": True, "prefix_tokens": 1, "patch_grid": True}


@pytest.mark.parametrize(
    "tower_shapes,match",
    [
        ("x", r"`tower_shapes` is filled automatically and must be None or a mapping"),
        ({"vision": SHAPES}, r"exactly the keys 'vision' and 'text'"),
        ({"vision": SHAPES, "text": SHAPES, "audio": SHAPES}, r"exactly the keys 'vision' and 'text'"),
        ({"vision": SHAPES, "text": [1, 2]}, r"`tower_shapes\['text'\]` must be a mapping"),
        ({"vision": {**SHAPES, "stream_dim": "32"}, "text": SHAPES},
         r"`tower_shapes\['vision'\]\['stream_dim'\]` must be a positive integer, got '32'"),
        ({"vision": SHAPES, "text": {**SHAPES, "grid": [4]}}, r"`tower_shapes\['text'\]\['grid'\]` must be null"),
        ({"vision": SHAPES, "text": {**SHAPES, "ffn_dims": [32, -1]}}, r"\['ffn_dims'\]` must be a list of positive"),
        ({"vision": {**SHAPES, "has_embedding": "yes"}, "text": SHAPES}, r"\['has_embedding'\]` must be true or"),
        ({"vision": {**SHAPES, "prefix_tokens": -1}, "text": SHAPES}, r"\['prefix_tokens'\]` must be a non-negative"),
    ],
)
def test_malformed_tower_shapes_are_refused(tower_shapes, match):
    with pytest.raises(ValueError, match=match):
        M2ISTConfig(tower_shapes=tower_shapes)


def test_well_formed_tower_shapes_pass():
    assert M2ISTConfig(tower_shapes={"vision": SHAPES, "text": {**SHAPES, "grid": None}}).tower_shapes


@pytest.mark.parametrize(
    "content,match",
    [
        (b'{"peft_type": "M2IST", ', "is not valid JSON"),
        (b"\xff\xfe\x00garbage", "is not valid JSON"),
        (b"[1, 2, 3]", "must hold a JSON object, got list"),
    ],
)
def test_a_damaged_adapter_config_names_the_file(tmp_path, content, match):
    get_peft_model(build_pair("vit+bert"), tiny_config()).save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config_file.write_bytes(content)
    expected = re.escape(str(config_file)) + ".*" + match
    with pytest.raises(ValueError, match=expected):
        PeftModel.from_pretrained(build_pair("vit+bert"), tmp_path)
    with pytest.raises(ValueError, match=expected):
        M2ISTConfig.from_pretrained(tmp_path)


def test_an_intact_adapter_config_still_loads(tmp_path):
    get_peft_model(build_pair("vit+bert"), tiny_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert M2ISTConfig.from_pretrained(tmp_path).head_hidden_size == config["head_hidden_size"]


@pytest.mark.parametrize(
    "overrides,module",
    [
        ({"head_intermediate_size": 2**40}, "grounding head"),
        ({"head_hidden_size": 2**21, "head_num_attention_heads": 2}, "side network"),
        ({"bottleneck_dim": 2**36}, "side network"),
    ],
)
def test_absurd_sizes_are_refused_before_allocating(overrides, module):
    pair = build_pair("vit+bert")
    with pytest.raises(ValueError, match=rf"The {module} of this adapter would allocate [\d,]+ parameters") as info:
        get_peft_model(pair, tiny_config(**overrides))
    count = int(re.search(r"allocate ([\d,]+) parameters", str(info.value)).group(1).replace(",", ""))
    assert count > MAX_MODULE_PARAMETERS
    assert f"{MAX_MODULE_PARAMETERS:,}" in str(info.value)
    assert not any(isinstance(m, M2ISTTapLayer) for m in pair.modules())
    assert "peft_config" not in pair.__dict__
