"""What every retrieval head shares: the chunked pairwise scoring, masked pooling, and CLIP4Clip's
temporal transformer (seqTransf), which CLIP4Clip, X-CLIP and DRL all put on the frame features.

A head maps text features (sentence [Bt, D], words [Bt, L, D] + word mask [Bt, L]) and video
features (frames [Bv, T, D] + frame mask [Bv, T]; masks bool, True = real token / frame) to a
similarity [Bt, Bv] (before the logit scale). `prepare_text` / `prepare_video` do the per-sample
work once (normalisation, temporal module, token weights); `pair` scores one block of texts ×
videos; `forward` walks the blocks so a 10k × 10k evaluation never holds more than one
[chunk, chunk, L, T] tensor (256² × 32 × 12 floats ≈ 100 MB). Blocks are concatenated (not
written into a buffer) so the same code trains with autograd.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch import Tensor


def neg_inf(x: Tensor) -> float:
    """Most negative finite value of x's dtype (a fully masked row gives no NaN)."""
    return torch.finfo(x.dtype).min


def l2n(x: Tensor) -> Tensor:
    """x / ‖x‖ over the last dim, as the originals write it (no epsilon)."""
    return x / x.norm(dim=-1, keepdim=True)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """x [B, N, D], mask [B, N] → mean of the valid rows [B, D] (an all-padding row divides by 1, as the originals)."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class QuickGELU(nn.Module):
    """x · σ(1.702 x): OpenAI CLIP's activation, used by the originals' temporal transformer."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class TemporalTransformer(nn.Module):
    """CLIP4Clip's seqTransf: frames [B, T, D] → frames + Transformer(frames + frame position), with
    padded frames masked as attention keys (additive −10⁶, as the original). Blocks are CLIP
    residual attention blocks with QuickGELU and LayerNorm eps 1e-12 (the original's TF-style
    LayerNorm); `init_from_text` copies the first `layers` blocks and the position table of CLIP's
    text transformer, as CLIP4Clip / X-CLIP / DRL do. Parameter names are the originals'
    (``frame_position_embeddings``, ``transformerClip.resblocks.i.*``) so their checkpoints load."""

    def __init__(self, dim: int, layers: int = 4, heads: int | None = None, max_positions: int = 77):
        super().__init__()
        from open_clip.transformer import Transformer
        self.heads = heads or max(1, dim // 64)
        self.frame_position_embeddings = nn.Embedding(max_positions, dim)
        self.transformerClip = Transformer(dim, layers, self.heads, act_layer=QuickGELU,
                                           norm_layer=partial(nn.LayerNorm, eps=1e-12))
        # the originals' init_weights (Linear / Embedding N(0, 0.02), zero biases) for what the text tower does not cover
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def init_from_text(self, text_transformer: nn.Module, text_positional: Tensor) -> bool:
        """Copy CLIP's first text blocks and position rows when the widths and head counts fit
        (the originals' initialisation trick); False (random init kept) otherwise."""
        blocks = self.transformerClip.resblocks
        if (text_transformer.width != self.frame_position_embeddings.embedding_dim
                or text_transformer.resblocks[0].attn.num_heads != self.heads):
            return False
        with torch.no_grad():
            for dst, src in zip(blocks, text_transformer.resblocks):
                dst.load_state_dict(src.state_dict())
            n = min(text_positional.shape[0], self.frame_position_embeddings.num_embeddings)
            self.frame_position_embeddings.weight[:n].copy_(text_positional.detach()[:n])
        return True

    def forward(self, frames: Tensor, frame_mask: Tensor) -> Tensor:
        """frames [B, T, D], frame_mask [B, T] bool → [B, T, D]."""
        B, T, _ = frames.shape
        if T > self.frame_position_embeddings.num_embeddings:
            raise ValueError(f"temporal transformer has positions for {self.frame_position_embeddings.num_embeddings} "
                             f"frames, got {T}")
        x = frames + self.frame_position_embeddings.weight[:T].to(frames.dtype)[None]
        mask = (1.0 - frame_mask.to(frames.dtype))[:, None, :] * -1000000.0          # [B, 1, T] keys
        mask = mask.expand(B, T, T).repeat_interleave(self.heads, dim=0)              # [B·H, T, T]
        return frames + self.transformerClip(x, attn_mask=mask)


class RetrievalHead(nn.Module):
    """Base: per-sample `prepare_*`, pairwise `pair`, chunked `forward`. `spec` (name + constructor
    arguments) is what an export records to rebuild the head."""

    name = "base"

    def __init__(self, **spec):
        super().__init__()
        self.spec = {"name": self.name, **spec}

    # ------------------------------------------------------------------ per sample
    def prepare_text(self, sentence: Tensor, words: Tensor, word_mask: Tensor) -> dict:
        return {"sentence": l2n(sentence)}

    def prepare_video(self, frames: Tensor, frame_mask: Tensor) -> dict:
        return {"video": l2n(masked_mean(l2n(frames), frame_mask))}

    def pair(self, t: dict, v: dict) -> Tensor:  # [ct, cv]
        return t["sentence"] @ v["video"].T

    # ------------------------------------------------------------------ all pairs
    def score(self, t_all: dict, v_all: dict, chunk_size: int = 256, max_row_blocks: int | None = None) -> Tensor:
        """Prepared texts × prepared videos → [Bt, Bv], block by block. Under autograd the blocks are
        concatenated; without, written into one preallocated matrix (no second copy). max_row_blocks:
        score only the first ones (benchmarks time a slice of a large evaluation)."""
        Bt = next(iter(t_all.values())).shape[0]
        Bv = next(iter(v_all.values())).shape[0]
        starts = list(range(0, Bt, chunk_size))[:max_row_blocks]
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in (*t_all.values(), *v_all.values()))
        out = None if grad else next(iter(v_all.values())).new_empty(min(Bt, len(starts) * chunk_size), Bv,
                                                                        dtype=torch.float32)
        rows = []
        for i in starts:
            t = {k: x[i:i + chunk_size] for k, x in t_all.items()}
            blocks = [self.pair(t, {k: x[j:j + chunk_size] for k, x in v_all.items()}) for j in range(0, Bv, chunk_size)]
            if grad:
                rows.append(torch.cat(blocks, dim=1))
            else:
                for j, b in zip(range(0, Bv, chunk_size), blocks):
                    out[i:i + chunk_size, j:j + chunk_size] = b
        return torch.cat(rows, dim=0) if grad else out

    def forward(self, sentence: Tensor, words: Tensor, word_mask: Tensor, frames: Tensor, frame_mask: Tensor,
                chunk_size: int = 256, regularise: bool = False):
        """sentence [Bt, D], words [Bt, L, D], word_mask [Bt, L], frames [Bv, T, D], frame_mask [Bv, T] → [Bt, Bv]
        (with regularise: (similarity, the training regulariser or None); texts i and videos i must pair)."""
        t = chunked(self.prepare_text, (sentence, words, word_mask.bool()), 4 * chunk_size)
        v = chunked(self.prepare_video, (frames, frame_mask.bool()), 4 * chunk_size)
        sim = self.score(t, v, chunk_size)
        return (sim, self.regulariser(t, v)) if regularise else sim

    def regulariser(self, t: dict, v: dict) -> Tensor | None:
        """An extra training loss term on the prepared (gathered, paired) batch; None: none."""
        return None


def chunked(fn, args: tuple, chunk: int) -> dict:
    """fn(*args) over row chunks, the dict values concatenated (bounds the per-sample work's memory)."""
    n = args[0].shape[0]
    if n <= chunk:
        return fn(*args)
    parts = [fn(*(a[i:i + chunk] for a in args)) for i in range(0, n, chunk)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
