"""An independent re-statement of the authors' M2IST forward (xuyang-liu16/M2IST, TransVG-based), for the fidelity test.

Written from the paper and the authors' equations, not from peft_m2ist: it names the tensors as their code does and
reads them off the towers with its own hooks. Per tapped layer i (0-5 in their code):

- vision (DETR encoder layer, `models/visual_model/transformer.py`, `TransformerEncoderLayer.forward_post`):
  `src2` = self-attention output (before dropout and residual), `src5` = FFN output `linear2(...)` (before dropout and
  residual). Interactive expert: `ShareAdapter_i(relu(vis_downsample_mha_i(src2)))` (no norm, no scale); vision expert:
  `Adapter_vis_i(src5)` = `up(relu(down(LayerNorm(src5)))) * 0.1` (affine LayerNorm).
- text (BERT layer, `models/language_model/med.py`): the interactive expert reads the attention block's output
  `LayerNorm(dense(ctx) + input)` (BertSelfOutput): `d = relu(text_downsample_i(.))`,
  `BertSelfOutput.LayerNorm(cat[text_upsample_i(d), ShareAdapter_i(d)])`; the language expert reads the FFN output
  `dense(intermediate)` (BertOutput, before dropout, residual and norm): `BertOutput.LayerNorm(Adapter_text_i(.))`.
- streams (`models/trans_vg_lt.py`, `TransVG.forward`): `visu_proj(memory + input_src + sum of vision adapters)`,
  `text_proj(last_hidden_state + embedding_output + sum of text adapters)`.
- head (`models/vl_transformer.py`): `[REG] + text + vision`, `vl_pos_embed` added to queries and keys of every
  post-norm layer (values without), `bbox_embed` (3-layer MLP) on the [REG] output, sigmoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AuthorsAdapter(nn.Module):
    """`Adapter_vis` / `Adapter_text` with adapter_layernorm_option="in": LayerNorm -> down -> ReLU -> up -> x0.1."""

    def __init__(self, d_model: int, bottleneck: int) -> None:
        super().__init__()
        self.adapter_layer_norm_before = nn.LayerNorm(d_model)
        self.down_proj = nn.Linear(d_model, bottleneck)
        self.up_proj = nn.Linear(bottleneck, d_model)
        self.scale = 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up_proj(F.relu(self.down_proj(self.adapter_layer_norm_before(x)))) * self.scale


class AuthorsVLLayer(nn.Module):
    """TransVG's post-norm `TransformerEncoderLayer` (sequence-first), positions added to queries and keys."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.1)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: torch.Tensor, key_padding_mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = k = src + pos
        src2 = self.self_attn(q, k, value=src, key_padding_mask=key_padding_mask)[0]
        src = self.norm1(src + src2)
        src2 = self.linear2(F.relu(self.linear1(src)))
        return self.norm2(src + src2)


class AuthorsM2IST(nn.Module):
    """The trainable modules the authors' forward uses, with their shapes, and that forward (eval mode)."""

    def __init__(self, vis_dim: int, text_dim: int, num_layers: int = 6, bottleneck: int = 128, hidden_dim: int = 256,
                 nheads: int = 8, dim_feedforward: int = 2048, vl_layers: int = 6, num_visu_token: int = 400,
                 num_text_token: int = 20) -> None:
        super().__init__()
        n = num_layers
        self.shared_adapters = nn.ModuleList(nn.Linear(bottleneck, vis_dim) for _ in range(n))  # ShareAdapter.up_proj
        self.vis_downsample_mha = nn.ModuleList(nn.Linear(vis_dim, bottleneck) for _ in range(n))
        self.vis_mlp_adapters = nn.ModuleList(AuthorsAdapter(vis_dim, bottleneck) for _ in range(n))
        self.text_downsample = nn.ModuleList(nn.Linear(text_dim, bottleneck) for _ in range(n))
        self.text_upsample = nn.ModuleList(nn.Linear(bottleneck, text_dim - vis_dim) for _ in range(n))
        self.text_mlp_adapters = nn.ModuleList(AuthorsAdapter(text_dim, bottleneck) for _ in range(n))
        self.visu_proj = nn.Linear(vis_dim, hidden_dim)
        self.text_proj = nn.Linear(text_dim, hidden_dim)
        self.vl_pos_embed = nn.Embedding(num_visu_token + num_text_token + 1, hidden_dim)
        self.reg_token = nn.Embedding(1, hidden_dim)
        self.vl_transformer = nn.ModuleList(AuthorsVLLayer(hidden_dim, nheads, dim_feedforward)
                                            for _ in range(vl_layers))
        self.bbox_embed = nn.ModuleList([nn.Linear(hidden_dim, hidden_dim), nn.Linear(hidden_dim, hidden_dim),
                                         nn.Linear(hidden_dim, 4)])

    def adapter_modules(self) -> list[nn.Module]:
        """The modules the paper counts as tunable adapters (the head and the two projections excluded)."""
        return [self.shared_adapters, self.vis_downsample_mha, self.vis_mlp_adapters, self.text_downsample,
                self.text_upsample, self.text_mlp_adapters]

    def forward(self, vis: dict, text: dict) -> dict[str, torch.Tensor]:
        """`vis`: `memory` (B, N, Dv) final tokens, `input_src` (B, N, Dv), `src2` / `src5` lists of (B, N, Dv),
        `mask` (B, N) True = padding. `text`: `last_hidden_state` (B, L, Dt), `embedding_output`, `attention_output`
        / `ffn_dense` lists of (B, L, Dt), `attention_norm` / `ffn_norm` lists of the BERT blocks' LayerNorms,
        `mask` (B, L) True = padding. Returns the two projected streams and `pred_box` (B, 4)."""
        vis_adapter = 0
        for i, (src2, src5) in enumerate(zip(vis["src2"], vis["src5"])):
            adapter_mha = self.shared_adapters[i](F.relu(self.vis_downsample_mha[i](src2)))
            adapter_mlp = self.vis_mlp_adapters[i](src5)
            vis_adapter = vis_adapter + adapter_mha + adapter_mlp
        visu_src = self.visu_proj(vis["memory"] + (vis_adapter + vis["input_src"]))

        text_adapter = 0
        for i, (attention_output, dense) in enumerate(zip(text["attention_output"], text["ffn_dense"])):
            down = F.relu(self.text_downsample[i](attention_output))
            cat_out = torch.cat([self.text_upsample[i](down), self.shared_adapters[i](down)], dim=-1)
            mha_adapter = text["attention_norm"][i](cat_out)
            mlp_adapter = text["ffn_norm"][i](self.text_mlp_adapters[i](dense))
            text_adapter = text_adapter + mha_adapter + mlp_adapter
        text_src = self.text_proj(text["last_hidden_state"] + (text_adapter + text["embedding_output"]))

        bs = visu_src.shape[0]
        tgt = self.reg_token.weight.unsqueeze(1).repeat(1, bs, 1)
        vl_src = torch.cat([tgt, text_src.transpose(0, 1), visu_src.transpose(0, 1)], dim=0)
        vl_mask = torch.cat([torch.zeros(bs, 1, dtype=torch.bool), text["mask"], vis["mask"]], dim=1)
        vl_pos = self.vl_pos_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        hs = vl_src
        for layer in self.vl_transformer:
            hs = layer(hs, vl_mask, vl_pos)
        x = hs[0]
        for i, layer in enumerate(self.bbox_embed):
            x = F.relu(layer(x)) if i < 2 else layer(x)
        return {"visu_src": visu_src, "text_src": text_src, "pred_box": x.sigmoid()}


def authors_parameter_count(vis_dim: int = 256, text_dim: int = 768, **kwargs) -> tuple[int, int]:
    """(adapters only, everything trainable) of the modules the authors' forward uses, at the given sizes."""
    model = AuthorsM2IST(vis_dim, text_dim, **kwargs)
    adapters = sum(p.numel() for m in model.adapter_modules() for p in m.parameters())
    return adapters, sum(p.numel() for p in model.parameters())
