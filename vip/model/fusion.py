"""Everything at Once: token projections, the modality-agnostic fusion transformer, joint projections.

Shvetsova et al., "Everything at Once – Multi-modal Fusion Transformer for Video Retrieval"
(CVPR 2022); the original code is ninatu/everything_at_once (model/fusion_model.py,
model/utils/{fusion_transformer,layers}.py). This module follows its defaults
(`everything_at_once_tva.yaml`): docs/fusion.md.

* token projections: per modality a gated embedding unit (Linear → context gating
  x·σ(W x + b)) and a LayerNorm (ε 1e-6) into the common token space [.., E];
* a clip missing a modality gets one learnt masking token in its place (attention mask 1),
  and the modality counts as absent for the loss ("nonempty" mask);
* one fusion transformer (pre-norm ViT blocks, no positional embedding, no CLS token) runs on
  any concatenation of modality token lists, with padded tokens masked out of the keys;
* each modality's output tokens are averaged (mask-weighted) and go through that modality's
  own gated projection into the joint space [.., P];
* a fused embedding of two modalities is norm(norm(g_x) + norm(g_y)) (the original's
  (norm + norm)/2, which the cosine loss normalises: the same direction).

`FusionHead.forward` returns t, v, a, tv, va, ta (L2-normalised, [B, P]) in one call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
MODALITIES = ("t", "v", "a")
PAIRS = ("tv", "va", "ta")


class ContextGating(nn.Module):
    """x · σ(fc(x)) (the original's GLU over [x, fc(x)])."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.fc(x))


class GatedEmbeddingUnit(nn.Module):
    """Linear → context gating: [.., in] → [.., out]."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.cg = ContextGating(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.cg(self.fc(x))


def projection(in_dim: int, out_dim: int, kind: str) -> nn.Module:
    """gated (the original's default) | minimal (one Linear)."""
    if kind == "gated":
        return GatedEmbeddingUnit(in_dim, out_dim)
    if kind == "minimal":
        return nn.Linear(in_dim, out_dim)
    raise ValueError(f"projection must be gated or minimal, got {kind!r}")


class FusionAttention(nn.Module):
    """Multi-head self-attention (timm names: qkv, proj) with padded keys masked out."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"fusion width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x [B, N, C], mask bool [B, N] (True: a real token; every row has one) → [B, N, C]."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])   # [B, H, N, d]
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class FusionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x)) (GELU MLP, timm names)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 1.0, qkv_bias: bool = True):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = FusionAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(hidden, dim))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class FusionTransformer(nn.Module):
    """Modality-agnostic transformer over a concatenation of token lists (no positions, no CLS)."""

    def __init__(self, dim: int, depth: int = 1, num_heads: int = 64, mlp_ratio: float = 1.0,
                 qkv_bias: bool = True):
        super().__init__()
        self.masking_token = nn.Parameter(torch.zeros(dim))                 # [E] stands in for an absent modality
        self.blocks = nn.ModuleList(FusionBlock(dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))
        nn.init.trunc_normal_(self.masking_token, std=0.02)
        for m in self.blocks.modules():                                     # timm's ViT init, as the original
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, parts: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """parts: [(tokens [B, N_i, E], mask bool [B, N_i]), …] → per part the mask-weighted mean of
        its output tokens [B, E] (attention runs over all parts' tokens together)."""
        x = torch.cat([t for t, _ in parts], dim=1)                        # [B, ΣN, E]
        mask = torch.cat([m for _, m in parts], dim=1)                     # [B, ΣN]
        for blk in self.blocks:
            x = blk(x, mask)
        out, start = [], 0
        for t, m in parts:
            n = t.shape[1]
            w = m.to(x.dtype).unsqueeze(-1)                                # [B, n, 1]
            out.append((x[:, start:start + n] * w).sum(1) / w.sum(1))      # [B, E]
            start += n
        return out


class FusionHead(nn.Module):
    """Token projections + fusion transformer + per-modality joint projections (module docstring).

    in_dims: {"t", "v", "a"} → the backbones' token widths."""

    def __init__(self, in_dims: dict[str, int], dim: int = 4096, depth: int = 1, num_heads: int = 64,
                 mlp_ratio: float = 1.0, projection_dim: int = 6144, token_projection: str = "gated",
                 final_projection: str = "gated"):
        super().__init__()
        names = {"t": "text", "v": "video", "a": "audio"}
        self.fusion = FusionTransformer(dim, depth, num_heads, mlp_ratio)
        for m, name in names.items():   # the original's attribute names: <name>_token_proj, _norm_layer, _proj
            setattr(self, f"{name}_token_proj", projection(in_dims[m], dim, token_projection))
            setattr(self, f"{name}_norm_layer", nn.LayerNorm(dim, eps=1e-6))
            setattr(self, f"{name}_proj", projection(dim, projection_dim, final_projection))
        self._names = names
        self.output_dim = projection_dim

    def tokens(self, m: str, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Backbone tokens x [B, N, in] + mask bool [B, N] → (tokens [B, N, E], mask [B, N],
        present bool [B]): a clip with no real token gets the masking token in slot 0."""
        name = self._names[m]
        x = getattr(self, f"{name}_norm_layer")(getattr(self, f"{name}_token_proj")(x))
        mask = mask.bool()
        present = mask.any(dim=1)                                          # [B]
        if not bool(present.all()):
            absent = ~present
            slot0 = torch.zeros_like(mask)
            slot0[:, 0] = absent
            x = torch.where(slot0.unsqueeze(-1), self.fusion.masking_token.to(x.dtype), x)
            mask = mask | slot0
        return x, mask, present

    def forward(self, tokens: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """tokens: {"t", "v", "a"} → (x [B, N_m, in_m], mask bool [B, N_m]), any subset.
        Returns L2-normalised embeddings [B, P] for every single modality given and every pair of
        them (keys t, v, a, tv, va, ta), and "present_<m>" bool [B] per modality given."""
        toks, out = {}, {}
        for m in MODALITIES:
            if m in tokens:
                x, mask, present = self.tokens(m, *tokens[m])
                toks[m] = (x, mask)
                out[f"present_{m}"] = present
        proj = {m: getattr(self, f"{self._names[m]}_proj") for m in MODALITIES}
        for m in toks:                                                     # each modality alone
            out[m] = F.normalize(proj[m](self.fusion([toks[m]])[0]), dim=-1)
        for pair in PAIRS:                                                 # each pair fused
            x, y = pair
            if x in toks and y in toks:
                ex, ey = self.fusion([toks[x], toks[y]])
                out[pair] = F.normalize(F.normalize(proj[x](ex), dim=-1) + F.normalize(proj[y](ey), dim=-1), dim=-1)
        return out
