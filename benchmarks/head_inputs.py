"""What the grounding head sees at initialisation, for the runs of `benchmarks/learning_curve.py`: the scale of the
side network's tokens against the head's own [REG] token and position embeddings, how much of the vision tokens
depends on the image, and how sharp the first layer's attention from [REG] is.

    python benchmarks/head_inputs.py --runs default:benchmark paper:benchmark default+head_init=transvg:benchmark

Measured on the untrained model (eval mode, no dropout) on the first `--rows` training rows of the built-in
benchmark at the default scale (the towers of `benchmarks/learning_curve.py`), with the same initialisation seeds as
the learning curves. Per run:

- `vision_rms`, `text_rms`: root mean square of the head's input tokens (the side network's output, `(batch, tokens,
  head_hidden_size)`, real tokens only), before the head's optional input LayerNorm;
- `vision_image_share`: the part of the vision tokens' mean square that changes from image to image, i.e. the
  variance over the batch at each token slot divided by the mean square; a constant offset (the same at every
  image) lowers it;
- `reg_rms`, `position_rms`: the [REG] token's and the position embeddings' root mean square (the vision slots' fixed
  sine grid encoding included when the head has one);
- `first_layer_input_rms`: what the first layer's queries and keys are made of, the (normalised, when
  `head_input_norm`) tokens plus the positions;
- `reg_attention_entropy`: the first layer's attention of [REG] over the real tokens, averaged over heads, as entropy
  divided by log(number of real tokens): 1 = uniform, 0 = one token;
- `gradient_norm`: the norm of the first step's gradient over every trainable parameter (the loss on those rows,
  eval mode), what `max_grad_norm` clipping divides by; `gradient_share_<part>`: each part's share of it (norm of
  the part's gradient / `gradient_norm`), parts `head`, `projections` (the side network's maps to the head's width),
  `vision_expert`, `language_expert`, `interactive_expert`.

The JSON (`--output`, kind `head_inputs`) feeds RESULTS.md's learning-curve section and docs/fidelity.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `benchmarks` and the library

from benchmarks import environment, learning_curve, scales

RESULT = environment.RESULTS_DIR / "head_inputs.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["default:benchmark", "paper:benchmark"],
                   help="learning_curve.py run specs, CONFIG[+FIELD=VALUE...]:RECIPE (the recipe is not used)")
    p.add_argument("--rows", type=int, default=64, help="measure on the first N training rows")
    p.add_argument("--bottleneck", type=int, default=128)
    p.add_argument("--head-layers", type=int, default=2)
    p.add_argument("--head-ffn-dim", type=int, default=512)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--output", type=Path, default=RESULT)
    return p.parse_args(argv)


def _rms(x: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """Root mean square of `(batch, tokens, dim)` over the tokens where `keep` `(batch, tokens)` is true."""
    squares = x.float().pow(2).mean(-1)
    if keep is not None:
        squares = squares[keep.bool()]
    return squares.mean().sqrt().item()


def head_input_stats(model: torch.nn.Module, batch: dict) -> dict[str, float]:
    """The statistics listed in the module docstring, from one eval-mode forward of `model` on `batch`."""
    from peft_m2ist.modeling.head import GroundingHead

    head = next(m for m in model.modules() if isinstance(m, GroundingHead))
    seen: dict[str, torch.Tensor] = {}

    def keep_inputs(_module, args):
        seen["text"], seen["text_mask"], seen["vision"], seen["vision_mask"] = args[:4]

    handle = head.register_forward_pre_hook(keep_inputs)
    was_training = model.training
    model.eval()
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "phrase_type")}
    try:
        with torch.no_grad():
            model(**inputs)
            stats = _stats(head, seen)
        stats.update(_gradient_stats(model, inputs, batch["labels"]))
    finally:
        handle.remove()
        model.train(was_training)
    return stats


GRADIENT_PARTS = ("head", "projections", "vision_expert", "language_expert", "interactive_expert")


def _part(name: str) -> str:
    """Which of `GRADIENT_PARTS` a trainable parameter's name belongs to."""
    if ".m2ist_head." in name:
        return "head"
    return next((part for part in GRADIENT_PARTS[2:] if f".{part}." in name), "projections")


def _gradient_stats(model: torch.nn.Module, inputs: dict, labels: torch.Tensor) -> dict[str, float]:
    """The first step's gradient norm and each part's share of it; the gradients are dropped afterwards."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    try:
        model(**inputs, labels=labels).loss.backward()
        squares = dict.fromkeys(GRADIENT_PARTS, 0.0)
        for name, p in params.items():
            if p.grad is not None:
                squares[_part(name)] += p.grad.float().pow(2).sum().item()
    finally:
        for p in params.values():
            p.grad = None
    total = math.sqrt(sum(squares.values()))
    return {"gradient_norm": total,
            **{f"gradient_share_{part}": math.sqrt(value) / total for part, value in squares.items()}}


def _stats(head, seen: dict[str, torch.Tensor]) -> dict[str, float]:
    text, text_mask, vision = seen["text"], seen["text_mask"], seen["vision"]
    vision_mask = seen["vision_mask"]
    if vision_mask is None:
        vision_mask = torch.ones(vision.shape[:2], dtype=torch.long)
    batch, text_len = text.shape[:2]
    centred = vision.float() - vision.float().mean(dim=0, keepdim=True)
    positions = head.position_table(text_len)
    tokens = head.input_norm(torch.cat([head.reg_token.expand(batch, -1, -1), text, vision], dim=1))
    keep = torch.cat([torch.ones_like(text_mask[:, :1]), text_mask, vision_mask.to(text_mask.dtype)], dim=1).bool()
    query_key = tokens + positions
    value = tokens if head.positions == "attention" else query_key
    layer = head.encoder.layers[0]
    _, weights = layer.self_attn(query_key, query_key, value, key_padding_mask=~keep, need_weights=True,
                                 average_attn_weights=False)
    reg_rows = weights[:, :, 0, :].clamp_min(1e-12)  # (batch, heads, tokens)
    entropy = -(reg_rows * reg_rows.log()).sum(-1) / keep.sum(-1, keepdim=True).float().log()
    return {
        "vision_rms": _rms(vision, vision_mask),
        "text_rms": _rms(text, text_mask),
        "vision_image_share": (centred.pow(2).sum() / vision.float().pow(2).sum()).item(),
        "reg_rms": _rms(head.reg_token),
        "position_rms": _rms(positions),
        "first_layer_input_rms": _rms(query_key, keep),
        "reg_attention_entropy": entropy.mean().item(),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    specs = [(spec, *learning_curve.parse_run(spec)) for spec in args.runs]  # refuse a bad spec before any work
    torch.manual_seed(args.seed)
    scale = scales.build_scale("default", 0)
    ns = argparse.Namespace(data_seed=args.data_seed, train_samples=args.rows, eval_samples=8, seed=args.seed)
    splits, collator, _ = learning_curve.load_splits(scale, ns)
    batch = collator([splits["train"][i] for i in range(len(splits["train"]))])
    result = {"kind": "head_inputs", "scale": "default", "scale_description": scale.description,
              "command": environment.command_line(), "machine": environment.machine_info(torch.device("cpu")),
              "settings": {k: v for k, v in vars(args).items() if k not in ("runs", "output")}, "runs": {}}
    for spec, config, overrides, _recipe in specs:
        model = learning_curve.build_model(config, overrides, scale, args)
        result["runs"][spec] = head_input_stats(model, batch)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    names = list(next(iter(result["runs"].values())))
    print(f"{'run':<60}" + "".join(f"{n:>24}" for n in names))
    for spec, stats in result["runs"].items():
        print(f"{spec:<60}" + "".join(f"{stats[n]:>24.4g}" for n in names))
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
