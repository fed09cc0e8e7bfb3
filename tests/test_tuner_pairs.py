"""Every supported backbone pair: one training step touches side/head weights only, and backward never enters a tower."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_towers import FAMILY_PAIRS, PAIRS, batch, build_family_pair, build_pair, tiny_config

from peft_m2ist import M2ISTTapLayer, PeftModelForReferringExpressionComprehension
from peft_m2ist.towers.layouts import get_tower


def _tower_modules(model, config):
    container = model.base_model.model
    return [get_tower(container, config.vision_tower, "vision_tower"),
            get_tower(container, config.text_tower, "text_tower")]


def _storages_made_in(towers) -> tuple[set[int], list, list, list[bool]]:
    """Forward hooks on every tower module collecting the storages of every tensor they output.

    The tensors themselves are kept alive in `keep`, so that no storage address is freed and reused by a
    side-network tensor during the check.
    """
    made: set[int] = set()
    keep: list[torch.Tensor] = []
    modes: list[bool] = []

    def collect(module, _args, output):
        modes.append(module.training)
        stack = [output]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                made.add(item.untyped_storage().data_ptr())
                keep.append(item)
            elif isinstance(item, (tuple, list)):
                stack.extend(item)
            elif isinstance(item, dict):
                stack.extend(item.values())
            elif hasattr(item, "to_tuple"):
                stack.extend(item.to_tuple())

    handles = [m.register_forward_hook(collect) for tower in towers for m in tower.modules()]
    return made, handles, keep, modes


@pytest.mark.parametrize("pair_name", list(PAIRS))
@pytest.mark.parametrize("interaction,mixture", [("shared", "sum"), ("cross_attention", "gated")])
def test_training_step_only_touches_side_and_head(pair_name, interaction, mixture):
    model = get_peft_model(build_pair(pair_name), tiny_config(interaction=interaction, mixture=mixture))
    assert isinstance(model, PeftModelForReferringExpressionComprehension)
    config = model.peft_config["default"]
    towers = _tower_modules(model, config)
    taps = [m for m in model.modules() if isinstance(m, M2ISTTapLayer)]
    assert taps, "no tap layer placed"

    tower_before = {(i, n): p.detach().clone() for i, t in enumerate(towers) for n, p in t.named_parameters()}
    side_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert side_before and all(".m2ist_side." in n or ".m2ist_head." in n for n in side_before)

    model.train()
    made, handles, _keep, modes_during_forward = _storages_made_in(towers)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch())
    for h in handles:
        h.remove()
    assert out.pred_boxes.shape == (2, 4)
    assert ((out.pred_boxes >= 0) & (out.pred_boxes <= 1)).all()
    assert made, "the hooks saw no tower output"
    leaked = [tuple(t.shape) for t in saved if t.untyped_storage().data_ptr() in made]
    assert not leaked, f"autograd saved tensors produced inside a tower: {leaked}"
    # every tower module ran in eval mode although the PeftModel is in training mode
    assert modes_during_forward and not any(modes_during_forward)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out.loss.backward()
    assert all(p.grad is None for t in towers for p in t.parameters())
    optimizer.step()

    for i, t in enumerate(towers):
        for n, p in t.named_parameters():
            assert torch.equal(p, tower_before[i, n]), f"tower weight {n} changed"
    changed = [n for n, p in model.named_parameters() if n in side_before and not torch.equal(p, side_before[n])]
    assert len(changed) > len(side_before) // 2
    # the towers stay in eval mode although the PeftModel is in training mode (tests/test_adapters.py checks more)
    assert not any(m.training for t in towers for m in t.modules())


@pytest.mark.parametrize("pair_name", list(PAIRS))
def test_towers_in_bf16_train_an_fp32_side_network(pair_name):
    """Frozen towers loaded in bf16 (half the weight memory) take fp32 images and feed an fp32 side network."""
    reference = get_peft_model(build_pair(pair_name), tiny_config())
    half = get_peft_model(build_pair(pair_name).to(torch.bfloat16), tiny_config())
    half.load_state_dict(reference.state_dict())  # same side network and head (tower weights rounded to bf16)
    towers = _tower_modules(half, half.peft_config["default"])
    assert {p.dtype for t in towers for p in t.parameters()} == {torch.bfloat16}
    trainable = {n: p for n, p in half.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trainable.values()} == {torch.float32}

    inputs = batch()  # fp32 pixel_values, as image processors return them
    half.train()
    out = half(**inputs)
    assert out.pred_boxes.dtype == torch.float32 and out.loss.dtype == torch.float32
    out.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in trainable.values() if p.grad is not None)
    assert sum(p.grad is not None for p in trainable.values()) > len(trainable) // 2
    assert all(p.grad is None for t in towers for p in t.parameters())

    reference.eval()
    half.eval()
    with torch.no_grad():
        expected = reference(**{k: v for k, v in inputs.items() if k != "labels"}).pred_boxes
        got = half(**{k: v for k, v in inputs.items() if k != "labels"}).pred_boxes
    # bf16 keeps ~3 significant digits: the boxes move a little, not wholesale
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.0)


# The dual-encoder families: what the default tap resolution must pick in each tower, written out by hand (not read
# from `TOWER_LAYOUTS`). Per pair: (vision blocks, vision embedding tap, text blocks, text FFN child, text attention
# child, text embedding tap, vision prefix tokens). The vision blocks' FFN / attention children are `mlp` /
# `self_attn` in every family. SigLIP / SigLIP2 have no [CLS] token; the others have one.
_CLIP_TEXT = ("encoder.layers", "mlp", "self_attn", "embeddings")
_OWL_TEXT = ("text_model.encoder.layers", "mlp", "self_attn", "text_model.embeddings")
_BERT_TEXT = ("encoder.layer", "output.dense", "attention", "embeddings")
FAMILY_TAPS = {
    "siglip+siglip_text": ("encoder.layers", "embeddings", *_CLIP_TEXT, 0),
    "siglip2+siglip2_text": ("encoder.layers", "embeddings", *_CLIP_TEXT, 0),
    "chinese_clip+chinese_clip_text": ("encoder.layers", "pre_layrnorm", *_BERT_TEXT, 1),
    "clipseg+clipseg_text": ("encoder.layers", "pre_layrnorm", *_CLIP_TEXT, 1),
    "owlvit+owlvit_text": ("vision_model.encoder.layers", "vision_model.pre_layernorm", *_OWL_TEXT, 1),
    "owlv2+owlv2_text": ("vision_model.encoder.layers", "vision_model.pre_layernorm", *_OWL_TEXT, 1),
    "siglip2+bert": ("encoder.layers", "embeddings", *_BERT_TEXT, 0),
    "owlvit+bert": ("vision_model.encoder.layers", "vision_model.pre_layernorm", *_BERT_TEXT, 1),
    # containers: their `vision_model` / `text_model` are the towers (OWL's: the transformers inside the sub-models)
    "siglip": ("encoder.layers", "embeddings", *_CLIP_TEXT, 0),
    "siglip2": ("encoder.layers", "embeddings", *_CLIP_TEXT, 0),
    "chinese_clip": ("encoder.layers", "pre_layrnorm", *_BERT_TEXT, 1),
    "clipseg": ("encoder.layers", "pre_layrnorm", *_CLIP_TEXT, 1),
    "owlvit": ("encoder.layers", "pre_layernorm", *_CLIP_TEXT, 1),
    "owlv2": ("encoder.layers", "pre_layernorm", *_CLIP_TEXT, 1),
}


def test_every_family_pair_has_its_expected_taps():
    assert set(FAMILY_TAPS) == set(FAMILY_PAIRS)


@pytest.mark.parametrize("pair_name", list(FAMILY_PAIRS))
def test_dual_encoder_family_resolves_its_taps_and_trains_the_side_network_only(pair_name):
    v_blocks, v_embedding, t_blocks, t_ffn, t_attention, t_embedding, prefix = FAMILY_TAPS[pair_name]
    config = tiny_config()
    assert config.vision_layers is None and config.text_layers is None  # the default: resolved from model_type
    model = get_peft_model(build_family_pair(pair_name), config)
    config = model.peft_config["default"]
    container = model.base_model.model
    towers = _tower_modules(model, config)
    assert all(len(t.get_submodule(b)) == 2 for t, b in zip(towers, (v_blocks, t_blocks)))

    # one FFN tap and one attention tap in each of the 2 blocks of both towers, plus each tower's input embedding
    assert config.vision_layers == [f"{v_blocks}.{i}.mlp" for i in range(2)]
    assert config.vision_attention_layers == [f"{v_blocks}.{i}.self_attn" for i in range(2)]
    assert config.text_layers == [f"{t_blocks}.{i}.{t_ffn}" for i in range(2)]
    assert config.text_attention_layers == [f"{t_blocks}.{i}.{t_attention}" for i in range(2)]
    v, t = config.vision_tower, config.text_tower
    expected = {f"{v}.{n}" for n in [*config.vision_layers, *config.vision_attention_layers, v_embedding]}
    expected |= {f"{t}.{n}" for n in [*config.text_layers, *config.text_attention_layers, t_embedding]}
    assert set(config.target_modules) == expected
    assert all(isinstance(container.get_submodule(name), M2ISTTapLayer) for name in expected)
    assert sum(isinstance(m, M2ISTTapLayer) for m in model.modules()) == len(expected)
    vision, text = config.tower_shapes["vision"], config.tower_shapes["text"]
    assert vision["has_embedding"] and text["has_embedding"]
    # the patch grid: 32 x 32 images in 8 x 8 patches, after the [CLS] token if the family has one
    assert (vision["num_tokens"], vision["grid"], vision["prefix_tokens"], vision["patch_grid"]) == (
        16 + prefix, [4, 4], prefix, True)
    assert model.base_model.m2ist_head["default"].pointer.prefix_tokens == prefix

    model.train()
    out = model(**batch())
    assert out.pred_boxes.shape == (2, 4) and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(not p.requires_grad and p.grad is None for tower in towers for p in tower.parameters())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".m2ist_side." in n or ".m2ist_head." in n for n in trainable)
    with_grad = [n for n, p in trainable.items() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(with_grad) > len(trainable) // 2
    # one M3ISA block per tapped block pair, each trained; the side network reads the embedding taps too (its forward
    # raises if any tap recorded nothing)
    side = model.base_model.m2ist_side["default"]
    assert (side.vision_taps.embeddings, side.text_taps.embeddings) == (f"{v}.{v_embedding}", f"{t}.{t_embedding}")
    assert len(side.blocks) == 2
    assert all(any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters()) for block in side.blocks)
