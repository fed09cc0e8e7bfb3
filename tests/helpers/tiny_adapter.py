"""A tiny MobileNetV2 + BERT pair saved as Hub-style folders, with an adapter and its towers.json, for tests of the
inference API, predict.py and the demo (seconds to build; random weights)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers as tf
from peft import get_peft_model
from tiny_towers import SMALL, tiny_config

from peft_m2ist import VisionTextPair
from peft_m2ist.pretrained import minilm_path
from peft_m2ist.pretrained.towers_file import TOWERS_FILE, towers_record


def save_tiny_adapter(root: Path) -> SimpleNamespace:
    """Towers in ``root/vision`` and ``root/text``, the adapter in ``root/adapter``; returns the paths and model."""
    torch.manual_seed(0)
    vision = tf.MobileNetV2Model(tf.MobileNetV2Config(depth_multiplier=0.35, image_size=32))
    vision.save_pretrained(root / "vision")
    tf.MobileNetV2ImageProcessor().save_pretrained(root / "vision")
    text = tf.BertModel(tf.BertConfig(**SMALL))
    text.save_pretrained(root / "text")
    tf.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(root / "text")
    model = get_peft_model(VisionTextPair(vision.eval(), text.eval()), tiny_config())
    model.save_pretrained(root / "adapter")
    record = towers_record(str(root / "vision"), str(root / "text"), "float32")
    (root / "adapter" / TOWERS_FILE).write_text(json.dumps(record))
    return SimpleNamespace(root=root, adapter=root / "adapter", model=model.eval(), vision=root / "vision",
                           text=root / "text")
