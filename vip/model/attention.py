"""Proxy-guided attention (CLIP-ViP): a fast block-sparse path and a dense-mask oracle.

Token layout (docs/architecture.md, "Token layout"): ``[M proxies, T×N patch tokens (frame-major)]``, L = M + T·N.
A proxy attends to every token; a patch token attends to the M proxies and to the N
patches of its own frame only. The mask is block-sparse, so the fast path never builds
the L×L mask. It keeps the two kinds of tokens as two tensors (proxies ``[B, M, ...]``,
patches ``[B, T, N, ...]``) and runs

* per-frame attention: queries = one frame's N patches, keys = [M proxies, that frame's N
  patches] → B·T independent attentions of size N × (M+N), and
* proxy attention: queries = the M proxies, keys = all L tokens,

both through ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
kernels where the platform has them), so the cost is ≈ the image tower run on B·T frames.
Keeping two streams (instead of slicing one [B, L] sequence) means the backward pass never
zero-fills full-size gradient buffers for slices; concatenations' backwards are views.

Every function takes the packed per-head projections a fused qkv linear produces
(token-major): proxies ``qkv_p [B, M, 3, H, d]`` and patches ``qkv_f [B, T, N, 3, H, d]``,
and returns the attention outputs (proxies ``[B, M, H, d]``, patches ``[B, T, N, H, d]``).
They are pure functions of q, k, v.

Memory: the fast path builds one buffer ``[B, T, M+N, 3, H, d]`` (every frame's patches with
the proxies' q/k/v in front) and runs both attentions on views of it, so autograd keeps
about what the image tower keeps for B·T frames. The proxies' attention over all tokens
reads the same buffer, where each proxy key appears T times; a bias of -ln T on those
duplicate keys makes the softmax exactly that over the M + T·N distinct tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """SDPA on token-major 4-D inputs: [B, L, H, d] → [B, L, H, d] (a strided view)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)


def _flat(qkv_p: Tensor, qkv_f: Tensor) -> Tensor:
    """[B, M, 3, H, d] + [B, T, N, 3, H, d] → [B, M+T·N, 3, H, d] (the single-sequence layout)."""
    B, T, N = qkv_f.shape[:3]
    return torch.cat([qkv_p, qkv_f.reshape(B, T * N, *qkv_f.shape[3:])], dim=1)


def _split(o: Tensor, M: int, T: int, N: int) -> tuple[Tensor, Tensor]:
    """Inverse of `_flat` for outputs: [B, M+T·N, H, d] → ([B, M, H, d], [B, T, N, H, d])."""
    B, _, H, d = o.shape
    return o[:, :M], o[:, M:].reshape(B, T, N, H, d)


def full_attention(qkv_p: Tensor, qkv_f: Tensor) -> tuple[Tensor, Tensor]:
    """Every token attends to every token (joint space-time attention; the FullAttention
    baseline, and ViP with one frame where the proxy mask is all-True)."""
    M, (T, N) = qkv_p.shape[1], qkv_f.shape[1:3]
    o = _sdpa(*_flat(qkv_p, qkv_f).unbind(2))                              # [B, L, H, d]
    return _split(o, M, T, N)


def proxy_attention(qkv_p: Tensor, qkv_f: Tensor) -> tuple[Tensor, Tensor]:
    """Fast proxy-guided attention, no L×L mask.
    qkv_p: proxies [B, M, 3, H, d]; qkv_f: patches [B, T, N, 3, H, d].
    Returns (proxy outputs [B, M, H, d], patch outputs [B, T, N, H, d])."""
    B, T, N, _, H, d = qkv_f.shape
    M = qkv_p.shape[1]
    if T == 1:  # one frame: every token sees every token
        return full_attention(qkv_p, qkv_f)
    buf = torch.cat([qkv_p.unsqueeze(1).expand(B, T, M, 3, H, d), qkv_f], dim=2)  # [B, T, M+N, 3, H, d]

    # patches → [proxies, own-frame patches]: B·T independent 4-D attentions (views of buf)
    q_f = buf[:, :, M:, 0].reshape(B * T, N, H, d)                          # [B·T, N, H, d]
    k_f = buf[:, :, :, 1].reshape(B * T, M + N, H, d)                       # [B·T, M+N, H, d]
    v_f = buf[:, :, :, 2].reshape(B * T, M + N, H, d)
    o_f = _sdpa(q_f, k_f, v_f).reshape(B, T, N, H, d)

    # proxies → all tokens: keys are buf's T·(M+N) rows; the T copies of each proxy key get -ln T
    bias = torch.zeros(T, M + N, dtype=qkv_f.dtype, device=qkv_f.device)
    bias[:, :M] = -math.log(T)
    k_all = buf[:, :, :, 1].reshape(B, T * (M + N), H, d)                   # [B, T·(M+N), H, d]
    v_all = buf[:, :, :, 2].reshape(B, T * (M + N), H, d)
    o_p = _sdpa(qkv_p[:, :, 0], k_all, v_all, bias.view(1, T * (M + N)))   # [B, M, H, d]
    return o_p, o_f


def proxies_only_attention(qkv_p: Tensor, qkv_f: Tensor) -> Tensor:
    """Only the proxies' outputs [B, M, H, d] (they attend to every token under every rule here):
    the last block of a video encoder, whose patch outputs nothing reads."""
    _, k, v = _flat(qkv_p, qkv_f).unbind(2)                                # [B, L, H, d]
    return _sdpa(qkv_p[:, :, 0], k, v)


def proxy_attention_mask(num_proxies: int, num_frames: int, patches_per_frame: int,
                         device: torch.device | str | None = None) -> Tensor:
    """Dense boolean mask [L, L] of proxy-guided attention (True = may attend)."""
    M, T, N = num_proxies, num_frames, patches_per_frame
    L = M + T * N
    group = torch.full((L,), -1, dtype=torch.long, device=device)          # -1: proxy, else frame index
    group[M:] = torch.arange(T, device=device).repeat_interleave(N)
    is_proxy = group < 0
    same_frame = group[:, None] == group[None, :]
    return is_proxy[:, None] | is_proxy[None, :] | same_frame              # [L, L]


def proxy_attention_dense(qkv_p: Tensor, qkv_f: Tensor) -> tuple[Tensor, Tensor]:
    """Dense-mask proxy-guided attention over the flattened [M + T·N] sequence: the oracle for
    `proxy_attention` (and a benchmark row). Same arguments and outputs."""
    M, (T, N) = qkv_p.shape[1], qkv_f.shape[1:3]
    mask = proxy_attention_mask(M, T, N, qkv_p.device)                     # [L, L]
    o = _sdpa(*_flat(qkv_p, qkv_f).unbind(2), mask)                        # [B, L, H, d]
    return _split(o, M, T, N)


ATTENTION = {"proxy": proxy_attention, "proxy_dense": proxy_attention_dense, "full": full_attention}
