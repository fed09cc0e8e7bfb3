"""The backbone pairs the benchmarks compare methods on, and the synthetic REC batches fed to them.

- ``paper``: DETR-R50 (backbone + 6-layer encoder; the decoder is never run) + BERT-base, random weights, 640 px;
- ``default``: the training example's offline pair, ImageNet MobileNetV2 cut at stride 16 + MiniLM-L6, 128 px;
- ``tiny``: the paper's layout at toy widths, for CPU dry runs of the GPU scripts.

A `Scale` also says where each baseline puts its trainable parts (LoRA targets, adapter sites) and which tower
layers M2IST taps; `benchmarks/baselines.py` builds the methods from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

import peft_m2ist


@dataclass
class Scale:
    """One backbone pair and everything the methods need to know about it."""

    name: str
    vision: nn.Module
    text: nn.Module
    image_size: int
    text_tokens: int
    description: str
    m2ist_taps: dict  # tap fields of M2ISTConfig (empty: the library's auto resolution)
    lora_targets: str  # regex over the container's module names
    lora_note: str
    adapter_sites: list[str]  # container module names whose outputs get a bottleneck adapter
    adapter_note: str
    unused_prefixes: tuple[str, ...] = ()  # tower parameters the REC forward never uses (kept frozen)
    vocab_size: int = 30522
    extra: dict = field(default_factory=dict)


class _Removed(nn.Module):
    """Stands in for a sub-module the REC forward never runs (it holds no weights)."""

    def __init__(self, why: str) -> None:
        super().__init__()
        self.why = why

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"removed for the benchmark: {self.why}")

    def extra_repr(self) -> str:
        return self.why


def _detr_bert_scale(name: str, vision: nn.Module, text: nn.Module, image_size: int, description: str) -> Scale:
    """A DETR + BERT pair laid out as the paper's: M2IST taps on encoder layers 0-5 of both, LoRA on every attention
    linear, bottleneck adapters after every FFN."""
    # Neither M2IST (`peft_m2ist.towers.forward.run_vision_tower`) nor the baselines run DETR's decoder: drop its weights so
    # every method's account holds only the weights a REC step uses.
    vision.decoder = _Removed("DETR decoder: never run for REC (the encoder's tokens feed the head)")
    vision.query_position_embeddings = _Removed("DETR object queries: decoder only")
    layers = range(6)
    vision_depth, text_depth = len(vision.encoder.layers), len(text.encoder.layer)
    return Scale(
        name=name,
        vision=vision,
        text=text,
        image_size=image_size,
        text_tokens=20,
        description=description,
        m2ist_taps=dict(
            vision_layers=[f"encoder.layers.{i}.mlp" for i in layers],
            vision_attention_layers=[f"encoder.layers.{i}.self_attn" for i in layers],
            text_layers=[f"encoder.layer.{i}.output.dense" for i in layers],
            text_attention_layers=[f"encoder.layer.{i}.attention" for i in layers],
        ),
        lora_targets=r"(vision_model\.encoder\.layers\.\d+\.self_attn\.(q|k|v|o)_proj"
                     r"|text_model\.encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense))",
        lora_note=f"q/k/v/out linears of the {vision_depth} DETR encoder layers and the {text_depth} BERT layers",
        adapter_sites=[f"vision_model.encoder.layers.{i}.mlp" for i in range(vision_depth)]
        + [f"text_model.encoder.layer.{i}.output.dense" for i in range(text_depth)],
        adapter_note=f"after the FFN (before residual + LayerNorm) of the {vision_depth} DETR encoder layers and the "
                     f"{text_depth} BERT layers",
        unused_prefixes=("text_model.pooler.",),
    )


def paper_scale() -> Scale:
    """DETR-R50 (backbone + 6-layer encoder; the decoder is never run) + BERT-base, random weights, 640 px."""
    from transformers import BertConfig, BertModel, DetrConfig, DetrModel, ResNetConfig

    backbone = ResNetConfig(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                            out_features=["stage4"])
    vision = DetrModel(DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
                                  d_model=256, encoder_layers=6, decoder_layers=6))
    return _detr_bert_scale("paper", vision, BertModel(BertConfig()), 640,
                            "DETR-R50 encoder (d=256, 6 layers) + BERT-base (12 layers, d=768), random weights, 640 px, "
                            "20 tokens")


def default_scale() -> Scale:
    """The training example's offline default pair: ImageNet MobileNetV2 cut at stride 16 + MiniLM-L6, 128 px."""
    from peft_m2ist.pretrained import MOBILENET_V2_STRIDE16_TOWER, load_text_tower, load_vision_tower

    vision, _ = load_vision_tower(MOBILENET_V2_STRIDE16_TOWER)
    text, tokenizer = load_text_tower()
    blocks = len(vision.layer)
    return Scale(
        name="default",
        vision=vision,
        text=text,
        image_size=128,
        text_tokens=20,
        description="MobileNetV2 ImageNet cut at stride 16 (offline:mobilenet_v2-stride16) + MiniLM-L6 "
                    "(offline:minilm-l6), 128 px, 20 tokens",
        m2ist_taps={},
        lora_targets=r"(vision_model\.layer\.\d+\.(expand_1x1|reduce_1x1)\.convolution"
                     r"|text_model\.encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense))",
        lora_note=f"MobileNetV2 has no attention: the pointwise (1x1) convolutions of its {blocks} blocks; "
                  "q/k/v/out linears of the 6 MiniLM layers",
        adapter_sites=[f"vision_model.layer.{i}" for i in range(blocks)]
        + [f"text_model.encoder.layer.{i}.output.dense" for i in range(len(text.encoder.layer))],
        adapter_note=f"after each of the {blocks} MobileNetV2 inverted-residual blocks (on channels) and after the FFN of "
                     "the 6 MiniLM layers",
        unused_prefixes=("text_model.pooler.",),
        vocab_size=tokenizer.vocab_size,
    )


def tiny_scale() -> Scale:
    """The paper's layout at toy widths, for CPU dry runs (`benchmarks/gpu_day.py --dry-run`): DETR (basic ResNet of
    widths 8-32, d=32, 6 encoder layers) + BERT (d=64, 6 layers), random weights, 128 px, 20 tokens."""
    from transformers import BertConfig, BertModel, DetrConfig, DetrModel, ResNetConfig

    backbone = ResNetConfig(layer_type="basic", depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 16, 32], embedding_size=8,
                            out_features=["stage4"])
    vision = DetrModel(DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
                                  d_model=32, encoder_layers=6, decoder_layers=1, encoder_attention_heads=2,
                                  decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=4))
    text = BertModel(BertConfig(hidden_size=64, num_hidden_layers=6, num_attention_heads=2, intermediate_size=128))
    return _detr_bert_scale("tiny", vision, text, 128, "toy DETR (d=32, 6 encoder layers) + toy BERT (d=64, 6 "
                            "layers), random weights, 128 px, 20 tokens")


FROZEN_BATCH_NORMS = ("folded", "fused", "stock")


def build_scale(name: str, seed: int = 0, frozen_batch_norm: str = "folded") -> Scale:
    """The scale's frozen towers, in eval mode. Frozen batch norms (DETR's ResNet), for every method alike: "folded"
    into the convolutions before them (`peft_m2ist.fold_frozen_batch_norms`; convolutions that train, as in full
    fine-tuning, apply the fused norm after them instead), "fused" into one op (`peft_m2ist.fuse_frozen_batch_norms`)
    or "stock"."""
    if frozen_batch_norm not in FROZEN_BATCH_NORMS:
        raise ValueError(f"`frozen_batch_norm` must be one of {FROZEN_BATCH_NORMS}, got {frozen_batch_norm!r}.")
    torch.manual_seed(seed)
    scale = {"paper": paper_scale, "default": default_scale, "tiny": tiny_scale}[name]()
    if frozen_batch_norm == "folded":
        peft_m2ist.fold_frozen_batch_norms(scale.vision)
    elif frozen_batch_norm == "fused":
        peft_m2ist.fuse_frozen_batch_norms(scale.vision)
    scale.vision.eval()
    scale.text.eval()
    for p in list(scale.vision.parameters()) + list(scale.text.parameters()):
        p.requires_grad_(False)
    return scale



def make_batch(scale: Scale, batch_size: int, device: torch.device | str = "cpu", seed: int = 0) -> dict:
    """A synthetic REC batch: random pixels, ~half the canvas rows padded on odd samples, 12 real tokens of 20."""
    g = torch.Generator().manual_seed(seed)
    s, n = scale.image_size, scale.text_tokens
    pixel_values = torch.randn(batch_size, 3, s, s, generator=g)
    pixel_mask = torch.ones(batch_size, s, s, dtype=torch.long)
    pixel_mask[1::2, 3 * s // 4:, :] = 0
    pixel_values = pixel_values * pixel_mask[:, None]
    input_ids = torch.randint(1000, min(scale.vocab_size, 20000), (batch_size, n), generator=g)
    attention_mask = torch.zeros(batch_size, n, dtype=torch.long)
    attention_mask[:, :12] = 1
    input_ids = input_ids * attention_mask
    centre = 0.3 + 0.4 * torch.rand(batch_size, 2, generator=g)
    size = 0.1 + 0.3 * torch.rand(batch_size, 2, generator=g)
    labels = torch.cat([centre, size], dim=1)
    batch = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                 pixel_mask=pixel_mask, labels=labels)
    return {k: v.to(device) for k, v in batch.items()}

