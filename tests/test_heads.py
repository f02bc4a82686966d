"""Retrieval heads against direct per-pair loop implementations, with padding; chunking; CDCR."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vip.eval.heads import DRLHead, MeanPHead, SeqTransfHead, XCLIPHead, cdcr_loss

D = 8


@pytest.fixture(scope="module")
def feats():
    g = torch.Generator().manual_seed(0)
    Bt, L, Bv, T = 5, 6, 4, 5
    sent = torch.randn(Bt, D, generator=g)
    words = torch.randn(Bt, L, D, generator=g)
    frames = torch.randn(Bv, T, D, generator=g)
    wlen = [6, 3, 1, 4, 5]
    flen = [5, 2, 3, 1]
    wm = torch.arange(L)[None] < torch.tensor(wlen)[:, None]
    fm = torch.arange(T)[None] < torch.tensor(flen)[:, None]
    words = words.masked_fill(~wm[..., None], 123.0)        # padding holds junk that must not matter
    frames = frames.masked_fill(~fm[..., None], -77.0)
    return sent, words, wm, frames, fm, wlen, flen


def att(s: torch.Tensor, tau: float) -> float:
    """Σ softmax(s/τ)·s of a 1-D list, the plain way."""
    m = max(s.tolist())
    e = [math.exp((x - m) / tau) for x in s.tolist()]
    return sum(w * x for w, x in zip(e, s.tolist())) / sum(e)


def loop_meanp(sent, words, wlen, frames, flen):
    out = torch.zeros(len(sent), len(frames))
    for i in range(len(sent)):
        for j in range(len(frames)):
            v = frames[j, :flen[j]].mean(0)
            out[i, j] = F.cosine_similarity(sent[i], v, dim=0)
    return out


def loop_xclip(sent, words, wlen, frames, flen, tau=0.01):
    out = torch.zeros(len(sent), len(frames))
    for i in range(len(sent)):
        s = F.normalize(sent[i], dim=0)
        w = F.normalize(words[i, :wlen[i]], dim=-1)           # [l, D]
        for j in range(len(frames)):
            f = F.normalize(frames[j, :flen[j]], dim=-1)      # [k, D]
            v = F.normalize(f.mean(0), dim=0)
            vs = float(s @ v)
            vw = att(w @ v, tau)
            sf = att(f @ s, tau)
            S = w @ f.T                                       # [l, k]
            per_frame = torch.tensor([att(S[:, k], tau) for k in range(S.shape[1])])
            per_word = torch.tensor([att(S[l], tau) for l in range(S.shape[0])])
            fw = (att(per_frame, tau) + att(per_word, tau)) / 2
            out[i, j] = (vs + vw + sf + fw) / 4
    return out


def loop_drl(head, words, wlen, frames, flen):
    out = torch.zeros(len(words), len(frames))
    for i in range(len(words)):
        w_raw = words[i, :wlen[i]]
        ww = torch.softmax(head.text_weight_fc(w_raw).squeeze(-1), 0)
        w = F.normalize(w_raw, dim=-1)
        for j in range(len(frames)):
            f_raw = frames[j, :flen[j]]
            fw = torch.softmax(head.video_weight_fc(f_raw).squeeze(-1), 0)
            f = F.normalize(f_raw, dim=-1)
            S = w @ f.T
            t2v = sum(ww[l] * S[l].max() for l in range(len(w)))
            v2t = sum(fw[k] * S[:, k].max() for k in range(len(f)))
            out[i, j] = (t2v + v2t) / 2
    return out


@torch.no_grad()
def test_meanp(feats):
    sent, words, wm, frames, fm, wlen, flen = feats
    got = MeanPHead()(sent, words, wm, frames, fm)
    torch.testing.assert_close(got, loop_meanp(sent, words, wlen, frames, flen), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_seqtransf_masks_padding(feats):
    sent, words, wm, frames, fm, wlen, flen = feats
    torch.manual_seed(0)
    head = SeqTransfHead(D, layers=2, heads=2, max_frames=8).eval()
    got = head(sent, words, wm, frames, fm)
    ref = torch.zeros_like(got)
    for j in range(len(frames)):                              # each video alone, without its padding
        x = head.temporal(frames[j:j + 1, :flen[j]], torch.ones(1, flen[j], dtype=torch.bool))
        v = F.normalize(x[0].mean(0), dim=0)
        ref[:, j] = F.normalize(sent, dim=-1) @ v
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("tau", [0.01, 0.5])
def test_xclip(feats, tau):
    sent, words, wm, frames, fm, wlen, flen = feats
    got = XCLIPHead(tau)(sent, words, wm, frames, fm)
    torch.testing.assert_close(got, loop_xclip(sent, words, wlen, frames, flen, tau), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_drl(feats):
    sent, words, wm, frames, fm, wlen, flen = feats
    torch.manual_seed(0)
    head = DRLHead(D)
    got = head(sent, words, wm, frames, fm)
    torch.testing.assert_close(got, loop_drl(head, words, wlen, frames, flen), atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("make", [MeanPHead, lambda: SeqTransfHead(D, 1, 2, 8).eval(), XCLIPHead, lambda: DRLHead(D)])
def test_chunked_equals_unchunked(feats, make):
    sent, words, wm, frames, fm, _, _ = feats
    torch.manual_seed(1)
    head = make()
    full = head(sent, words, wm, frames, fm, chunk_size=10_000)
    for c in (1, 2, 3):
        torch.testing.assert_close(head(sent, words, wm, frames, fm, chunk_size=c), full, atol=1e-6, rtol=1e-6)


def test_any_frame_count_and_grad():
    torch.manual_seed(2)
    head = XCLIPHead()
    for T in (1, 3, 17):
        frames = torch.randn(2, T, D, requires_grad=True)
        sim = head(torch.randn(3, D), torch.randn(3, 4, D), torch.ones(3, 4), frames, torch.ones(2, T))
        assert sim.shape == (3, 2)
        sim.sum().backward()
        assert torch.isfinite(frames.grad).all()


def test_cdcr_direct_formula():
    torch.manual_seed(3)
    B, d = 7, 4
    a, b = torch.randn(B, d), torch.randn(B, d)
    za = [[(a[n, i] - a[:, i].mean()) / a[:, i].std() for i in range(d)] for n in range(B)]
    zb = [[(b[n, i] - b[:, i].mean()) / b[:, i].std() for i in range(d)] for n in range(B)]
    C = [[sum(za[n][i] * zb[n][j] for n in range(B)) / B for j in range(d)] for i in range(d)]
    on = sum((C[i][i] - 1) ** 2 for i in range(d))
    off = sum(C[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    assert float(cdcr_loss(a, b, 0.11, 0.0)) == pytest.approx(float(0.11 * on), rel=1e-5)
    assert float(cdcr_loss(a, b, 1.0, 0.5)) == pytest.approx(float(on + 0.5 * off), rel=1e-5)
    assert float(cdcr_loss(a, a, 1.0, 0.0)) == pytest.approx(float(on_self(a)), abs=1e-4)


def on_self(a):
    """Perfectly correlated channels: C_ii = (B-1)/B with unbiased std → Σ (1/B)²."""
    B, d = a.shape
    return d * (1 / B) ** 2
