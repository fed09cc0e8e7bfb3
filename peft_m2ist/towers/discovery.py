"""Structural discovery of a tower's blocks, for towers whose `model_type` the registry (`TOWER_LAYOUTS`) lacks.

As peft's `target_modules="all-linear"` needs no per-model mapping, this finds the blocks of any tower from its
modules alone:

- the blocks: the outermost `nn.ModuleList` outside any decoder (the decoder of a DETR-like tower never runs),
  preferring one whose blocks hold attention (DETR's encoder rather than its CNN backbone's stages), else the one
  with the most parameters; a list of lists (PVT's stages, Funnel's blocks) counts as the concatenation of its lists;
- per block, a stage of a hierarchical tower (a block holding its own list of repeated sub-blocks: Swin, FocalNet,
  SegFormer, Hiera, MobileViT, ...) and a block without attention (a CNN's) are tapped whole; a transformer block
  is tapped at its attention (the shallowest module whose class or name says attention) and its FFN (the shallowest
  module whose class or name says MLP / FFN / feed-forward outside the attention, else a BERT-style `output.dense`,
  else the last `nn.Linear` outside the attention): the FFN's output before the residual and any norm, as the
  registered families' taps;
- the input embedding: the first of `EMBEDDING_CANDIDATES` the tower has (kept only where the probe finds it
  shaped as the final tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

EMBEDDING_CANDIDATES = ("embeddings", "vision_model.embeddings", "text_model.embeddings", "input_projection",
                        "embed_tokens", "shared")
"""Dotted paths of a tower's input embedding, in the order discovery tries them."""

_FFN_CLASS_WORDS = ("MLP", "Mlp", "FeedForward", "FFN", "Ffn", "DenseActDense", "DenseGatedActDense")
_FFN_NAMES = frozenset({"mlp", "ffn", "feed_forward", "feedforward"})
_ATTENTION_NAMES = frozenset({"attention", "attn", "self_attn", "self_attention"})


@dataclass(frozen=True)
class BlockLayout:
    """The blocks of one tower and what to tap in each.

    Attributes:
        blocks: dotted paths (relative to the tower) of its blocks, in forward order.
        ffn: child of a block feeding the modality expert (`""`: the block itself).
        attention: child of a block feeding the interactive expert (`""`: the block itself).
        embeddings: candidate paths of the input embedding (first existing one wins).
        source: how the layout was found, for the log line and `describe_taps` (`"registered layout for
            model_type 'vit'"`, `"discovered: 12 blocks BertLayer at 'encoder.layer'"`).
    """

    blocks: tuple[str, ...]
    ffn: str
    attention: str
    embeddings: tuple[str, ...]
    source: str


def _is_attention(name: str, module: nn.Module) -> bool:
    return "Attention" in type(module).__name__ or name.rsplit(".", 1)[-1] in _ATTENTION_NAMES


def _holds_attention(module: nn.Module) -> bool:
    return any(_is_attention(name, m) for name, m in module.named_modules() if name)


def _is_stage(block: nn.Module) -> bool:
    """A stage of a hierarchical tower: it holds a list of repeated sub-blocks of one class."""
    for name, module in block.named_modules():
        if name and isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            return True
    return False


def _candidate_lists(tower: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    lists = [(name, module) for name, module in tower.named_modules()
             if name and isinstance(module, nn.ModuleList) and len(module)
             and "decoder" not in name.split(".")]
    return [(name, module) for name, module in lists
            if not any(name.startswith(other + ".") for other, _ in lists)]


def _num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _shallowest(block: nn.Module, accept, exclude: str | None = None) -> str | None:
    found = [name for name, module in block.named_modules()
             if name and accept(name, module) and not (exclude and (name == exclude or name.startswith(exclude + ".")))]
    return min(found, key=lambda n: n.count("."), default=None)


def _ffn_child(block: nn.Module, attention: str) -> str | None:
    def says_ffn(name: str, module: nn.Module) -> bool:
        return any(w in type(module).__name__ for w in _FFN_CLASS_WORDS) or name.rsplit(".", 1)[-1] in _FFN_NAMES

    found = _shallowest(block, says_ffn, exclude=attention)
    if found is not None:
        return found
    names = dict(block.named_modules())
    if isinstance(names.get("output.dense"), nn.Linear) and "intermediate" in names:
        return "output.dense"
    linears = [n for n, m in names.items() if isinstance(m, nn.Linear) and not n.startswith(attention + ".")]
    return linears[-1] if linears else None


def discover_layout(tower: nn.Module) -> BlockLayout | None:
    """The blocks of `tower` found from its modules (see the module docstring), or `None` where it has no
    `nn.ModuleList` of blocks."""
    candidates = _candidate_lists(tower)
    if not candidates:
        return None
    path, blocks_list = max(candidates, key=lambda c: (_holds_attention(c[1]), _num_parameters(c[1])))
    blocks = []
    for i, block in enumerate(blocks_list):
        if isinstance(block, nn.ModuleList):
            blocks.extend(f"{path}.{i}.{j}" for j in range(len(block)))
        else:
            blocks.append(f"{path}.{i}")
    first = tower.get_submodule(blocks[0])
    # (a block tapped whole is wrapped in a tap layer once an adapter is built: name the class it wraps)
    kinds = sorted({type(getattr(tower.get_submodule(b), "base_layer", tower.get_submodule(b))).__name__
                    for b in blocks})
    where = f"{len(blocks)} blocks ({', '.join(kinds)}) at '{path}'"
    embeddings = tuple(c for c in EMBEDDING_CANDIDATES if _has(tower, c))
    if _is_stage(first) or not _holds_attention(first):
        what = "stages of a hierarchical tower" if _is_stage(first) else "blocks without attention"
        return BlockLayout(tuple(blocks), "", "", embeddings, f"discovered {where}: {what}, each tapped whole")
    attention = _shallowest(first, _is_attention)
    ffn = _ffn_child(first, attention)
    if ffn is None:
        return BlockLayout(tuple(blocks), "", "", embeddings, f"discovered {where}: no FFN found, blocks tapped whole")
    return BlockLayout(tuple(blocks), ffn, attention, embeddings,
                       f"discovered {where}: attention '{attention}', FFN '{ffn}'")


def _has(tower: nn.Module, path: str) -> bool:
    try:
        tower.get_submodule(path)
    except AttributeError:
        return False
    return True
