"""A tiny MobileNetV2 + BERT pair saved as Hub-style folders, with an adapter built on the towers loaded back from
them (so its config records their folders), for tests of the inference API, predict.py and the demo (seconds to build;
random weights)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import transformers as tf
from peft import get_peft_model
from tiny_towers import SMALL, tiny_config

from peft_m2ist import VisionTextPair
from peft_m2ist.pretrained import minilm_path


def save_tiny_towers(root: Path) -> tuple[Path, Path]:
    """Random towers saved with their image processor and tokenizer in ``root/vision`` and ``root/text``."""
    torch.manual_seed(0)
    tf.MobileNetV2Model(tf.MobileNetV2Config(depth_multiplier=0.35, image_size=32)).save_pretrained(root / "vision")
    tf.MobileNetV2ImageProcessor().save_pretrained(root / "vision")
    tf.BertModel(tf.BertConfig(**SMALL)).save_pretrained(root / "text")
    tf.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(root / "text")
    return root / "vision", root / "text"


def save_tiny_adapter(root: Path) -> SimpleNamespace:
    """Towers in ``root/vision`` and ``root/text``, the adapter in ``root/adapter``, saved as a user's script would
    (``get_peft_model`` on towers loaded with ``from_pretrained``, then ``save_pretrained``); returns the paths and
    the model."""
    vision_path, text_path = save_tiny_towers(root)
    vision = tf.MobileNetV2Model.from_pretrained(str(vision_path))
    text = tf.BertModel.from_pretrained(str(text_path))
    torch.manual_seed(0)
    model = get_peft_model(VisionTextPair(vision.eval(), text.eval()), tiny_config())
    model.save_pretrained(root / "adapter")
    return SimpleNamespace(root=root, adapter=root / "adapter", model=model.eval(), vision=vision_path,
                           text=text_path)


def save_other_adapter(tiny: SimpleNamespace, folder: Path, seed: int = 1, **overrides) -> Path:
    """Another adapter on the towers of `save_tiny_adapter` (``tiny``), with other random weights and the config
    ``tiny_config(**overrides)``, saved in ``folder``; returns ``folder``."""
    vision = tf.MobileNetV2Model.from_pretrained(str(tiny.vision))
    text = tf.BertModel.from_pretrained(str(tiny.text))
    torch.manual_seed(seed)
    get_peft_model(VisionTextPair(vision.eval(), text.eval()), tiny_config(**overrides)).save_pretrained(folder)
    return folder
