"""benchmarks/head_inputs.py: what the grounding head sees at initialisation (the learning curves' diagnosis)."""

from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks import head_inputs, learning_curve, scales


@pytest.fixture(scope="module")
def tiny():
    scale = scales.build_scale("tiny", 0)
    return scale, scales.make_batch(scale, 6, seed=3)


def _stats(tiny, config: str, overrides: dict) -> dict[str, float]:
    scale, batch = tiny
    args = argparse.Namespace(seed=13, bottleneck=16, head_layers=1, head_ffn_dim=32)
    return head_inputs.head_input_stats(learning_curve.build_model(config, overrides, scale, args), batch)


def test_the_head_init_sets_the_reg_token_and_position_scales(tiny):
    """The default's [REG] is trunc-normal with std 0.02; TransVG's (`head_init="transvg"`) is N(0, 1)."""
    default = _stats(tiny, "default", {})
    transvg = _stats(tiny, "default", {"head_init": "transvg"})
    assert default["reg_rms"] == pytest.approx(0.02, rel=0.5)
    assert transvg["reg_rms"] == pytest.approx(1.0, rel=0.5)
    assert transvg["position_rms"] > default["position_rms"]
    # the head's init does not touch the side network: same input tokens
    assert transvg["vision_rms"] == pytest.approx(default["vision_rms"], rel=1e-6)


def test_the_authors_expert_init_adds_an_image_independent_offset_to_the_vision_tokens(tiny):
    """Kaiming weights and U(0, 1) biases in the unscaled interactive expert shift every vision token by about the
    same vector: the share of the tokens that changes with the image falls (the preset's diagnosis, docs/fidelity.md)."""
    paper = _stats(tiny, "paper", {})
    zero_up = _stats(tiny, "paper", {"expert_init": "zero_up", "language_expert_output_norm": "none",
                                     "interaction_text_output_norm": "none"})
    assert paper["vision_image_share"] < 0.5 * zero_up["vision_image_share"]
    assert paper["vision_rms"] > zero_up["vision_rms"]
    for stats in (paper, zero_up):
        assert 0.0 < stats["vision_image_share"] < 1.0 and 0.0 < stats["reg_attention_entropy"] <= 1.0 + 1e-6


def test_the_statistics_leave_the_model_as_it_was(tiny):
    scale, batch = tiny
    args = argparse.Namespace(seed=13, bottleneck=16, head_layers=1, head_ffn_dim=32)
    model = learning_curve.build_model("default", {}, scale, args).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head_inputs.head_input_stats(model, batch)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_the_first_steps_gradient_is_split_into_the_parts_of_the_adapter(tiny):
    stats = _stats(tiny, "default", {})
    shares = [stats[f"gradient_share_{part}"] for part in head_inputs.GRADIENT_PARTS]
    assert stats["gradient_norm"] > 0 and all(0.0 <= s <= 1.0 for s in shares)
    assert sum(s * s for s in shares) == pytest.approx(1.0, rel=1e-5)  # the parts' squares add up to the total's
    # at the library default's initialisation the head takes most of the first step's gradient
    assert stats["gradient_share_head"] == max(shares)
