"""BERT-family text towers: the language expert reads the FFN output before the residual and the LayerNorm
(`output.dense`), as every other family's `mlp` tap does and as the authors' language expert does."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_towers import batch, bert, roberta, tiny_config, vit

from peft_m2ist import VisionTextPair


@pytest.mark.parametrize("text_tower", [bert, roberta], ids=["bert", "roberta"])
def test_language_expert_reads_the_ffn_output_before_residual_and_norm(text_tower):
    torch.manual_seed(0)
    pair = VisionTextPair(vit(), text_tower()).eval()
    model = get_peft_model(pair, tiny_config())
    config = model.peft_config["default"]
    assert config.text_layers == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    text = model.base_model.model.text_model
    side = model.base_model.m2ist_side["default"]
    dense_out, output_out, expert_in = {}, {}, {}
    handles = []
    for i, layer in enumerate(text.encoder.layer):
        dense = layer.output.dense.get_base_layer()  # the tap wraps the tower's own Linear
        assert isinstance(dense, torch.nn.Linear)
        handles.append(dense.register_forward_hook(lambda m, a, o, i=i: dense_out.__setitem__(i, o.detach())))
        handles.append(layer.output.register_forward_hook(lambda m, a, o, i=i: output_out.__setitem__(i, o.detach())))
        handles.append(side.blocks[i].language_expert.register_forward_pre_hook(
            lambda m, a, i=i: expert_in.__setitem__(i, a[0].detach())))
    inputs = batch(labels=False)
    model.eval()
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    assert sorted(expert_in) == [0, 1]
    for i in range(2):
        torch.testing.assert_close(expert_in[i], dense_out[i], rtol=0, atol=0)
        # the whole output module (residual + LayerNorm) is a different tensor: the test tells the two apart
        assert not torch.allclose(expert_in[i], output_out[i], atol=1e-3)
