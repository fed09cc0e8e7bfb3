"""Every supported backbone pair: one training step touches side/head weights only, and backward never enters a tower."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_towers import PAIRS, batch, build_pair, tiny_config

from peft_m2ist import M2ISTTapLayer, PeftModelForReferringExpressionComprehension
from peft_m2ist.towers import get_tower


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
    # after the step the towers' own train/eval flags are back to what the container says
    assert any(m.training for t in towers for m in t.modules())


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
