"""Retrieval heads from the video-text retrieval papers, on frame- and word-level features.

Every head maps text features (sentence [Bt, D], words [Bt, L, D] + word mask [Bt, L]) and
video features (frames [Bv, T, D] + frame mask [Bv, T]) to a similarity [Bt, Bv], computed
in chunks of `chunk_size` texts × videos so 10k × 10k fits in memory (X-CLIP/DRL hold
[chunk, chunk, L, T] at once: 256² × 32 × 12 floats ≈ 100 MB). Masks are bool (True =
real token/frame); padded words and frames never contribute. Any frame count works.

* `MeanPHead`    CLIP4Clip meanP: cosine of the sentence and the mean of the valid frames.
* `SeqTransfHead` CLIP4Clip seqTransf: temporal transformer (+ frame positions, residual), then meanP.
* `XCLIPHead`    X-CLIP: video–sentence, video–word, sentence–frame and frame–word similarities,
                 the fine-grained ones aggregated by attention over similarity matrices (softmax of
                 sim/τ, τ = 0.01); the mean of the four. The learned T×T / L×L re-weighting
                 matrices of the original (initialised to identity) are left out so any T and L work.
* `DRLHead`      DRL weighted token-wise interaction (max over the other side's tokens, weighted by
                 a learned softmax token weight, both directions averaged); `cdcr_loss` is the
                 channel decorrelation regulariser (on-diagonal weight alpha1, off-diagonal alpha2).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor



def _neg(x: Tensor) -> float:
    """Most negative finite value of x's dtype: masked logits (no NaN when a whole row is padding)."""
    return torch.finfo(x.dtype).min


def _masked_softmax_sum(s: Tensor, mask: Tensor, dim: int, tau: float) -> Tensor:
    """Σ_dim softmax(s/τ) · s over the unmasked entries of `dim` (mask broadcastable to s)."""
    w = torch.softmax((s / tau).masked_fill(~mask, _neg(s)), dim=dim)
    return (w * s.masked_fill(~mask, 0.0)).sum(dim)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """x [B, N, D], mask [B, N] → mean of the valid rows [B, D]."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class RetrievalHead(nn.Module):
    """Base: `forward` chunks the pairwise `_block` over texts × videos."""

    def prepare_video(self, frames: Tensor, frame_mask: Tensor) -> dict:
        return {"frames": F.normalize(frames, dim=-1), "frame_mask": frame_mask}

    def prepare_text(self, sentence: Tensor, words: Tensor, word_mask: Tensor) -> dict:
        return {"sentence": F.normalize(sentence, dim=-1), "words": F.normalize(words, dim=-1),
                "word_mask": word_mask}

    def _block(self, t: dict, v: dict) -> Tensor:  # [ct, cv]
        raise NotImplementedError

    def forward(self, sentence: Tensor, words: Tensor, word_mask: Tensor, frames: Tensor, frame_mask: Tensor,
                chunk_size: int = 256) -> Tensor:
        """sentence [Bt, D], words [Bt, L, D], word_mask [Bt, L], frames [Bv, T, D], frame_mask [Bv, T] → [Bt, Bv]."""
        t_all = self.prepare_text(sentence, words, word_mask.bool())
        v_all = self.prepare_video(frames, frame_mask.bool())
        Bt, Bv = sentence.shape[0], frames.shape[0]
        out = sentence.new_empty(Bt, Bv)
        for i in range(0, Bt, chunk_size):
            t = {k: x[i:i + chunk_size] for k, x in t_all.items()}
            for j in range(0, Bv, chunk_size):
                v = {k: x[j:j + chunk_size] for k, x in v_all.items()}
                out[i:i + chunk_size, j:j + chunk_size] = self._block(t, v)
        return out


class MeanPHead(RetrievalHead):
    """CLIP4Clip meanP: sentence · normalise(mean of valid frames)."""

    def prepare_video(self, frames, frame_mask):
        return {"video": F.normalize(masked_mean(frames, frame_mask), dim=-1)}

    def _block(self, t, v):
        return t["sentence"] @ v["video"].T


class SeqTransfHead(MeanPHead):
    """CLIP4Clip seqTransf: frames + position embedding → transformer (padding masked) + residual → meanP."""

    def __init__(self, dim: int, layers: int = 4, heads: int | None = None, max_frames: int = 64):
        super().__init__()
        self.frame_position = nn.Embedding(max_frames, dim)
        layer = nn.TransformerEncoderLayer(dim, heads or max(1, dim // 64), 4 * dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def temporal(self, frames: Tensor, frame_mask: Tensor) -> Tensor:
        """[Bv, T, D] → [Bv, T, D]: x + transformer(x + pos) with padded frames as keys masked."""
        T = frames.shape[1]
        x = frames + self.frame_position(torch.arange(T, device=frames.device))[None]
        return frames + self.transformer(x, src_key_padding_mask=~frame_mask)

    def prepare_video(self, frames, frame_mask):
        return super().prepare_video(self.temporal(frames, frame_mask), frame_mask)


class XCLIPHead(RetrievalHead):
    """X-CLIP multi-grained similarity (mean of four), attention over similarity matrices at temperature τ."""

    def __init__(self, temperature: float = 0.01):
        super().__init__()
        self.tau = temperature

    def prepare_video(self, frames, frame_mask):
        f = F.normalize(frames, dim=-1)
        return {"frames": f, "frame_mask": frame_mask, "video": F.normalize(masked_mean(f, frame_mask), dim=-1)}

    def _block(self, t, v):
        tau = self.tau
        wm, fm = t["word_mask"], v["frame_mask"]                               # [ct, L], [cv, T]
        vs = t["sentence"] @ v["video"].T                                      # [ct, cv]
        vw_s = torch.einsum("tld,vd->tvl", t["words"], v["video"])             # [ct, cv, L]
        vw = _masked_softmax_sum(vw_s, wm[:, None, :], -1, tau)
        sf_s = torch.einsum("td,vkd->tvk", t["sentence"], v["frames"])         # [ct, cv, T]
        sf = _masked_softmax_sum(sf_s, fm[None, :, :], -1, tau)
        S = torch.einsum("tld,vkd->tvlk", t["words"], v["frames"])             # [ct, cv, L, T]
        both = wm[:, None, :, None] & fm[None, :, None, :]                     # [ct, cv, L, T]
        per_frame = _masked_softmax_sum(S, both, 2, tau)                       # over words → [ct, cv, T]
        s2f = _masked_softmax_sum(per_frame, fm[None, :, :], -1, tau)
        per_word = _masked_softmax_sum(S, both, 3, tau)                        # over frames → [ct, cv, L]
        v2w = _masked_softmax_sum(per_word, wm[:, None, :], -1, tau)
        fw = (s2f + v2w) / 2
        return (vs + vw + sf + fw) / 4


class DRLHead(RetrievalHead):
    """DRL weighted token-wise interaction; token weights from a small MLP, softmax over valid tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.text_weight_fc = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(inplace=True), nn.Linear(2 * dim, 1))
        self.video_weight_fc = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(inplace=True), nn.Linear(2 * dim, 1))

    def prepare_text(self, sentence, words, word_mask):
        w = self.text_weight_fc(words).squeeze(-1).masked_fill(~word_mask, _neg(words))     # [Bt, L]
        return {"words": F.normalize(words, dim=-1), "word_mask": word_mask, "word_weight": torch.softmax(w, -1)}

    def prepare_video(self, frames, frame_mask):
        w = self.video_weight_fc(frames).squeeze(-1).masked_fill(~frame_mask, _neg(frames))  # [Bv, T]
        return {"frames": F.normalize(frames, dim=-1), "frame_mask": frame_mask, "frame_weight": torch.softmax(w, -1)}

    def _block(self, t, v):
        S = torch.einsum("tld,vkd->tvlk", t["words"], v["frames"])             # [ct, cv, L, T]
        S = S.masked_fill(~v["frame_mask"][None, :, None, :], _neg(S))
        S = S.masked_fill(~t["word_mask"][:, None, :, None], _neg(S))
        t2v = S.max(-1).values.masked_fill(~t["word_mask"][:, None, :], 0.0)   # best frame per word [ct, cv, L]
        v2t = S.max(-2).values.masked_fill(~v["frame_mask"][None, :, :], 0.0)  # best word per frame [ct, cv, T]
        t2v = (t2v * t["word_weight"][:, None, :]).sum(-1)
        v2t = (v2t * v["frame_weight"][None, :, :]).sum(-1)
        return (t2v + v2t) / 2


def cdcr_loss(text: Tensor, video: Tensor, alpha1: float = 0.11, alpha2: float = 0.0) -> Tensor:
    """DRL channel decorrelation regulariser: text, video [B, D] → scalar.

    C = z(text)ᵀ z(video) / B with z standardising each channel over the batch;
    loss = alpha1 · Σ_i (C_ii − 1)² + alpha2 · Σ_{i≠j} C_ij² (original scripts: alpha1 0.11, alpha2 0)."""
    za = (text - text.mean(0)) / text.std(0)
    zb = (video - video.mean(0)) / video.std(0)
    B = text.shape[0]
    c = za.T @ zb / B                                                          # [D, D]
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return alpha1 * on + alpha2 * off


HEADS = {"meanp": MeanPHead, "seqtransf": SeqTransfHead, "xclip": XCLIPHead, "drl": DRLHead}
