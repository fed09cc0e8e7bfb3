"""The tuning methods compared: full fine-tuning, LoRA, in-tower adapters, head-only tuning and M2IST.

Every method is a `nn.Module` whose forward takes the REC batch (`pixel_values`, `input_ids`, `attention_mask`,
`pixel_mask`, `labels`) and returns an object with `.loss` and `.pred_boxes`:

- ``full``: towers + projections + head trainable, the towers in train mode, gradients through the towers;
- ``lora``: peft LoRA on the towers' attention linears (+ projections + head), gradients through the towers;
- ``adapter``: bottleneck adapters added by forward hooks to the FFN output of every tower block (+ head);
- ``head_only``: towers frozen under `no_grad` (eval mode), projections + `GroundingHead` trainable;
- ``m2ist_<interaction>_<mixture>``: the library's M2IST adapter through `peft.get_peft_model`;
- ``m2ist_paper``: the same with `M2ISTConfig(preset="paper")`, the authors' model (docs/fidelity.md).

The baselines are built here from the same towers, `peft_m2ist.modeling.head.GroundingHead` and `peft_m2ist.modeling.loss.box_losses`,
mirroring what M2IST's forward does (final tokens -> Linear to the head width -> head), without the side network.

This is the one module of the benchmarks that reaches into the library's internals (the tower runners, the head, the
loss and the output class); the other modules use `peft_m2ist`'s public names.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from torch import nn

import peft_m2ist
from benchmarks.scales import Scale
from peft_m2ist.modeling.head import GroundingHead
from peft_m2ist.modeling.loss import box_losses
from peft_m2ist.modeling.outputs import ReferringExpressionOutput
from peft_m2ist.towers.forward import frozen, run_text_tower, run_vision_tower
from peft_m2ist.tuner.config import field_choices

BASELINES = ("full", "lora", "adapter", "head_only")
M2IST_VARIANTS = tuple(
    f"m2ist_{interaction}_{mixture}" for interaction in field_choices("interaction") for mixture in field_choices("mixture")
)
M2IST_PRESET_METHODS = ("m2ist_paper",)  # `M2ISTConfig(preset="paper")`: the authors' model (docs/fidelity.md)
ALL_METHODS = BASELINES + M2IST_VARIANTS + M2IST_PRESET_METHODS


class BaselineREC(nn.Module):
    """Towers -> final tokens -> Linear to the head width -> `GroundingHead`; L1 + GIoU loss.

    With `freeze_towers` the towers run in eval mode under `torch.no_grad()` (head-only tuning); otherwise they run in
    the module's own mode and gradients flow through them wherever something inside requires grad.
    """

    def __init__(self, pair: nn.Module, num_vision_tokens: int, freeze_towers: bool, head_dim: int = 256,
                 head_layers: int = 6, head_heads: int = 8, head_ffn_dim: int = 2048, head_dropout: float = 0.1,
                 max_text_tokens: int = 20, vision_grid: tuple[int, int] | None = None,
                 head_gradient_checkpointing: bool = False, head_recompute_feed_forward: bool = True) -> None:
        super().__init__()
        self.pair = pair
        self.freeze_towers = freeze_towers
        vision_dim, text_dim = _token_width(pair.vision_model), pair.text_model.config.hidden_size
        self.vision_proj = nn.Linear(vision_dim, head_dim)
        self.text_proj = nn.Linear(text_dim, head_dim)
        head_config = peft_m2ist.M2ISTConfig(  # M2IST's head, same defaults
            head_hidden_size=head_dim, head_num_hidden_layers=head_layers, head_num_attention_heads=head_heads,
            head_intermediate_size=head_ffn_dim, head_dropout=head_dropout, max_text_tokens=max_text_tokens,
            head_gradient_checkpointing=head_gradient_checkpointing,
            head_recompute_feed_forward=head_recompute_feed_forward)
        self.head = GroundingHead(head_config, num_vision_tokens, vision_grid)
        self.adapters = nn.ModuleList()  # filled by `add_bottleneck_adapters`

    def forward(self, pixel_values, input_ids, attention_mask=None, pixel_mask=None, labels=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        towers = (self.pair.vision_model, self.pair.text_model)
        with frozen(*towers) if self.freeze_towers else nullcontext():
            vision = run_vision_tower(self.pair.vision_model, pixel_values, pixel_mask)
            text = run_text_tower(self.pair.text_model, input_ids, attention_mask)
        dtype = self.vision_proj.weight.dtype
        vision_tokens = self.vision_proj(vision.tokens.tensor.to(dtype))
        text_tokens = self.text_proj(text.tokens.tensor.to(dtype))
        boxes = self.head(text_tokens, attention_mask, vision_tokens, vision.mask)
        if labels is None:
            return ReferringExpressionOutput(pred_boxes=boxes)
        parts = box_losses(boxes.float(), labels.float())
        return ReferringExpressionOutput(loss=parts["loss_l1"] + parts["loss_giou"], pred_boxes=boxes, **parts)


def _token_width(vision: nn.Module) -> int:
    """Width of the vision tower's final tokens, measured on a small dummy image (towers may be truncated)."""
    return vision_token_layout(vision, 64)[2]


class BottleneckAdapter(nn.Module):
    """Houlsby-style adapter `x + up(relu(down(x)))` on the last (tokens) or channel (maps) dimension; up starts at 0."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # (batch, channels, h, w)
            y = x.permute(0, 2, 3, 1)
            return x + self.up(torch.relu(self.down(y))).permute(0, 3, 1, 2)
        return x + self.up(torch.relu(self.down(x)))


def _output_width(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if convs:
        return convs[-1].out_channels
    return linears[-1].out_features


def add_bottleneck_adapters(model: BaselineREC, sites: list[str], bottleneck: int) -> None:
    """Register a `BottleneckAdapter` on the output of each site (a forward hook replaces the output)."""
    for name in sites:
        module = model.pair.get_submodule(name)
        width = _output_width(module)
        adapter = BottleneckAdapter(width, min(bottleneck, width))
        model.adapters.append(adapter)
        module.register_forward_hook(lambda _m, _inp, out, adapter=adapter: adapter(out))


def run_towers(vision: nn.Module, text: nn.Module, inputs: dict) -> None:
    """Both towers' forward on a REC batch, frozen (eval mode, `no_grad`): the "towers alone" of inference latency."""
    with frozen(vision, text):
        run_vision_tower(vision, inputs["pixel_values"], inputs["pixel_mask"])
        run_text_tower(text, inputs["input_ids"], inputs["attention_mask"])


def count_vision_tokens(vision: nn.Module, image_size: int) -> int:
    return vision_token_layout(vision, image_size)[0]


def vision_token_layout(vision: nn.Module, image_size: int) -> tuple[int, tuple[int, int] | None, int]:
    """`(number of vision tokens, their (h, w) grid or None, token width)` for square `image_size` inputs."""
    with frozen(vision):
        out = run_vision_tower(vision, torch.zeros(1, 3, image_size, image_size), None)
    return out.tokens.num_tokens, out.tokens.grid, out.tokens.dim


def build_method(name: str, scale: Scale, seed: int = 0, bottleneck: int = 128, lora_rank: int = 16,
                 num_vision_tokens: int | None = None, head_dropout: float = 0.1, head_layers: int = 6,
                 head_ffn_dim: int = 2048, head_gradient_checkpointing: bool = False,
                 head_recompute_feed_forward: bool = True, m2ist_fields: dict | None = None) -> nn.Module:
    """A fresh model of method `name` on deep copies of the scale's towers (identical weights for every method).

    Every method gets the same grounding head (`head_layers`, `head_ffn_dim`, `head_dropout`; TransVG's 6 x 2048 by
    default, the training example uses 2 x 512), with `head_gradient_checkpointing` and `head_recompute_feed_forward`
    (`M2ISTConfig`'s names) set alike for all of them. `m2ist_fields` (M2IST methods only) sets more `M2ISTConfig`
    fields, over the method's own (`benchmarks/learning_curve.py`'s field runs).
    """
    pair = peft_m2ist.VisionTextPair(copy.deepcopy(scale.vision), copy.deepcopy(scale.text))
    torch.manual_seed(seed + 1)
    if name.startswith("m2ist_"):
        from peft import get_peft_model

        if name in M2IST_PRESET_METHODS:  # the preset sets interaction and mixture (and every fidelity field)
            choice = {"preset": name[len("m2ist_"):]}
        else:
            interaction, mixture = name[len("m2ist_"):].rsplit("_", 1)
            choice = {"interaction": interaction, "mixture": mixture}
        choice = {**choice, **(m2ist_fields or {})}
        config = peft_m2ist.M2ISTConfig(bottleneck_dim=bottleneck, **choice,
                                        image_size=scale.image_size, max_text_tokens=scale.text_tokens,
                                        head_dropout=head_dropout, head_num_hidden_layers=head_layers,
                                        head_intermediate_size=head_ffn_dim,
                                        head_gradient_checkpointing=head_gradient_checkpointing,
                                        head_recompute_feed_forward=head_recompute_feed_forward,
                                        **copy.deepcopy(scale.m2ist_taps))
        model = get_peft_model(pair, config)
        model.method_note = "peft_m2ist M2ISTConfig(" + "".join(f"{k}={v!r}, " for k, v in choice.items()) \
                            + f"bottleneck_dim={bottleneck})"
        return model
    counted, grid, _ = vision_token_layout(scale.vision, scale.image_size)
    model = BaselineREC(pair, num_vision_tokens or counted, freeze_towers=name == "head_only",
                        head_layers=head_layers, head_ffn_dim=head_ffn_dim, head_dropout=head_dropout,
                        max_text_tokens=scale.text_tokens, vision_grid=grid,
                        head_gradient_checkpointing=head_gradient_checkpointing,
                        head_recompute_feed_forward=head_recompute_feed_forward)
    for p in model.pair.parameters():
        p.requires_grad_(False)
    if name == "full":
        for pname, p in model.pair.named_parameters():
            p.requires_grad_(not pname.startswith(scale.unused_prefixes))
        model.method_note = "towers (all parameters the REC forward uses) + projections + head"
    elif name == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                           target_modules=scale.lora_targets), model.pair)
        for pname, p in model.pair.named_parameters():
            p.requires_grad_("lora_" in pname)
        model.method_note = f"peft LoRA r={lora_rank}, alpha={2 * lora_rank} on {scale.lora_note}; + projections + head"
    elif name == "adapter":
        add_bottleneck_adapters(model, scale.adapter_sites, bottleneck)
        model.method_note = f"bottleneck adapters (width <= {bottleneck}) {scale.adapter_note}; + projections + head"
    elif name == "head_only":
        model.method_note = "towers frozen under no_grad (eval); projections + head"
    else:
        raise ValueError(f"unknown method {name!r}; known: {ALL_METHODS}")
    if name != "head_only":
        model.pair.train()  # gradient-based tuning of the towers runs them as in training (dropout on)
    return model


def parameter_counts(model: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    counts = {"trainable": trainable, "total": total}
    if hasattr(model, "get_parameter_counts"):
        counts.update({f"m2ist_{k}": v for k, v in model.get_parameter_counts().items()})
        counts["adapter_only"] = counts["m2ist_adapter_only"]
    elif isinstance(model, BaselineREC):
        head = sum(p.numel() for m in (model.head, model.vision_proj, model.text_proj) for p in m.parameters())
        counts["projections_and_head"] = head
        counts["adapter_only"] = trainable - head
    return counts
