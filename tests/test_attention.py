"""Proxy-guided attention: fast block-sparse path vs the dense-mask oracle vs a loop reference,
and the information-flow property inside a real ViP block."""
import math

import pytest
import torch

from vip.model.attention import (full_attention, proxy_attention, proxy_attention_dense, proxy_attention_mask)


def _inputs(B, M, T, N, H=2, d=8, seed=0, dtype=torch.float32):
    """Leaf q, k, v for proxies ([B, M, H, d] ×3) and patches ([B, T, N, H, d] ×3)."""
    g = torch.Generator().manual_seed(seed)
    p = [torch.randn(B, M, H, d, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]
    f = [torch.randn(B, T, N, H, d, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]
    return p, f


def _call(impl, p, f):
    """Pack q, k, v the way the fused in_proj does: [B, M, 3, H, d], [B, T, N, 3, H, d]."""
    return impl(torch.stack(p, dim=2), torch.stack(f, dim=3))


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _loop_reference(p, f):
    """Per query: softmax over exactly the keys the ViP rule allows (float64 python-level loops)."""
    q_p, k_p, v_p = [t.detach().double() for t in p]
    q_f, k_f, v_f = [t.detach().double() for t in f]
    B, T, N, H, d = q_f.shape
    M = q_p.shape[1]
    o_p, o_f = torch.zeros_like(q_p), torch.zeros_like(q_f)
    all_k = torch.cat([k_p, k_f.reshape(B, T * N, H, d)], 1)
    all_v = torch.cat([v_p, v_f.reshape(B, T * N, H, d)], 1)
    for b in range(B):
        for h in range(H):
            for i in range(M):  # a proxy sees every token
                w = torch.softmax(all_k[b, :, h] @ q_p[b, i, h] / math.sqrt(d), 0)
                o_p[b, i, h] = w @ all_v[b, :, h]
            for t in range(T):  # a patch sees the proxies and its own frame
                keys = torch.cat([k_p[b, :, h], k_f[b, t, :, h]])
                vals = torch.cat([v_p[b, :, h], v_f[b, t, :, h]])
                for n in range(N):
                    w = torch.softmax(keys @ q_f[b, t, n, h] / math.sqrt(d), 0)
                    o_f[b, t, n, h] = w @ vals
    return o_p, o_f


@pytest.mark.parametrize("T", [1, 2, 12])
@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("N", [7, 9])
def test_fast_equals_dense_forward_and_grad(T, M, N):
    p, f = _inputs(2, M, T, N, seed=T * 100 + M * 10 + N)
    fast = _call(proxy_attention, p, f)
    dense = _call(proxy_attention_dense, p, f)
    assert fast[0].shape == p[0].shape and fast[1].shape == f[0].shape
    for a, b in zip(fast, dense):
        assert _rel(a, b) < 1e-5
    # gradients of the same random projection of the outputs
    g = torch.Generator().manual_seed(7)
    w_p, w_f = torch.randn(fast[0].shape, generator=g), torch.randn(fast[1].shape, generator=g)
    grads_fast = torch.autograd.grad((fast[0] * w_p).sum() + (fast[1] * w_f).sum(), [*p, *f])
    grads_dense = torch.autograd.grad((dense[0] * w_p).sum() + (dense[1] * w_f).sum(), [*p, *f])
    for a, b in zip(grads_fast, grads_dense):
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("T,M,N", [(1, 1, 5), (3, 2, 5), (2, 4, 3)])
def test_dense_oracle_matches_loop_reference(T, M, N):
    p, f = _inputs(1, M, T, N, seed=3)
    ref_p, ref_f = _loop_reference(p, f)
    for impl in (proxy_attention, proxy_attention_dense):
        o_p, o_f = _call(impl, p, f)
        assert _rel(o_p.double(), ref_p) < 1e-5 and _rel(o_f.double(), ref_f) < 1e-5


def test_full_attention_differs_from_proxy_attention_for_several_frames():
    p, f = _inputs(1, 2, 3, 4, seed=5)
    assert _rel(_call(full_attention, p, f)[1], _call(proxy_attention, p, f)[1]) > 1e-3   # the mask matters
    p1, f1 = _inputs(1, 2, 1, 4, seed=5)
    for a, b in zip(_call(full_attention, p1, f1), _call(proxy_attention, p1, f1)):    # one frame: no mask
        assert _rel(a, b) < 1e-6


def test_mask_structure():
    m = proxy_attention_mask(2, 3, 4)
    assert m.shape == (14, 14)
    assert m[:2].all() and m[:, :2].all()                  # proxies see all, all see proxies
    frames = m[2:, 2:].reshape(3, 4, 3, 4)
    for i in range(3):
        for j in range(3):
            assert frames[i, :, j].all() if i == j else not frames[i, :, j].any()


def test_bf16_runs_close_to_fp32():
    p, f = _inputs(2, 4, 3, 9)
    ref = _call(proxy_attention, p, f)
    low = _call(proxy_attention, [t.detach().bfloat16() for t in p], [t.detach().bfloat16() for t in f])
    assert low[1].dtype == torch.bfloat16
    assert _rel(low[1].float(), ref[1].detach()) < 3e-2


@pytest.mark.parametrize("attention", ["proxy", "proxy_dense"])
def test_frames_isolated_after_first_block_but_proxies_see_them(attention):
    """Perturb frame j: after block 1 no other frame's patch outputs change, the proxies do;
    after block 2 the other frames change too (through the proxies)."""
    from vip.model.archs import build_clip
    from vip.model.vip_vit import VideoViT
    torch.manual_seed(0)
    enc = VideoViT(build_clip("vip-tiny").visual, num_proxies=3, max_frames=4, attention=attention).eval()
    with torch.no_grad():
        enc.temporal_embedding.normal_(std=0.1)
    video = torch.randn(2, 4, 3, 48, 48)                   # 3×3 = 9 patches per frame
    moved = video.clone()
    moved[:, 2] += torch.randn_like(moved[:, 2])
    blocks = enc.transformer.resblocks

    def run(v, depth):
        p, f = enc.embed(v)
        for blk in blocks[:depth]:
            p, f = enc._block(blk, p, f)
        return p, f

    with torch.no_grad():
        p0, f0 = run(video, 1)
        p1, f1 = run(moved, 1)
        others = [0, 1, 3]
        torch.testing.assert_close(f1[:, others], f0[:, others], rtol=0, atol=1e-6)
        assert (f1[:, 2] - f0[:, 2]).abs().max() > 1e-2
        assert (p1 - p0).abs().max() > 1e-3
        _, f0 = run(video, 2)
        _, f1 = run(moved, 2)
        assert (f1[:, others] - f0[:, others]).abs().max() > 1e-4
