"""Shared pieces of the benchmarks: the backbone pairs, the tuning methods and the measurements.

Every method is a `nn.Module` whose forward takes the REC batch (`pixel_values`, `input_ids`, `attention_mask`,
`pixel_mask`, `labels`) and returns an object with `.loss` and `.pred_boxes`:

- ``full``: towers + projections + head trainable, the towers in train mode, gradients through the towers;
- ``lora``: peft LoRA on the towers' attention linears (+ projections + head), gradients through the towers;
- ``adapter``: bottleneck adapters added by forward hooks to the FFN output of every tower block (+ head);
- ``head_only``: towers frozen under `no_grad` (eval mode), projections + `GroundingHead` trainable;
- ``m2ist_<interaction>_<mixture>``: the library's M2IST adapter through `peft.get_peft_model`.

The baselines are built here from the same towers, `peft_m2ist.head.GroundingHead` and `peft_m2ist.loss.box_losses`,
mirroring what M2IST's forward does (final tokens -> Linear to the head width -> head), without the side network.
"""

from __future__ import annotations

import copy
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import peft_m2ist
from peft_m2ist.head import GroundingHead
from peft_m2ist.loss import box_losses
from peft_m2ist.model import ReferringExpressionOutput
from peft_m2ist.towers import frozen, run_text_tower, run_vision_tower

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BASELINES = ("full", "lora", "adapter", "head_only")
M2IST_VARIANTS = tuple(
    f"m2ist_{interaction}_{mixture}" for interaction in ("shared", "cross_attention") for mixture in ("sum", "gated")
)
ALL_METHODS = BASELINES + M2IST_VARIANTS
PAPER_ADAPTER_PARAMS = 2.99e6  # adapter-only count of the reference code (method.md)


# ---------------------------------------------------------------------------------------------- scales / towers
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


def paper_scale() -> Scale:
    """DETR-R50 (backbone + 6-layer encoder; the decoder is never run) + BERT-base, random weights, 640 px."""
    from transformers import BertConfig, BertModel, DetrConfig, DetrModel, ResNetConfig

    backbone = ResNetConfig(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                            out_features=["stage4"])
    vision = DetrModel(DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
                                  d_model=256, encoder_layers=6, decoder_layers=6))
    text = BertModel(BertConfig())
    # Neither M2IST (`peft_m2ist.towers.run_vision_tower`) nor the baselines run DETR's decoder: drop its weights so
    # every method's account holds only the weights a REC step uses.
    vision.decoder = _Removed("DETR decoder: never run for REC (the encoder's tokens feed the head)")
    vision.query_position_embeddings = _Removed("DETR object queries: decoder only")
    layers = range(6)
    return Scale(
        name="paper",
        vision=vision,
        text=text,
        image_size=640,
        text_tokens=20,
        description="DETR-R50 encoder (d=256, 6 layers) + BERT-base (12 layers, d=768), random weights, 640 px, "
                    "20 tokens",
        m2ist_taps=dict(
            vision_layers=[f"encoder.layers.{i}.mlp" for i in layers],
            vision_attention_layers=[f"encoder.layers.{i}.self_attn" for i in layers],
            text_layers=[f"encoder.layer.{i}.output" for i in layers],
            text_attention_layers=[f"encoder.layer.{i}.attention" for i in layers],
        ),
        lora_targets=r"(vision_model\.encoder\.layers\.\d+\.self_attn\.(q|k|v|o)_proj"
                     r"|text_model\.encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense))",
        lora_note="q/k/v/out linears of the 6 DETR encoder layers and the 12 BERT layers",
        adapter_sites=[f"vision_model.encoder.layers.{i}.mlp" for i in range(6)]
        + [f"text_model.encoder.layer.{i}.output.dense" for i in range(12)],
        adapter_note="after the FFN (before residual + LayerNorm) of the 6 DETR encoder layers and the 12 BERT layers",
        unused_prefixes=("text_model.pooler.",),
    )


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


FROZEN_BATCH_NORMS = ("folded", "fused", "stock")


def build_scale(name: str, seed: int = 0, frozen_batch_norm: str = "folded") -> Scale:
    """The scale's frozen towers, in eval mode. Frozen batch norms (DETR's ResNet), for every method alike: "folded"
    into the convolutions before them (`peft_m2ist.fold_frozen_batch_norms`; convolutions that train, as in full
    fine-tuning, apply the fused norm after them instead), "fused" into one op (`peft_m2ist.fuse_frozen_batch_norms`)
    or "stock"."""
    if frozen_batch_norm not in FROZEN_BATCH_NORMS:
        raise ValueError(f"`frozen_batch_norm` must be one of {FROZEN_BATCH_NORMS}, got {frozen_batch_norm!r}.")
    torch.manual_seed(seed)
    scale = {"paper": paper_scale, "default": default_scale}[name]()
    if frozen_batch_norm == "folded":
        peft_m2ist.fold_frozen_batch_norms(scale.vision)
    elif frozen_batch_norm == "fused":
        peft_m2ist.fuse_frozen_batch_norms(scale.vision)
    scale.vision.eval()
    scale.text.eval()
    for p in list(scale.vision.parameters()) + list(scale.text.parameters()):
        p.requires_grad_(False)
    return scale


# ---------------------------------------------------------------------------------------------- the REC models
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
        self.head = GroundingHead(head_dim, head_layers, head_heads, head_ffn_dim, head_dropout, max_text_tokens,
                                  num_vision_tokens, vision_grid=vision_grid,
                                  gradient_checkpointing=head_gradient_checkpointing,
                                  recompute_feed_forward=head_recompute_feed_forward)  # M2IST's head, same defaults
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
                 head_recompute_feed_forward: bool = True) -> nn.Module:
    """A fresh model of method `name` on deep copies of the scale's towers (identical weights for every method).

    Every method gets the same grounding head (`head_layers`, `head_ffn_dim`, `head_dropout`; TransVG's 6 x 2048 by
    default, the training example uses 2 x 512), with `head_gradient_checkpointing` and `head_recompute_feed_forward`
    (`M2ISTConfig`'s names) set alike for all of them.
    """
    pair = peft_m2ist.VisionTextPair(copy.deepcopy(scale.vision), copy.deepcopy(scale.text))
    torch.manual_seed(seed + 1)
    if name.startswith("m2ist_"):
        interaction, mixture = name[len("m2ist_"):].rsplit("_", 1)
        from peft import get_peft_model

        config = peft_m2ist.M2ISTConfig(bottleneck_dim=bottleneck, interaction=interaction, mixture=mixture,
                                        image_size=scale.image_size, max_text_tokens=scale.text_tokens,
                                        head_dropout=head_dropout, head_num_hidden_layers=head_layers,
                                        head_intermediate_size=head_ffn_dim,
                                        head_gradient_checkpointing=head_gradient_checkpointing,
                                        head_recompute_feed_forward=head_recompute_feed_forward,
                                        **copy.deepcopy(scale.m2ist_taps))
        model = get_peft_model(pair, config)
        model.method_note = f"peft_m2ist M2ISTConfig(interaction={interaction!r}, mixture={mixture!r}, " \
                            f"bottleneck_dim={bottleneck})"
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


# ---------------------------------------------------------------------------------------------- batches
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


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)


# ---------------------------------------------------------------------------------------------- exact account
def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return None


def _unique_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        info = _storage(t)
        if info is not None:
            seen[info[0]] = info[1]
    return sum(seen.values())


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, autocast=None) -> torch.Tensor:
    """One training step: forward, backward, AdamW step; gradients are freed (set to None) first."""
    optimizer.zero_grad(set_to_none=True)
    with autocast() if autocast is not None else nullcontext():
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.detach()


class SavedForBackward:
    """Context manager collecting the storages autograd keeps for backward while it is active, each counted once.

    Those are the tensors packed by `saved_tensors_hooks`, plus the tensor inputs of `torch.utils.checkpoint.checkpoint`
    calls: a checkpointed function keeps them for its recompute, where the hooks do not see them. Storages in
    `exclude` (data pointers, e.g. of parameters and buffers) go to `excluded` instead of `storages`.

    Only storages still alive when the context exits count: a tensor saved by a part of the graph that the forward
    then drops (an output nothing uses) is not kept for backward, and the allocator may hand its address to a later
    tensor, which must not be mistaken for it.
    """

    def __init__(self, exclude: set[int] = frozenset()) -> None:
        self.exclude = exclude
        self.storages: dict[int, int] = {}  # data pointer -> bytes, of the storages alive at exit
        self.excluded: dict[int, int] = {}
        self.unreadable = 0
        self._packed: dict[int, tuple[StorageWeakRef, int]] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._real_checkpoint = torch.utils.checkpoint.checkpoint

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        info = _storage(t)
        if info is None:
            self.unreadable += 1
        elif info[0] in self.exclude:
            self.excluded[info[0]] = info[1]
        elif info[1] > 0:
            known = self._packed.get(info[0])
            if known is None or known[0].expired():  # a new storage, possibly at a freed one's address
                self._packed[info[0]] = (StorageWeakRef(t.untyped_storage()), info[1])
        return t

    def _checkpoint(self, function, *args, **kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                self._pack(value)
        return self._real_checkpoint(function, *args, **kwargs)

    def __enter__(self) -> SavedForBackward:
        torch.utils.checkpoint.checkpoint = self._checkpoint  # seen by callers that look it up at call time
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        torch.utils.checkpoint.checkpoint = self._real_checkpoint
        self.storages = {ptr: size for ptr, (ref, size) in self._packed.items() if not ref.expired()}


def exact_account(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, autocast=None) -> dict:
    """Bytes of one training step, machine-independent up to the kernels' choice of what to save.

    - `weights`: every parameter and buffer of the model (frozen ones included), each storage once;
    - `trainable`: the trainable parameters; `grads`: their gradients after backward;
    - `optimizer`: every tensor in the AdamW state after the step (exp_avg, exp_avg_sq, step);
    - `activations`: what `SavedForBackward` collects during forward (saved tensors and checkpoint inputs), each
      storage once, EXCLUDING the storages of parameters and buffers (those are already in `weights`;
      `params_saved` counts them separately);
    - `total` = weights + grads + optimizer + activations.
    """
    model_ptrs = {info[0] for t in list(model.parameters()) + list(model.buffers())
                  if (info := _storage(t)) is not None}
    optimizer.zero_grad(set_to_none=True)
    with SavedForBackward(exclude=model_ptrs) as saved, (autocast() if autocast is not None else nullcontext()):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    trainable = [p for p in model.parameters() if p.requires_grad]
    unused = sum(p.numel() for p in trainable if p.grad is None)
    state_tensors = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    account = {
        "weights": _unique_bytes(list(model.parameters()) + list(model.buffers())),
        "trainable": _unique_bytes(trainable),
        "grads": _unique_bytes([p.grad for p in trainable if p.grad is not None]),
        "optimizer": _unique_bytes(state_tensors),
        "activations": saved.nbytes,
        "params_saved": sum(saved.excluded.values()),
        "unreadable_saved": saved.unreadable,
        "unused_trainable_params": unused,
    }
    account["total"] = account["weights"] + account["grads"] + account["optimizer"] + account["activations"]
    optimizer.zero_grad(set_to_none=True)
    return account


def extrapolate(small: dict, large: dict, b_small: int, b_large: int, b_target: int) -> dict:
    """Activations are affine in the batch size: fit a + b*batch from two measured batches, evaluate at `b_target`."""
    slope = (large["activations"] - small["activations"]) / (b_large - b_small)
    acts = large["activations"] + slope * (b_target - b_large)
    out = {k: large[k] for k in ("weights", "trainable", "grads", "optimizer")}
    out["activations"] = round(acts)
    out["total"] = out["weights"] + out["grads"] + out["optimizer"] + out["activations"]
    out["activations_per_sample"] = slope
    return out


# ---------------------------------------------------------------------------------------------- peak of live tensors
class LiveTensorPeak(TorchDispatchMode):
    """Tracks the bytes of tensor storages allocated by ATen ops while active, and their peak.

    After every op, the storages it returned that are new (not the storage of one of its inputs, which views and
    in-place ops return) join the live set; storages whose last reference is gone leave it. `peak` is the largest
    live total at an op boundary, and `peak_op` the op that reached it with the shape of its first output. Storages
    that existed before (weights, optimiser state, the batch) are not counted. Kernel workspaces and allocator
    rounding are not seen: this is the tensor-level part of what `torch.cuda.max_memory_allocated` measures, on any
    device and without a GPU; for given kernels it is the same on every run and machine. (torch's own
    `torch.distributed._tools.mem_tracker.MemTracker` does more, but registers gradient hooks on every parameter
    and fails on frozen ones, which every method here has.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0
        self.peak_op: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        inputs = {info[0] for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and (info := _storage(t)) is not None}
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        for t in outputs:
            info = _storage(t)  # None for tensors without a plain storage (sparse, nested): not counted
            if info is not None and info[0] and info[0] not in inputs and info[0] not in self.live:
                self.live[info[0]] = (StorageWeakRef(t.untyped_storage()), info[1])
                self.current += info[1]
        if self.current > self.peak:
            self.peak = self.current
            self.peak_op = f"{func} -> {tuple(outputs[0].shape)}" if outputs else str(func)
        return out


def live_peak(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, autocast=None) -> dict:
    """Peak bytes of live tensors over one training step after a warm-up step (`LiveTensorPeak`).

    Reported like `cuda_peak`: the step's peak increment plus the method's own weights and optimiser state (exact
    bytes), so the two read the same; this one runs on any device and names the op where the peak happens.
    """
    train_step(model, optimizer, batch, autocast)  # warm-up (allocates the optimizer state)
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    tracker = LiveTensorPeak()
    with tracker:
        train_step(model, optimizer, batch, autocast)
    optimizer.zero_grad(set_to_none=True)
    own = _unique_bytes(list(model.parameters()) + list(model.buffers()))
    state = _unique_bytes([v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)])
    return {"step_increment": tracker.peak, "peak_op": tracker.peak_op, "own_weights": own, "own_optimizer": state,
            "training_memory": tracker.peak + own + state}


@contextmanager
def tower_micro_batches(model: nn.Module, size: int | None) -> Iterator[None]:
    """Run an M2IST model's frozen towers in micro-batches of `size` (`M2ISTConfig.tower_micro_batch_size`)."""
    config = model.peft_config[model.active_adapter]
    before = config.tower_micro_batch_size
    config.tower_micro_batch_size = size
    try:
        yield
    finally:
        config.tower_micro_batch_size = before


# ---------------------------------------------------------------------------------------------- GPU peak
def cuda_peak(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, autocast=None) -> dict:
    """`torch.cuda.max_memory_allocated` over one training step after a warm-up step.

    Other models may be resident on the card, so the method's training memory is reported as the peak increment
    over the resident state plus the method's own weights, gradients-free optimizer state (exact bytes).
    """
    train_step(model, optimizer, batch, autocast)  # warm-up (allocates the optimizer state)
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    train_step(model, optimizer, batch, autocast)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    optimizer.zero_grad(set_to_none=True)
    own = _unique_bytes(list(model.parameters()) + list(model.buffers()))
    state = _unique_bytes([v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)])
    return {"peak_allocated": peak, "resident_before": before, "step_increment": peak - before,
            "own_weights": own, "own_optimizer": state, "training_memory": peak - before + own + state}


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_times(tasks: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device,
                      deadline: float | None = None, log=print,
                      cpu_times: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Run A, B, C, A, B, C, ...: `warmup` untimed rounds, then up to `repeats` timed rounds (stops at `deadline`).

    Returns wall-clock seconds per task; `cpu_times`, when given, receives this process's CPU seconds per task (all
    threads), which other processes sharing the cores disturb much less than the wall clock.
    """
    times: dict[str, list[float]] = {name: [] for name in tasks}
    last: dict[str, float] = {}
    for r in range(warmup + repeats):
        if deadline is not None and r > warmup and time.perf_counter() > deadline:
            log(f"  time budget reached after {r - warmup} timed rounds")
            break
        for name, task in tasks.items():
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            task()
            _sync(device)
            elapsed = last[name] = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
                if cpu_times is not None:
                    cpu_times.setdefault(name, []).append(time.process_time() - cpu_start)
        log(f"  round {r + 1}/{warmup + repeats}" + (" (warm-up)" if r < warmup else "") + ": "
            + ", ".join(f"{n}={last[n]:.3f}s" for n in tasks))
    return times


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------------------------- environment
def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_start": os.getloadavg()[0],  # > cpu_count: other processes shared the cores
        # float32 precision torch allows: matmuls ("highest" = no TF32) and cuDNN convolutions (TF32 by default)
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }
    try:
        import peft
        import transformers

        info["transformers"] = transformers.__version__
        info["peft"] = peft.__version__
    except ImportError:
        pass
    with suppress(OSError):
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=Path(__file__).parent, check=False).stdout.strip()
        # The benchmarks' own outputs (results/*.json, RESULTS.md) do not count: a run rewrites them as it goes.
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":(exclude)benchmarks/results", ":(exclude)benchmarks/RESULTS.md"],
                                 capture_output=True, text=True, cwd=Path(__file__).parents[1], check=False).stdout
        info["git_worktree_clean"] = not changed.strip()  # False: uncommitted code changes on top of git_commit
    return info


def command_line() -> str:
    return "python " + " ".join([str(Path(sys.argv[0]).as_posix()), *sys.argv[1:]])


def free(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def mib(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:,.1f}"
