"""Tiny random backbone pairs built from transformers config classes (no download), shared by the tuner tests.

Importable from a subprocess too (`python -c "import tiny_towers"` with `tests/helpers/` on the path), so a fresh process can
rebuild the exact same towers from the same seed.
"""

from __future__ import annotations

import torch
import transformers as tf

from peft_m2ist import M2ISTConfig, VisionTextPair

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
IMAGE_SIZE = 32
TEXT_TOKENS = 6
VOCAB = 100


def vit() -> torch.nn.Module:
    return tf.ViTModel(tf.ViTConfig(**SMALL, image_size=IMAGE_SIZE, patch_size=8))


def dinov2() -> torch.nn.Module:
    return tf.Dinov2Model(tf.Dinov2Config(**SMALL, image_size=IMAGE_SIZE, patch_size=8))


def mobilenet_v2() -> torch.nn.Module:
    return tf.MobileNetV2Model(tf.MobileNetV2Config(depth_multiplier=0.35, image_size=IMAGE_SIZE))


def detr_resnet() -> torch.nn.Module:
    backbone = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                               layer_type="basic", out_features=["stage4"])
    config = tf.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
                           d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=4)
    return tf.DetrModel(config)


def bert() -> torch.nn.Module:
    return tf.BertModel(tf.BertConfig(**SMALL, vocab_size=VOCAB))


def roberta() -> torch.nn.Module:
    return tf.RobertaModel(tf.RobertaConfig(**SMALL, vocab_size=VOCAB))


def clip_text() -> torch.nn.Module:
    return tf.CLIPTextModel(tf.CLIPTextConfig(**SMALL, vocab_size=VOCAB, bos_token_id=0, eos_token_id=2,
                                              pad_token_id=1))


def clip_model() -> torch.nn.Module:
    config = tf.CLIPConfig(
        text_config=dict(**SMALL, vocab_size=VOCAB, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=dict(**SMALL, image_size=IMAGE_SIZE, patch_size=8),
    )
    return tf.CLIPModel(config)


def dual_encoder() -> torch.nn.Module:
    config = tf.VisionTextDualEncoderConfig.from_vision_text_configs(
        tf.ViTConfig(**SMALL, image_size=IMAGE_SIZE, patch_size=8), tf.BertConfig(**SMALL, vocab_size=VOCAB)
    )
    return tf.VisionTextDualEncoderModel(config)


# dual-encoder families (SigLIP, SigLIP2, Chinese-CLIP, CLIPSeg, OWL-ViT, OWLv2): stand-alone vision and text
# sub-models, and their containers
PATCH = 8
_TEXT_IDS = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
_VISION = {**SMALL, "image_size": IMAGE_SIZE, "patch_size": PATCH}
# SigLIP2 (NaFlex) has no image size: a square grid of position embeddings, resized to each image's patch grid
_SIGLIP2_VISION = {**SMALL, "patch_size": PATCH, "num_patches": (IMAGE_SIZE // PATCH) ** 2}
_TEXT = {**SMALL, **_TEXT_IDS}


def siglip_vision() -> torch.nn.Module:
    return tf.SiglipVisionModel(tf.SiglipVisionConfig(**_VISION))


def siglip_text() -> torch.nn.Module:
    return tf.SiglipTextModel(tf.SiglipTextConfig(**_TEXT))


def siglip_model() -> torch.nn.Module:
    return tf.SiglipModel(tf.SiglipConfig(text_config=_TEXT, vision_config=_VISION))


def siglip2_vision() -> torch.nn.Module:
    return tf.Siglip2VisionModel(tf.Siglip2VisionConfig(**_SIGLIP2_VISION))


def siglip2_text() -> torch.nn.Module:
    return tf.Siglip2TextModel(tf.Siglip2TextConfig(**_TEXT))


def siglip2_model() -> torch.nn.Module:
    return tf.Siglip2Model(tf.Siglip2Config(text_config=_TEXT, vision_config=_SIGLIP2_VISION))


def chinese_clip_vision() -> torch.nn.Module:
    return tf.ChineseCLIPVisionModel(tf.ChineseCLIPVisionConfig(**_VISION))


def chinese_clip_text() -> torch.nn.Module:
    return tf.ChineseCLIPTextModel(tf.ChineseCLIPTextConfig(**SMALL, vocab_size=VOCAB))


def chinese_clip_model() -> torch.nn.Module:
    config = tf.ChineseCLIPConfig(text_config=dict(**SMALL, vocab_size=VOCAB), vision_config=_VISION)
    return tf.ChineseCLIPModel(config)


def clipseg_vision() -> torch.nn.Module:
    return tf.CLIPSegVisionModel(tf.CLIPSegVisionConfig(**_VISION))


def clipseg_text() -> torch.nn.Module:
    return tf.CLIPSegTextModel(tf.CLIPSegTextConfig(**_TEXT))


def clipseg_model() -> torch.nn.Module:
    return tf.CLIPSegModel(tf.CLIPSegConfig(text_config=_TEXT, vision_config=_VISION))


def owlvit_vision() -> torch.nn.Module:
    return tf.OwlViTVisionModel(tf.OwlViTVisionConfig(**_VISION))


def owlvit_text() -> torch.nn.Module:
    return tf.OwlViTTextModel(tf.OwlViTTextConfig(**_TEXT))


def owlvit_model() -> torch.nn.Module:
    return tf.OwlViTModel(tf.OwlViTConfig(text_config=_TEXT, vision_config=_VISION))


def owlv2_vision() -> torch.nn.Module:
    return tf.Owlv2VisionModel(tf.Owlv2VisionConfig(**_VISION))


def owlv2_text() -> torch.nn.Module:
    return tf.Owlv2TextModel(tf.Owlv2TextConfig(**_TEXT))


def owlv2_model() -> torch.nn.Module:
    return tf.Owlv2Model(tf.Owlv2Config(text_config=_TEXT, vision_config=_VISION))


PAIRS = {
    "vit+bert": lambda: VisionTextPair(vit(), bert()),
    "clip": clip_model,
    "dual_encoder(vit+bert)": dual_encoder,
    "dinov2+roberta": lambda: VisionTextPair(dinov2(), roberta()),
    "mobilenet_v2+bert": lambda: VisionTextPair(mobilenet_v2(), bert()),
    "detr_resnet+clip_text": lambda: VisionTextPair(detr_resnet(), clip_text()),
    "vit+roberta": lambda: VisionTextPair(vit(), roberta()),
}

# The dual-encoder families, kept out of `PAIRS` (whose every pair runs through many test modules) and tested in
# tests/test_tuner_pairs.py: each family's own vision + text sub-models, a vision sub-model with BERT, and each
# family's container (`SiglipModel`, ...), whose towers are its `vision_model` / `text_model`.
FAMILY_PAIRS = {
    "siglip+siglip_text": lambda: VisionTextPair(siglip_vision(), siglip_text()),
    "siglip2+siglip2_text": lambda: VisionTextPair(siglip2_vision(), siglip2_text()),
    "chinese_clip+chinese_clip_text": lambda: VisionTextPair(chinese_clip_vision(), chinese_clip_text()),
    "clipseg+clipseg_text": lambda: VisionTextPair(clipseg_vision(), clipseg_text()),
    "owlvit+owlvit_text": lambda: VisionTextPair(owlvit_vision(), owlvit_text()),
    "owlv2+owlv2_text": lambda: VisionTextPair(owlv2_vision(), owlv2_text()),
    "siglip2+bert": lambda: VisionTextPair(siglip2_vision(), bert()),
    "owlvit+bert": lambda: VisionTextPair(owlvit_vision(), bert()),
    "siglip": siglip_model,
    "siglip2": siglip2_model,
    "chinese_clip": chinese_clip_model,
    "clipseg": clipseg_model,
    "owlvit": owlvit_model,
    "owlv2": owlv2_model,
}


def build_pair(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return PAIRS[name]().eval()


def build_family_pair(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FAMILY_PAIRS[name]().eval()


def tiny_config(**overrides) -> M2ISTConfig:
    kwargs = dict(bottleneck_dim=8, head_hidden_size=16, head_num_hidden_layers=1, head_num_attention_heads=2, head_intermediate_size=32,
                  max_text_tokens=TEXT_TOKENS, image_size=IMAGE_SIZE, head_dropout=0.0)
    kwargs.update(overrides)
    return M2ISTConfig(**kwargs)


def batch(size: int = 2, seed: int = 1, labels: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {
        "pixel_values": torch.randn(size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
        "input_ids": torch.randint(3, VOCAB, (size, TEXT_TOKENS), generator=g),
        "attention_mask": torch.ones(size, TEXT_TOKENS, dtype=torch.long),
        "pixel_mask": torch.ones(size, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.long),
    }
    out["attention_mask"][0, -2:] = 0
    out["pixel_mask"][0, :, IMAGE_SIZE // 2 :] = 0
    if labels:
        centre = torch.rand(size, 2, generator=g) * 0.5 + 0.25
        size_wh = torch.rand(size, 2, generator=g) * 0.3 + 0.1
        out["labels"] = torch.cat([centre, size_wh], dim=1)
    return out
