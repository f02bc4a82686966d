"""X-CLIP multi-grained similarity (xuguohai/X-CLIP, `modeling_xclip.py`, `_loose_similarity`).

Features, as the original with its scripts' `--sim_header seqTransf`:
* video level v: frames → temporal transformer (seqTransf) → normalise each frame → masked mean → normalise;
* frame level f: the raw frame features, normalised (`use_original_clip_for_frame_features = True`);
* sentence s (EOS token) and words w (every token position), normalised.

Per text × video pair (τ = 0.01; W_* are learned, identity at init):
  video–sentence  s·G·v                                         (G = global_mat_weight, D×D)
  video–word      Σ_l a_l (softmax(a/τ)·W_wl)_l, a = w·v        (W_wl = word_logit_weight, L×L)
  sentence–frame  Σ_t b_t (softmax(b/τ)·W_fl)_t, b = f·s        (W_fl = frame_logit_weight, T×T)
  frame–word      S = w·Λ·fᵀ [L, T] (Λ = local_mat_weight, D×D); per frame: attention over words
                  re-weighted by W_wm, per word: attention over frames re-weighted by W_fm; then a
                  second attention over those vectors (W_fm2, W_wm2); mean of the two
  similarity = mean of the four.
The original attends over every word position (padding too) and every frame: that is the default.
Options (documented in docs/evaluation.md): `mask_padding=True` leaves padded words/frames out of
every softmax and sum; `length_weights=False` drops the four L×L / T×T matrices so any L and T work.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from vip.model.heads.base import RetrievalHead, TemporalTransformer, l2n, masked_mean, neg_inf


def attend(s: Tensor, dim: int, tau: float, weight: Tensor | None, mask: Tensor | None) -> Tensor:
    """X-CLIP's AOSM step: Σ_dim s · (softmax(s/τ, dim) @ W) (W: re-weighting over `dim`, None = identity).
    mask (broadcastable to s, True = real): padded entries get no weight and add nothing."""
    logits = s / tau
    if mask is not None:
        logits = logits.masked_fill(~mask, neg_inf(s))
    p = torch.softmax(logits, dim=dim)
    if weight is not None:
        p = (p.movedim(dim, -1) @ weight).movedim(-1, dim)
    if mask is not None:
        s = s.masked_fill(~mask, 0.0)
    return (p * s).sum(dim)


class XCLIPHead(RetrievalHead):
    """X-CLIP: mean of video–sentence, video–word, sentence–frame and frame–word similarities."""

    name = "xclip"

    def __init__(self, dim: int, num_words: int = 32, num_frames: int = 12, temperature: float = 0.01,
                 temporal: bool = True, layers: int = 4, heads: int | None = None, max_positions: int = 77,
                 mask_padding: bool = False, length_weights: bool = True, **spec):
        super().__init__(dim=dim, num_words=num_words, num_frames=num_frames, temperature=temperature,
                         temporal=temporal, layers=layers, heads=heads, max_positions=max_positions,
                         mask_padding=mask_padding, length_weights=length_weights, **spec)
        self.tau, self.mask_padding, self.length_weights = temperature, mask_padding, length_weights
        self.num_words, self.num_frames = num_words, num_frames
        self.temporal = TemporalTransformer(dim, layers, heads, max_positions) if temporal else None
        self.global_mat_weight = nn.Parameter(torch.eye(dim))
        self.local_mat_weight = nn.Parameter(torch.eye(dim))
        if length_weights:
            self.word_logit_weight = nn.Parameter(torch.eye(num_words))
            self.frame_logit_weight = nn.Parameter(torch.eye(num_frames))
            self.frame_mat_weight = nn.Parameter(torch.eye(num_frames))
            self.word_mat_weight = nn.Parameter(torch.eye(num_words))
            self.frame_mat_weight2 = nn.Parameter(torch.eye(num_frames))
            self.word_mat_weight2 = nn.Parameter(torch.eye(num_words))

    def _w(self, name: str) -> Tensor | None:
        return getattr(self, name) if self.length_weights else None

    def prepare_text(self, sentence, words, word_mask):
        if self.length_weights and words.shape[1] != self.num_words:
            raise ValueError(f"xclip head has {self.num_words}×{self.num_words} word weights; texts have "
                             f"{words.shape[1]} tokens (tokenise at context length {self.num_words})")
        return {"sentence": l2n(sentence), "words": l2n(words), "word_mask": word_mask}

    def prepare_video(self, frames, frame_mask):
        if self.length_weights and frames.shape[1] != self.num_frames:
            raise ValueError(f"xclip head has {self.num_frames}×{self.num_frames} frame weights; videos have "
                             f"{frames.shape[1]} frames (use num_frames={self.num_frames})")
        x = self.temporal(frames, frame_mask) if self.temporal is not None else frames
        return {"video": l2n(masked_mean(l2n(x), frame_mask)), "frames": l2n(frames), "frame_mask": frame_mask}

    def pair(self, t, v):
        tau, masked = self.tau, self.mask_padding
        wm = t["word_mask"][:, None, :] if masked else None                            # [ct, 1, L]
        fm = v["frame_mask"][None, :, :] if masked else None                           # [1, cv, T]
        both = (t["word_mask"][:, None, :, None] & v["frame_mask"][None, :, None, :]) if masked else None
        s, w, vid, f = t["sentence"], t["words"], v["video"], v["frames"]
        vs = s @ self.global_mat_weight @ vid.T                                        # [ct, cv]
        a = torch.einsum("tld,vd->tvl", w, vid)                                        # [ct, cv, L]
        vw = attend(a, -1, tau, self._w("word_logit_weight"), wm)
        b = torch.einsum("td,vkd->tvk", s, f)                                          # [ct, cv, T]
        sf = attend(b, -1, tau, self._w("frame_logit_weight"), fm)
        S = torch.einsum("tld,vkd->tvlk", w @ self.local_mat_weight, f)                # [ct, cv, L, T]
        per_frame = attend(S, 2, tau, self._w("word_mat_weight"), both)                # over words → [ct, cv, T]
        per_word = attend(S, 3, tau, self._w("frame_mat_weight"), both)                # over frames → [ct, cv, L]
        s2f = attend(per_frame, -1, tau, self._w("frame_mat_weight2"), fm)
        v2w = attend(per_word, -1, tau, self._w("word_mat_weight2"), wm)
        return (vs + vw + sf + (s2f + v2w) / 2) / 4
