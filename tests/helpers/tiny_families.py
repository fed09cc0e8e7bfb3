"""Tiny random towers of every vision and text encoder family the sweep (tests/test_tower_families.py) covers.

Each family is built from transformers' own config class with small sizes (`SMALL`, 2 blocks, 32 x 32 images) and the
per-family overrides its defaults need; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers as tf

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
IMAGE_SIZE = 32
VOCAB = 100
_VIT = {**SMALL, "image_size": IMAGE_SIZE, "patch_size": 8}
_TEXT_IDS = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
_STAGES = {"depths": [1, 1], "hidden_sizes": [16, 32], "num_stages": 2}
_DETR = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 1, "encoder_attention_heads": 2,
         "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "num_queries": 4,
         "use_timm_backbone": False, "use_pretrained_backbone": False}


def _detr_backbone() -> tf.ResNetConfig:
    return tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic",
                           out_features=["stage4"])


@dataclass(frozen=True)
class Family:
    """One tower family: its model class and config class (names in `transformers`), the tiny config's values and
    the image size it is run at (vision towers)."""

    name: str
    model: str
    config: str
    kwargs: dict = field(default_factory=dict)
    image_size: int = IMAGE_SIZE
    # EfficientNet's init draws its batch-norm scales near 0, so a tiny random tower's outputs are all 0: set them to 1
    unit_batch_norms: bool = False

    def build(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        kwargs = dict(self.kwargs)
        if "backbone_config" in kwargs and kwargs["backbone_config"] == "resnet":
            kwargs["backbone_config"] = _detr_backbone()
        tower = getattr(tf, self.model)(getattr(tf, self.config)(**kwargs)).eval()
        if self.unit_batch_norms:
            for module in tower.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    torch.nn.init.ones_(module.weight)
        return tower


VISION_FAMILIES = [
    Family("vit", "ViTModel", "ViTConfig", _VIT),
    Family("deit", "DeiTModel", "DeiTConfig", _VIT),
    Family("beit", "BeitModel", "BeitConfig", _VIT),
    Family("data2vec-vision", "Data2VecVisionModel", "Data2VecVisionConfig", _VIT),
    Family("dinov2", "Dinov2Model", "Dinov2Config", _VIT),
    Family("dinov2_with_registers", "Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", _VIT),
    Family("ijepa", "IJepaModel", "IJepaConfig", _VIT),
    Family("vit_msn", "ViTMSNModel", "ViTMSNConfig", _VIT),
    Family("vit_mae", "ViTMAEModel", "ViTMAEConfig", {**_VIT, "mask_ratio": 0.0}),
    Family("yolos", "YolosModel", "YolosConfig", {**_VIT, "image_size": [IMAGE_SIZE, IMAGE_SIZE],
                                                  "num_detection_tokens": 4}),
    Family("clip_vision_model", "CLIPVisionModel", "CLIPVisionConfig", _VIT),
    Family("siglip_vision_model", "SiglipVisionModel", "SiglipVisionConfig", _VIT),
    Family("siglip2_vision_model", "Siglip2VisionModel", "Siglip2VisionConfig",
           {**SMALL, "patch_size": 8, "num_patches": 16}),
    Family("chinese_clip_vision_model", "ChineseCLIPVisionModel", "ChineseCLIPVisionConfig", _VIT),
    Family("clipseg_vision_model", "CLIPSegVisionModel", "CLIPSegVisionConfig", _VIT),
    Family("owlvit_vision_model", "OwlViTVisionModel", "OwlViTVisionConfig", _VIT),
    Family("owlv2_vision_model", "Owlv2VisionModel", "Owlv2VisionConfig", _VIT),
    Family("swin", "SwinModel", "SwinConfig", {"image_size": IMAGE_SIZE, "patch_size": 4, "embed_dim": 16,
                                               "depths": [1, 1], "num_heads": [1, 2], "window_size": 4}),
    Family("swinv2", "Swinv2Model", "Swinv2Config", {"image_size": IMAGE_SIZE, "patch_size": 4, "embed_dim": 16,
                                                     "depths": [1, 1], "num_heads": [1, 2], "window_size": 4}),
    Family("convnext", "ConvNextModel", "ConvNextConfig", _STAGES),
    Family("convnextv2", "ConvNextV2Model", "ConvNextV2Config", _STAGES),
    Family("pvt", "PvtModel", "PvtConfig", {"image_size": IMAGE_SIZE, "num_encoder_blocks": 2, "depths": [1, 1],
                                            "sequence_reduction_ratios": [2, 1], "hidden_sizes": [16, 32],
                                            "patch_sizes": [4, 2], "strides": [4, 2], "num_attention_heads": [1, 2],
                                            "mlp_ratios": [2, 2]}),
    Family("pvt_v2", "PvtV2Model", "PvtV2Config", {"num_encoder_blocks": 2, "depths": [1, 1], "sr_ratios": [2, 1],
                                                   "hidden_sizes": [16, 32], "patch_sizes": [7, 3], "strides": [4, 2],
                                                   "num_attention_heads": [1, 2], "mlp_ratios": [2, 2]}),
    Family("segformer", "SegformerModel", "SegformerConfig", {"num_encoder_blocks": 2, "depths": [1, 1],
                                                             "sr_ratios": [2, 1], "hidden_sizes": [16, 32],
                                                             "patch_sizes": [7, 3], "strides": [4, 2],
                                                             "num_attention_heads": [1, 2], "mlp_ratios": [2, 2]}),
    Family("hiera", "HieraModel", "HieraConfig", {"image_size": [IMAGE_SIZE, IMAGE_SIZE], "embed_dim": 16,
                                                  "depths": [1, 1], "num_heads": [1, 2], "patch_stride": [4, 4],
                                                  "masked_unit_size": [4, 4], "query_stride": [2, 2],
                                                  "num_query_pool": 1, "masked_unit_attention": [True, False]}),
    Family("focalnet", "FocalNetModel", "FocalNetConfig", {"image_size": IMAGE_SIZE, "patch_size": 4,
                                                           "embed_dim": 16, "depths": [1, 1],
                                                           "focal_levels": [2, 2], "focal_windows": [3, 3]}),
    Family("efficientnet", "EfficientNetModel", "EfficientNetConfig", {"image_size": 64, "width_coefficient": 0.25,
                                                                       "depth_coefficient": 0.25,
                                                                       "hidden_dim": 320}, image_size=64,
           unit_batch_norms=True),
    Family("regnet", "RegNetModel", "RegNetConfig", {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
                                                     "groups_width": 8}),
    Family("resnet", "ResNetModel", "ResNetConfig", {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
                                                     "layer_type": "basic"}),
    Family("bit", "BitModel", "BitConfig", {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
                                            "layer_type": "bottleneck", "num_groups": 2}),
    Family("mobilenet_v1", "MobileNetV1Model", "MobileNetV1Config", {"depth_multiplier": 0.25,
                                                                     "image_size": IMAGE_SIZE}),
    Family("mobilenet_v2", "MobileNetV2Model", "MobileNetV2Config", {"depth_multiplier": 0.35,
                                                                     "image_size": IMAGE_SIZE}),
    Family("mobilevit", "MobileViTModel", "MobileViTConfig", {"image_size": IMAGE_SIZE, "hidden_sizes": [16, 24, 32],
                                                              "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64]}),
    Family("mobilevitv2", "MobileViTV2Model", "MobileViTV2Config", {"image_size": 64, "width_multiplier": 0.25},
           image_size=64),
    Family("detr", "DetrModel", "DetrConfig", {**_DETR, "backbone_config": "resnet"}),
    Family("conditional_detr", "ConditionalDetrModel", "ConditionalDetrConfig", {**_DETR, "backbone_config": "resnet"}),
    Family("table-transformer", "TableTransformerModel", "TableTransformerConfig",
           {**_DETR, "backbone_config": "resnet"}),
]

_BERTISH = {**SMALL, "vocab_size": VOCAB}
_T5 = {"vocab_size": VOCAB, "d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 2}

TEXT_FAMILIES = [
    Family("bert", "BertModel", "BertConfig", _BERTISH),
    Family("roberta", "RobertaModel", "RobertaConfig", _BERTISH),
    Family("xlm-roberta", "XLMRobertaModel", "XLMRobertaConfig", _BERTISH),
    Family("xlm-roberta-xl", "XLMRobertaXLModel", "XLMRobertaXLConfig", _BERTISH),
    Family("camembert", "CamembertModel", "CamembertConfig", _BERTISH),
    Family("data2vec-text", "Data2VecTextModel", "Data2VecTextConfig", _BERTISH),
    Family("megatron-bert", "MegatronBertModel", "MegatronBertConfig", _BERTISH),
    Family("ernie", "ErnieModel", "ErnieConfig", _BERTISH),
    Family("electra", "ElectraModel", "ElectraConfig", {**_BERTISH, "embedding_size": 32}),
    Family("roformer", "RoFormerModel", "RoFormerConfig", {**_BERTISH, "embedding_size": 32}),
    Family("convbert", "ConvBertModel", "ConvBertConfig", {**_BERTISH, "embedding_size": 32}),
    Family("albert", "AlbertModel", "AlbertConfig", {**_BERTISH, "embedding_size": 32}),
    Family("deberta", "DebertaModel", "DebertaConfig", _BERTISH),
    Family("deberta-v2", "DebertaV2Model", "DebertaV2Config", _BERTISH),
    Family("distilbert", "DistilBertModel", "DistilBertConfig", {"vocab_size": VOCAB, "dim": 32, "n_layers": 2,
                                                                 "n_heads": 2, "hidden_dim": 64}),
    Family("mpnet", "MPNetModel", "MPNetConfig", _BERTISH),
    Family("modernbert", "ModernBertModel", "ModernBertConfig", {**_BERTISH, "pad_token_id": 1}),
    Family("nystromformer", "NystromformerModel", "NystromformerConfig", {**_BERTISH, "num_landmarks": 2,
                                                                          "segment_means_seq_len": 6}),
    Family("funnel", "FunnelBaseModel", "FunnelConfig", {"vocab_size": VOCAB, "d_model": 32, "n_head": 2,
                                                         "d_head": 16, "d_inner": 64, "block_sizes": [1, 1]}),
    Family("t5", "T5EncoderModel", "T5Config", _T5),
    Family("mt5", "MT5EncoderModel", "MT5Config", _T5),
    Family("umt5", "UMT5EncoderModel", "UMT5Config", _T5),
    Family("clip_text_model", "CLIPTextModel", "CLIPTextConfig", {**SMALL, **_TEXT_IDS}),
    Family("siglip_text_model", "SiglipTextModel", "SiglipTextConfig", {**SMALL, **_TEXT_IDS}),
    Family("siglip2_text_model", "Siglip2TextModel", "Siglip2TextConfig", {**SMALL, **_TEXT_IDS}),
    Family("chinese_clip_text_model", "ChineseCLIPTextModel", "ChineseCLIPTextConfig", _BERTISH),
    Family("clipseg_text_model", "CLIPSegTextModel", "CLIPSegTextConfig", {**SMALL, **_TEXT_IDS}),
    Family("owlvit_text_model", "OwlViTTextModel", "OwlViTTextConfig", {**SMALL, **_TEXT_IDS}),
    Family("owlv2_text_model", "Owlv2TextModel", "Owlv2TextConfig", {**SMALL, **_TEXT_IDS}),
]
