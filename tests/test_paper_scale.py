"""The paper's setting built from configs: DETR-R50 encoder (d=256) + BERT-base, taps on layers 0-5, bottleneck 128."""

from __future__ import annotations

from pathlib import Path

import transformers as tf
from peft import get_peft_model

from peft_m2ist import M2ISTConfig, VisionTextPair

PAPER_ADAPTER_ONLY = 2_990_000  # the paper's 3.19M minus the ~0.2M of modules its code builds but never calls


def paper_pair() -> VisionTextPair:
    resnet50 = tf.ResNetConfig(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                               embedding_size=64, out_features=["stage4"])
    detr = tf.DetrModel(tf.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False,
                                      backbone_config=resnet50, d_model=256, encoder_layers=6, decoder_layers=1))
    return VisionTextPair(detr, tf.BertModel(tf.BertConfig()))


def paper_config(**overrides) -> M2ISTConfig:
    kwargs = dict(
        vision_layers=[f"encoder.layers.{i}.mlp" for i in range(6)],
        vision_attention_layers=[f"encoder.layers.{i}.self_attn" for i in range(6)],
        text_layers=[f"encoder.layer.{i}.output.dense" for i in range(6)],
        text_attention_layers=[f"encoder.layer.{i}.attention" for i in range(6)],
        bottleneck_dim=128, interaction="shared", mixture="sum", image_size=640, max_text_tokens=20,
    )
    kwargs.update(overrides)
    return M2ISTConfig(**kwargs)


def test_paper_scale_adapter_only_count_is_within_5_percent_of_2_99m():
    model = get_peft_model(paper_pair(), paper_config())
    counts = model.get_parameter_counts()
    model.print_parameter_counts()
    print(f"adapter-only: {counts['adapter_only']:,}  projections + head: {counts['projections_and_head']:,}  "
          f"towers: {counts['towers']:,}")
    assert abs(counts["adapter_only"] - PAPER_ADAPTER_ONLY) / PAPER_ADAPTER_ONLY < 0.05
    # 400 vision tokens at 640 px (stride 32), as in the paper
    assert model.peft_config["default"].tower_shapes["vision"]["num_tokens"] == 400
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == counts["adapter_and_head"]
    # docs/concepts.md quotes this printout and breaks the head count down: it must not drift from the code
    concepts = (Path(__file__).resolve().parent.parent / "docs" / "concepts.md").read_text()
    assert (f"adapter-only: {counts['adapter_only']:,}  projections + head: {counts['projections_and_head']:,}  "
            f"towers: {counts['towers']:,}") in concepts
    assert f"adapter + head params: {counts['adapter_and_head']:,}" in concepts
