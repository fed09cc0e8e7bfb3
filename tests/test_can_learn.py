"""Can it learn? Every configuration we ship overfits a handful of records on tiny towers.

The configurations: the default `M2ISTConfig`, `preset="paper"`, and the `M2ISTConfig` fields of every YAML file in
`examples/configs/` (read through the YAML; the other keys are the training script's). On tiny towers (a ViT of
width 32 and a BERT of width 64: the paper preset's text tower must be wider than its interaction width, the
vision tower's), each one trains on `NUM_RECORDS` synthetic records (a bright box on a dark noisy image, a random
expression each) until Acc@0.5 on those records reaches `TARGET_ACCURACY`, within `MAX_STEPS` steps. Any broken
gradient path fails it, and every trainable parameter must have had a gradient by then (the default's experts get
theirs from the second step: their up-projections start at zero).

What the tiny towers cannot hold is adapted and nothing else: `image_size` and `max_text_tokens` are the towers',
and the widths (`bottleneck_dim`, `head_hidden_size`, `head_intermediate_size`) are divided by `WIDTH_DIVISOR` so
that a step takes milliseconds; depths, head counts, dropouts, scales, the box head, the interaction and every
fidelity field of the preset are the configuration's own. Configurations that are then identical are trained once
(the test id names each source).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import tiny_towers
import torch
import transformers as tf
import yaml
from peft import get_peft_model
from transformers.loss.loss_for_object_detection import center_to_corners_format

from peft_m2ist import M2ISTConfig, VisionTextPair
from peft_m2ist.metrics.rec_accuracy.rec_accuracy import rec_scores

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
NUM_RECORDS = 8
TARGET_ACCURACY = 0.9
MAX_STEPS = 300
CHECK_EVERY = 10
LEARNING_RATE = 3e-4
WIDTH_DIVISOR = 8
WIDTHS = ("bottleneck_dim", "head_hidden_size", "head_intermediate_size")
TOWER_GEOMETRY = {"image_size": tiny_towers.IMAGE_SIZE, "max_text_tokens": tiny_towers.TEXT_TOKENS}


def _config_fields(path: Path) -> dict:
    """The `M2ISTConfig` fields a YAML file of `examples/configs/` sets."""
    names = {f.name for f in dataclasses.fields(M2ISTConfig)}
    return {key: value for key, value in (yaml.safe_load(path.read_text()) or {}).items() if key in names}


def _tiny(fields: dict) -> M2ISTConfig:
    """`fields` on the tiny towers: their image size and text length, the widths divided by `WIDTH_DIVISOR`."""
    defaults = {f.name: f.default for f in dataclasses.fields(M2ISTConfig)}
    widths = {name: fields.get(name, defaults[name]) // WIDTH_DIVISOR for name in WIDTHS}
    return M2ISTConfig(**{**fields, **widths, **TOWER_GEOMETRY})


def _shipped() -> list:
    """One pytest param per distinct tiny configuration, its id naming every source."""
    sources = {"default": {}, "preset=paper": {"preset": "paper"}}
    sources.update({path.name: _config_fields(path) for path in CONFIGS})
    distinct: dict[str, tuple[list[str], M2ISTConfig]] = {}
    for name, fields in sources.items():
        config = _tiny(fields)
        key = repr(sorted(config.to_dict().items()))
        distinct.setdefault(key, ([], config))[0].append(name)
    return [pytest.param(config, id="+".join(names)) for names, config in distinct.values()]


def test_every_yaml_is_among_the_shipped_configurations():
    assert len(CONFIGS) >= 2
    ids = "+".join(param.id for param in _shipped())
    assert all(path.name in ids for path in CONFIGS) and "preset=paper" in ids and "default" in ids
    assert all(_config_fields(path) for path in CONFIGS)  # each YAML sets adapter fields


def _wide_text_pair() -> VisionTextPair:
    """A tiny ViT (width 32) and a tiny BERT twice as wide (64)."""
    torch.manual_seed(0)
    text = tf.BertModel(tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=128, vocab_size=tiny_towers.VOCAB))
    return VisionTextPair(tiny_towers.vit(), text).eval()


def _records() -> dict[str, torch.Tensor]:
    """`NUM_RECORDS` records: a bright box (the target, `labels` `cxcywh` in [0, 1]) on a dark noisy image, and a
    random expression each."""
    g = torch.Generator().manual_seed(1)
    size = tiny_towers.IMAGE_SIZE
    boxes = torch.cat([torch.rand(NUM_RECORDS, 2, generator=g) * 0.4 + 0.3,
                       torch.rand(NUM_RECORDS, 2, generator=g) * 0.3 + 0.25], dim=1)
    pixels = torch.randn(NUM_RECORDS, 3, size, size, generator=g) * 0.1 - 1.0
    for image, (x0, y0, x1, y1) in zip(pixels, (center_to_corners_format(boxes) * size).round().long().tolist()):
        image[:, y0:y1, x0:x1] = 1.5
    return {"pixel_values": pixels,
            "input_ids": torch.randint(3, tiny_towers.VOCAB, (NUM_RECORDS, tiny_towers.TEXT_TOKENS), generator=g),
            "attention_mask": torch.ones(NUM_RECORDS, tiny_towers.TEXT_TOKENS, dtype=torch.long),
            "labels": boxes}


@pytest.fixture
def one_thread():
    """One torch thread: tiny tensors run fastest so on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("config", _shipped())
def test_the_configuration_overfits_a_handful_of_records(config, one_thread):
    model = get_peft_model(_wide_text_pair(), config)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=LEARNING_RATE, weight_decay=1e-4)
    records = _records()
    inputs = {key: value for key, value in records.items() if key != "labels"}
    torch.manual_seed(0)
    accuracy, curve, unreached = 0.0, [], list(trainable)
    for step in range(1, MAX_STEPS + 1):
        model.train()
        loss = model(**records).loss
        loss.backward()
        unreached = [name for name in unreached if trainable[name].grad is None
                     or not trainable[name].grad.abs().sum() > 0]
        optimizer.step()
        optimizer.zero_grad()
        if step % CHECK_EVERY == 0:
            model.eval()
            with torch.no_grad():
                accuracy = rec_scores(model(**inputs).pred_boxes, records["labels"])[1].float().mean().item()
            curve.append((step, round(loss.item(), 3), accuracy))
            if accuracy >= TARGET_ACCURACY:
                break
    assert accuracy >= TARGET_ACCURACY, f"(step, training loss, Acc@0.5): {curve}"
    assert not unreached, f"no gradient ever reached {unreached}"
