"""`M2ISTConfig(preset="paper")` builds the authors' M2IST: compared tensor for tensor with an independent
re-statement of their forward (tests/helpers/authors_reference.py), and counted against their modules at paper scale."""

from __future__ import annotations

import dataclasses
import re
from typing import get_type_hints

import pytest
import torch
import transformers as tf
from authors_reference import AuthorsM2IST, authors_parameter_count
from peft import get_peft_model
from tiny_towers import bert, build_pair, clip_text, tiny_config
from torch import nn

from peft_m2ist import M2ISTConfig, VisionTextPair
from peft_m2ist.modeling.experts import interaction_dim
from peft_m2ist.modeling.settings import ExpertSettings, HeadSettings, LossSettings
from peft_m2ist.tuner.config import FIDELITY_CHOICES, PAPER_PRESET, field_choices

VIS_DIM, TEXT_DIM, IMAGE, TOKENS = 16, 48, 128, 6


def tiny_detr() -> torch.nn.Module:
    backbone = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                               layer_type="basic", out_features=["stage4"])
    return tf.DetrModel(tf.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
                                      d_model=VIS_DIM, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                                      decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=4))


def tiny_bert() -> torch.nn.Module:
    return tf.BertModel(tf.BertConfig(hidden_size=TEXT_DIM, num_hidden_layers=3, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=100))


def paper_tiny_config(**overrides) -> M2ISTConfig:
    kwargs = dict(preset="paper", bottleneck_dim=8, head_hidden_size=32, head_num_hidden_layers=2,
                  head_num_attention_heads=4, head_intermediate_size=64, max_text_tokens=TOKENS, image_size=IMAGE,
                  num_tapped_layers=2)
    kwargs.update(overrides)
    return M2ISTConfig(**kwargs)


def inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = {
        "pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=g),
        "pixel_mask": torch.ones(batch, IMAGE, IMAGE, dtype=torch.long),
        "input_ids": torch.randint(3, 100, (batch, TOKENS), generator=g),
        "attention_mask": torch.ones(batch, TOKENS, dtype=torch.long),
    }
    out["pixel_mask"][0, :, IMAGE // 2 :] = 0
    out["attention_mask"][0, -2:] = 0
    return out


def _pairs(model, reference: AuthorsM2IST) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """(ours, the reference's) for every parameter, by the authors' module names."""
    side = model.base_model.m2ist_side["default"]
    head = model.base_model.m2ist_head["default"]
    pairs = []

    def linear(ours, theirs):
        pairs.extend([(ours.weight, theirs.weight), (ours.bias, theirs.bias)])

    for i, block in enumerate(side.blocks):
        inter = block.interactive_expert
        linear(inter.shared_up, reference.shared_adapters[i])
        linear(inter.vision_down, reference.vis_downsample_mha[i])
        linear(inter.text_down, reference.text_downsample[i])
        linear(inter.text_up, reference.text_upsample[i])
        for ours, theirs in ((block.vision_expert, reference.vis_mlp_adapters[i]),
                             (block.language_expert, reference.text_mlp_adapters[i])):
            linear(ours.norm, theirs.adapter_layer_norm_before)
            linear(ours.down, theirs.down_proj)
            linear(ours.up, theirs.up_proj)
    linear(side.vision_proj, reference.visu_proj)
    linear(side.text_proj, reference.text_proj)
    pairs.append((head.reg_token, reference.reg_token.weight))
    pairs.append((head.position_embedding, reference.vl_pos_embed.weight))
    for ours, theirs in zip(head.encoder.layers, reference.vl_transformer):
        pairs.extend([(ours.self_attn.in_proj_weight, theirs.self_attn.in_proj_weight),
                      (ours.self_attn.in_proj_bias, theirs.self_attn.in_proj_bias)])
        for name in ("self_attn.out_proj", "linear1", "linear2", "norm1", "norm2"):
            linear(ours.get_submodule(name), theirs.get_submodule(name))
    for ours, theirs in zip([head.box_mlp[0], head.box_mlp[2], head.box_mlp[4]], reference.bbox_embed):
        linear(ours, theirs)
    return pairs


def _authors_features(pair: VisionTextPair, batch: dict[str, torch.Tensor], layers: int) -> tuple[dict, dict]:
    """The tensors the authors' adapters read, hooked on the towers by their own names (not through our taps)."""
    detr, text_tower = pair.vision_model, pair.text_model
    vis = {"src2": [None] * layers, "src5": [None] * layers}
    text = {"attention_output": [None] * layers, "ffn_dense": [None] * layers}
    handles = []

    def keep(store, key, index=None, first=False):
        def hook(_module, _args, output):
            value = output[0] if first else output
            if index is None:
                store[key] = value
            else:
                store[key][index] = value
        return hook

    for i in range(layers):
        layer = detr.encoder.layers[i]
        handles.append(layer.self_attn.register_forward_hook(keep(vis, "src2", i, first=True)))
        handles.append(layer.mlp.fc2.register_forward_hook(keep(vis, "src5", i)))
        block = text_tower.encoder.layer[i]
        handles.append(block.attention.output.register_forward_hook(keep(text, "attention_output", i)))
        handles.append(block.output.dense.register_forward_hook(keep(text, "ffn_dense", i)))
    handles.append(detr.input_projection.register_forward_hook(keep(vis, "input_src")))
    handles.append(text_tower.embeddings.register_forward_hook(keep(text, "embedding_output")))
    with torch.no_grad():
        out = detr(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
        text["last_hidden_state"] = text_tower(input_ids=batch["input_ids"],
                                               attention_mask=batch["attention_mask"]).last_hidden_state
    for handle in handles:
        handle.remove()
    vis["memory"] = out.encoder_last_hidden_state
    grid = vis["input_src"].shape[-2:]
    vis["input_src"] = vis["input_src"].flatten(2).transpose(1, 2)
    vis["mask"] = ~nearest_mask(batch["pixel_mask"], grid).flatten(1)
    text["mask"] = ~batch["attention_mask"].bool()
    text["attention_norm"] = [text_tower.encoder.layer[i].attention.output.LayerNorm for i in range(layers)]
    text["ffn_norm"] = [text_tower.encoder.layer[i].output.LayerNorm for i in range(layers)]
    return vis, text


def nearest_mask(pixel_mask: torch.Tensor, size) -> torch.Tensor:
    """The pixel mask on the feature grid, as the authors' DETR backbone (`F.interpolate`, nearest)."""
    return torch.nn.functional.interpolate(pixel_mask[None].float(), size=size).to(torch.bool)[0]


def test_preset_matches_an_independent_restatement_of_the_authors_forward():
    torch.manual_seed(0)
    pair = VisionTextPair(tiny_detr(), tiny_bert()).eval()
    model = get_peft_model(pair, paper_tiny_config())
    config = model.peft_config["default"]
    # the first blocks, as the authors tap layers 0-5 (here 2 of BERT's 3)
    assert config.text_layers == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    assert config.vision_layers == ["encoder.layers.0.mlp", "encoder.layers.1.mlp"]
    num_vision = config.tower_shapes["vision"]["num_tokens"]
    reference = AuthorsM2IST(VIS_DIM, TEXT_DIM, num_layers=2, bottleneck=8, hidden_dim=32, nheads=4,
                             dim_feedforward=64, vl_layers=2, num_visu_token=num_vision, num_text_token=TOKENS)
    pairs = _pairs(model, reference)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # every trainable parameter has exactly one counterpart in the authors' modules, and vice versa
    assert {id(o) for o, _ in pairs} == {id(p) for p in trainable} and len(pairs) == len(trainable)
    assert {id(t) for _, t in pairs} == {id(p) for p in reference.parameters()}
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for ours, theirs in pairs:
            if ours.dim() == 1:  # LayerNorms start at 1 / 0: make them count
                ours.add_(torch.randn(ours.shape, generator=g) * 0.2)
            theirs.copy_(ours.reshape(theirs.shape))

    batch = inputs()
    model.eval()
    reference.eval()
    side = model.base_model.m2ist_side["default"]
    streams = {}
    handle = side.register_forward_hook(lambda _m, _a, out: streams.setdefault("out", out))
    ours = model(**batch).pred_boxes
    handle.remove()
    vis, text = _authors_features(pair, batch, layers=2)
    theirs = reference(vis, text)
    torch.testing.assert_close(streams["out"][0], theirs["visu_src"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(streams["out"][1], theirs["text_src"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, theirs["pred_box"], rtol=1e-5, atol=1e-6)
    # and the same gradients, also through the BERT blocks' frozen LayerNorms
    ours.pow(2).sum().backward()
    theirs["pred_box"].pow(2).sum().backward()
    for mine, authors in pairs:
        torch.testing.assert_close(mine.grad.reshape(authors.shape), authors.grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in pair.parameters())


def test_preset_init_is_the_authors():
    torch.manual_seed(0)
    model = get_peft_model(VisionTextPair(tiny_detr(), tiny_bert()).eval(), paper_tiny_config())
    side = model.base_model.m2ist_side["default"]
    head = model.base_model.m2ist_head["default"]
    block = side.blocks[0]
    for linear in (block.vision_expert.down, block.vision_expert.up, block.language_expert.up,
                   block.interactive_expert.shared_up, block.interactive_expert.text_up,
                   block.interactive_expert.vision_down):
        assert linear.weight.abs().sum() > 0 and bool(((linear.bias >= 0) & (linear.bias <= 1)).all())
        assert linear.bias.min() >= 0 and linear.bias.mean() > 0.2  # U(0, 1), not torch's symmetric init
    assert block.vision_expert.norm.weight is not None  # affine
    assert isinstance(head.input_norm, torch.nn.Identity) and head.vision_grid_encoding is None
    assert head.reg_token.std() > 0.3 and head.position_embedding.std() > 0.5  # N(0, 1), not std 0.02
    first, second = head.encoder.layers[0].linear1.weight, head.encoder.layers[1].linear1.weight
    assert not torch.equal(first, second)  # re-initialised after cloning, as TransVG


def test_paper_scale_counts_equal_the_authors_modules():
    from test_paper_scale import PAPER_ADAPTER_ONLY, paper_pair

    model = get_peft_model(paper_pair(), M2ISTConfig(preset="paper", image_size=640, max_text_tokens=20))
    config = model.peft_config["default"]
    assert config.text_layers == [f"encoder.layer.{i}.output.dense" for i in range(6)]
    assert config.text_attention_layers == [f"encoder.layer.{i}.attention" for i in range(6)]
    assert config.vision_layers == [f"encoder.layers.{i}.mlp" for i in range(6)]
    counts = model.get_parameter_counts()
    adapters, trainable = authors_parameter_count(256, 768)
    # counted from the authors' code (docs/fidelity.md): per layer 495,872, x 6; the head and projections 8,393,732
    assert (adapters, trainable) == (2_975_232, 11_368_964)
    assert counts["adapter_only"] == adapters
    assert counts["adapter_and_head"] == trainable
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert abs(counts["adapter_only"] - PAPER_ADAPTER_ONLY) / PAPER_ADAPTER_ONLY < 0.05


def test_preset_sets_every_fidelity_field_and_refuses_contradictions():
    config = M2ISTConfig(preset="paper")
    for name, value in PAPER_PRESET.items():
        assert getattr(config, name) == value, name
    assert set(FIDELITY_CHOICES) <= set(PAPER_PRESET)
    # a saved preset config loads back unchanged
    again = M2ISTConfig(**{k: getattr(config, k) for k in PAPER_PRESET}, preset="paper")
    assert all(getattr(again, k) == getattr(config, k) for k in PAPER_PRESET)
    for conflict in (dict(interaction="cross_attention"), dict(mixture="gated"), dict(head_attention_dropout=0.2),
                     dict(interaction_dim=64)):
        with pytest.raises(ValueError, match="preset='paper' sets"):
            M2ISTConfig(preset="paper", **conflict)
    # the defaults are the library's
    plain = M2ISTConfig()
    assert all(getattr(plain, name) == allowed[0] for name, allowed in FIDELITY_CHOICES.items())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(preset="authors"), "`preset` must be None or one of"),
        (dict(head_positions="both"), "`head_positions` must be one of"),
        (dict(expert_init="xavier"), "`expert_init` must be one of"),
        (dict(head_input_norm="no"), "`head_input_norm` must be True or False"),
        (dict(interaction_text_output_norm="tower"), "needs `interaction_text_path='concat'`"),
        (dict(interaction_dim=64, interaction_width="vision"), "set one of them"),
        (dict(language_expert_output_norm="tower"), "`expert_init='zero_up'` starts the experts' outputs at exactly"),
        (dict(language_expert_output_norm="tower", interaction_text_path="concat", interaction_text_output_norm="tower"),
         "`language_expert_output_norm='tower'` and `interaction_text_output_norm='tower'` normalises"),
    ],
)
def test_fidelity_fields_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M2ISTConfig(**kwargs)


def test_every_choice_field_is_checked_against_its_literal():
    """The choices are written once, in the field's `Literal` type: each such field refuses any other value, naming
    them."""
    hints = get_type_hints(M2ISTConfig)
    literal_fields = [name for name in M2ISTConfig.__annotations__ if "Literal" in str(hints[name])]
    assert {"interaction", "mixture", "box_head", "preset", "head_init"} <= set(literal_fields)
    assert field_choices("mixture") == ("sum", "gated") and field_choices("preset") == ("paper", None)
    assert field_choices("head_input_norm") == (True, False)
    for name in literal_fields:
        choices = tuple(choice for choice in field_choices(name) if choice is not None)
        with pytest.raises(ValueError, match=re.escape(f"`{name}` must be ") + ".*" + re.escape(f"{choices}")):
            M2ISTConfig(**{name: "no-such-choice"})


@pytest.mark.parametrize("settings", [ExpertSettings, HeadSettings, LossSettings], ids=lambda p: p.__name__)
def test_the_modeling_settings_name_config_fields(settings):
    """The modules read the config's fields by their own names: each protocol of `modeling.settings` lists fields of
    `M2ISTConfig` only (the modeling room may not import the config itself)."""
    names = set(settings.__annotations__)
    fields = {f.name for f in dataclasses.fields(M2ISTConfig)}
    assert names and not names - fields, sorted(names - fields)


def _taps(pair) -> int:
    from peft_m2ist.tuner.layer import M2ISTTapLayer

    return sum(isinstance(m, M2ISTTapLayer) for m in pair.modules())


def test_preset_refuses_what_the_towers_cannot_do_before_touching_them():
    # the concatenation needs a text tower wider than the vision tower (768 = 512 + 256 in the paper)
    pair = build_pair("vit+bert")  # both 32 wide
    with pytest.raises(ValueError, match="512 \\+ 256 = 768"):
        get_peft_model(pair, tiny_config(preset="paper", head_attention_dropout=0.1))
    assert _taps(pair) == 0
    # the frozen BERT LayerNorms need a post-norm BERT-family text tower: CLIP's text tower is pre-norm
    torch.manual_seed(0)
    pair = VisionTextPair(tiny_detr(), clip_text()).eval()
    with pytest.raises(ValueError, match="language_expert_output_norm='tower'"):
        get_peft_model(pair, paper_tiny_config(image_size=IMAGE, max_text_tokens=TOKENS))
    assert _taps(pair) == 0
    # what is well defined elsewhere works: a narrower BERT, the concatenated text path without the frozen norms
    torch.manual_seed(0)
    model = get_peft_model(VisionTextPair(tiny_detr(), bert()).eval(),
                           tiny_config(interaction_width="vision", interaction_text_path="concat",
                                       image_size=IMAGE))
    block = model.base_model.m2ist_side["default"].blocks[0]
    assert block.interactive_expert.text_up.out_features == 32 - VIS_DIM and block.text_to_head is None


@pytest.mark.parametrize("pair_name", ["vit+bert", "mobilenet_v2+bert"])
def test_one_interaction_width_rule_for_the_plan_and_the_side_network(pair_name):
    """`interaction_width="vision"`: the shared space is the vision tower's width (not the head's) both where the
    side network is built and where the plan checks the concatenated text path against it."""
    config = tiny_config(interaction_width="vision")
    model = get_peft_model(build_pair(pair_name), config)
    vision_dim, text_dim = (config.tower_shapes[tower]["stream_dim"] for tower in ("vision", "text"))
    assert vision_dim != config.head_hidden_size
    assert interaction_dim(config, vision_dim) == vision_dim
    blocks = model.base_model.m2ist_side["default"].blocks
    assert all(block.interactive_expert.shared_up.out_features == vision_dim for block in blocks)
    # the text tower (32 wide) is not wider than this width: the plan refuses the concatenation, naming the width
    assert text_dim <= vision_dim
    pair = build_pair(pair_name)
    with pytest.raises(ValueError, match=f"the text tower is {text_dim} wide and the interaction width {vision_dim},"):
        get_peft_model(pair, tiny_config(interaction_width="vision", interaction_text_path="concat"))
    assert _taps(pair) == 0


def test_head_positions_in_attention_checkpoint_to_the_same_gradients():
    torch.manual_seed(0)
    model = get_peft_model(VisionTextPair(tiny_detr(), tiny_bert()).eval(),
                           paper_tiny_config(head_dropout=0.0, head_attention_dropout=0.1))
    head = model.base_model.m2ist_head["default"]
    batch = inputs()
    model.train()
    grads = []
    for checkpointing in (False, True):
        head.gradient_checkpointing = checkpointing
        model.zero_grad()
        torch.manual_seed(5)
        model(**batch).pred_boxes.sum().backward()
        grads.append([p.grad.clone() for p in head.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_preset_adapter_saves_without_tower_weights_and_reloads_to_the_same_boxes(tmp_path):
    import copy

    from peft import PeftModel

    torch.manual_seed(0)
    pair = VisionTextPair(tiny_detr(), tiny_bert()).eval()
    fresh = copy.deepcopy(pair)
    model = get_peft_model(pair, paper_tiny_config())
    model.eval()
    batch = inputs()
    with torch.no_grad():
        expected = model(**batch).pred_boxes
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(t.numel() for t in saved.values()) == model.get_parameter_counts()["adapter_and_head"]
    assert not any("LayerNorm" in k for k in saved)  # BERT's frozen norms stay the tower's
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert loaded.peft_config["default"].preset == "paper"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).pred_boxes, expected, rtol=0, atol=1e-6)


def test_a_tower_norm_of_a_zero_initialised_expert_output_is_refused_for_its_gradient():
    """Why `expert_init="zero_up"` is refused with the tower norms: a LayerNorm of an exactly zero correction has a
    gradient of 1/sqrt(eps) (BERT's eps is 1e-12), found by the learning curves (docs/fidelity.md)."""
    norm = nn.LayerNorm(8, eps=1e-12)
    zero = torch.zeros(1, 8, requires_grad=True)
    norm(zero).mul(torch.arange(8.0)).sum().backward()
    assert zero.grad.abs().max() > 1e5
    # what stays allowed: the authors' init with the norms, and zero-initialised experts without them
    M2ISTConfig(expert_init="kaiming", language_expert_output_norm="tower", interaction_text_path="concat",
                interaction_text_output_norm="tower")
    M2ISTConfig(preset="paper")
    M2ISTConfig(expert_init="zero_up", interaction_text_path="concat")
    with pytest.raises(ValueError, match="`expert_init='zero_up'` starts"):
        M2ISTConfig(expert_init="zero_up", interaction_text_path="concat", interaction_text_output_norm="tower")
