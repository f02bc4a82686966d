"""DRL weighted token-wise interaction + channel decorrelation (foolwood/DRL, `tvr/models/modeling.py`,
`wti_interaction`, with its scripts' `--agg_module seqTransf --interaction wti --wti_arch 2 --cdcr 3`).

* frames → temporal transformer (seqTransf; `temporal=False` skips it, the `--agg_module None` run);
* token weights: text_weight_fc / video_weight_fc = Linear(D, D) → ReLU → Linear(D, 1) on the
  unnormalised tokens, softmax over the valid tokens (padding −inf);
* S = norm(words)·norm(frames)ᵀ with padded entries set to 0 (the original multiplies by the
  masks), t2v = Σ_l w_l max_t S, v2t = Σ_t w_t max_l S, similarity = (t2v + v2t) / 2. A padded
  frame's 0 can win a max when every real frame scores below 0: that is the original;
  `mask_padding=True` (an option) leaves padding out of the max instead.
* `cdcr` (cdcr=3): each text's tokens paired with the frames its own video's interaction matched
  (argmax), and each frame with its matched word; channels standardised over the valid tokens;
  C = Σ_tokens weight · z_a z_bᵀ / B per direction, averaged; loss α1 Σ(C_ii − 1)² + α2 Σ_{i≠j} C_ij².
  The scripts: λ = 0.001, α1 = 0.14 (ViT-B/32) / 0.11 (ViT-B/16), α2 = 0.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from vip.model.heads.base import RetrievalHead, TemporalTransformer, l2n, neg_inf


def token_weight_mlp(dim: int) -> nn.Sequential:
    """wti_arch 2: Linear(D, D) → ReLU → Linear(D, 1) (keys .0 and .2, as the original)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, 1))


class DRLHead(RetrievalHead):
    """DRL weighted token-wise interaction over words and frames."""

    name = "drl"

    def __init__(self, dim: int, temporal: bool = True, layers: int = 4, heads: int | None = None,
                 max_positions: int = 77, mask_padding: bool = False, cdcr_alpha1: float = 0.14,
                 cdcr_alpha2: float = 0.0, **spec):
        super().__init__(dim=dim, temporal=temporal, layers=layers, heads=heads, max_positions=max_positions,
                         mask_padding=mask_padding, cdcr_alpha1=cdcr_alpha1, cdcr_alpha2=cdcr_alpha2, **spec)
        self.mask_padding, self.alpha1, self.alpha2 = mask_padding, cdcr_alpha1, cdcr_alpha2
        self.temporal = TemporalTransformer(dim, layers, heads, max_positions) if temporal else None
        self.text_weight_fc = token_weight_mlp(dim)
        self.video_weight_fc = token_weight_mlp(dim)
        for m in (*self.text_weight_fc, *self.video_weight_fc):      # the original's init_weights
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def prepare_text(self, sentence, words, word_mask):
        w = self.text_weight_fc(words).squeeze(-1).masked_fill(~word_mask, float("-inf"))      # [Bt, L]
        return {"words": l2n(words), "word_mask": word_mask, "word_weight": torch.softmax(w, -1)}

    def prepare_video(self, frames, frame_mask):
        x = self.temporal(frames, frame_mask) if self.temporal is not None else frames
        w = self.video_weight_fc(x).squeeze(-1).masked_fill(~frame_mask, float("-inf"))        # [Bv, T]
        return {"frames": l2n(x), "frame_mask": frame_mask, "frame_weight": torch.softmax(w, -1)}

    def token_sims(self, words: Tensor, word_mask: Tensor, frames: Tensor, frame_mask: Tensor, pairs: str) -> Tensor:
        """pairs "all": [ct, cv, L, T]; "diag": [B, L, T] (text i with video i). Padding: 0, or −max when masked."""
        eq = "tld,vkd->tvlk" if pairs == "all" else "bld,bkd->blk"
        S = torch.einsum(eq, words, frames)
        wm = word_mask[:, None, :, None] if pairs == "all" else word_mask[:, :, None]
        fm = frame_mask[None, :, None, :] if pairs == "all" else frame_mask[:, None, :]
        if self.mask_padding:
            return S.masked_fill(~(wm & fm), neg_inf(S))
        return S * wm.to(S.dtype) * fm.to(S.dtype)

    def pair(self, t, v):
        S = self.token_sims(t["words"], t["word_mask"], v["frames"], v["frame_mask"], "all")   # [ct, cv, L, T]
        t2v = S.max(-1).values                                                 # best frame per word [ct, cv, L]
        v2t = S.max(-2).values                                                 # best word per frame [ct, cv, T]
        if self.mask_padding:
            t2v = t2v.masked_fill(~t["word_mask"][:, None, :], 0.0)
            v2t = v2t.masked_fill(~v["frame_mask"][None, :, :], 0.0)
        t2v = (t2v * t["word_weight"][:, None, :]).sum(-1)
        v2t = (v2t * v["frame_weight"][None, :, :]).sum(-1)
        return (t2v + v2t) / 2

    def regulariser(self, t, v):
        """CDCR (cdcr=3) on a batch of matched pairs (text i ↔ video i); unweighted by λ."""
        wm, fm = t["word_mask"], v["frame_mask"]
        S = self.token_sims(t["words"], wm, v["frames"], fm, "diag")           # [B, L, T]
        B = S.shape[0]
        frame_of_word = S.max(-1).indices                                      # [B, L]
        word_of_frame = S.max(-2).indices                                      # [B, T]
        rows = torch.arange(B, device=S.device)[:, None]
        matched_v = v["frames"][rows, frame_of_word][wm]                       # [N_t, D]
        matched_t = t["words"][rows, word_of_frame][fm]                        # [N_v, D]
        c1 = weighted_cross_correlation(t["words"][wm], matched_v, t["word_weight"][wm], B)
        c2 = weighted_cross_correlation(v["frames"][fm], matched_t, v["frame_weight"][fm], B)
        return decorrelation_loss((c1 + c2) / 2, self.alpha1, self.alpha2)


def standardise(x: Tensor) -> Tensor:
    """Each channel to zero mean, unit (unbiased) std over the rows."""
    return (x - x.mean(0)) / x.std(0)


def weighted_cross_correlation(a: Tensor, b: Tensor, weight: Tensor, batch: int) -> Tensor:
    """a, b [N, D] paired rows, weight [N] → Σ_n weight_n · z(a)_n z(b)_nᵀ / batch [D, D], as one
    matmul (the original's einsum materialises [N, D, D]: 4 GB at 128 × 32 words, D = 512)."""
    return (standardise(a) * weight[:, None]).T @ standardise(b) / batch


def decorrelation_loss(c: Tensor, alpha1: float, alpha2: float) -> Tensor:
    """α1 Σ_i (C_ii − 1)² + α2 Σ_{i≠j} C_ij²."""
    diag = torch.diagonal(c)
    on = (diag - 1).pow(2).sum()
    off = c.pow(2).sum() - diag.pow(2).sum()
    return alpha1 * on + alpha2 * off
