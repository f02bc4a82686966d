"""Retrieval heads against direct per-pair loop implementations of the originals' formulas (CLIP4Clip
meanP / seqTransf, X-CLIP, DRL), on tensors with padding; chunking; the options; CDCR."""
from __future__ import annotations

import math

import pytest
import torch

from vip.model.heads import DRLHead, MeanPHead, SeqTransfHead, TemporalTransformer, XCLIPHead, build_head

D, L, T = 8, 6, 5


@pytest.fixture(scope="module")
def feats():
    g = torch.Generator().manual_seed(0)
    Bt, Bv = 5, 4
    sent = torch.randn(Bt, D, generator=g)
    words = torch.randn(Bt, L, D, generator=g)
    frames = torch.randn(Bv, T, D, generator=g)
    wlen, flen = [6, 3, 1, 4, 5], [5, 2, 3, 1]
    wm = torch.arange(L)[None] < torch.tensor(wlen)[:, None]
    fm = torch.arange(T)[None] < torch.tensor(flen)[:, None]
    words = words.masked_fill(~wm[..., None], 3.0) + 0.1 * torch.randn(Bt, L, D, generator=g) * ~wm[..., None]
    frames = frames.masked_fill(~fm[..., None], -2.0)       # padding holds junk
    return sent, words, wm, frames, fm, wlen, flen


def nrm(x):
    return x / x.norm(dim=-1, keepdim=True)


def softmax_list(xs, tau=1.0):
    m = max(xs)
    e = [math.exp((x - m) / tau) for x in xs]
    return [v / sum(e) for v in e]


def aosm(vec, W, tau):
    """X-CLIP attention over a similarity vector: Σ_m vec_m · (softmax(vec/τ) @ W)_m, written as loops."""
    v = [float(x) for x in vec]
    p = softmax_list(v, tau)
    n = len(v)
    return sum(v[m] * sum(p[k] * float(W[k, m]) for k in range(n)) for m in range(n))


def ref_meanp_video(frames_j):
    """CLIP4Clip _loose_similarity: normalise each frame, mean over the valid ones, normalise."""
    return nrm(nrm(frames_j).mean(0))


def ref_ln(x, ln):
    """The original's TF-style LayerNorm (eps inside the sqrt) with eps 1e-12."""
    u = x.mean(-1, keepdim=True)
    s = (x - u).pow(2).mean(-1, keepdim=True)
    return ln.weight * (x - u) / torch.sqrt(s + 1e-12) + ln.bias


def ref_temporal(tt: TemporalTransformer, x, valid):
    """CLIP4Clip seqTransf on one video x [T, D] with `valid` real frames: QuickGELU CLIP blocks,
    additive −1e6 key mask, residual."""
    Tn = x.shape[0]
    h = x + tt.frame_position_embeddings.weight[:Tn]
    keymask = torch.tensor([0.0 if k < valid else -1e6 for k in range(Tn)])
    H = tt.heads
    for blk in tt.transformerClip.resblocks:
        a = ref_ln(h, blk.ln_1)
        qkv = a @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias
        q, k, v = qkv.chunk(3, dim=-1)
        d = D // H
        outs = []
        for hh in range(H):
            qs, ks, vs = (z[:, hh * d:(hh + 1) * d] for z in (q, k, v))
            att = torch.softmax(qs @ ks.T / math.sqrt(d) + keymask[None], dim=-1)
            outs.append(att @ vs)
        h = h + blk.attn.out_proj(torch.cat(outs, -1))
        m = blk.mlp.c_fc(ref_ln(h, blk.ln_2))
        h = h + blk.mlp.c_proj(m * torch.sigmoid(1.702 * m))
    return x + h                                                         # residual to the raw frames


def randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------- CLIP4Clip
@torch.no_grad()
def test_meanp_normalises_each_frame(feats):
    sent, words, wm, frames, fm, wlen, flen = feats
    got = MeanPHead()(sent, words, wm, frames, fm)
    ref = torch.tensor([[float(nrm(sent[i]) @ ref_meanp_video(frames[j, :flen[j]])) for j in range(len(frames))]
                        for i in range(len(sent))])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    plain = torch.stack([nrm(frames[j, :flen[j]].mean(0)) for j in range(len(frames))])
    assert not torch.allclose(got, nrm(sent) @ plain.T, atol=1e-3)     # the per-frame step matters here


@torch.no_grad()
def test_temporal_transformer_is_clip4clip_block(feats):
    _, _, _, frames, fm, _, flen = feats
    torch.manual_seed(0)
    tt = TemporalTransformer(D, layers=2, heads=2, max_positions=16).eval()
    randomise(tt, 1)
    assert all(isinstance(m, torch.nn.LayerNorm) and m.eps == 1e-12 for n, m in tt.named_modules() if "ln_" in n)
    got = tt(frames, fm)
    for j in range(len(frames)):
        ref = ref_temporal(tt, frames[j], flen[j])
        torch.testing.assert_close(got[j, :flen[j]], ref[:flen[j]], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_seqtransf(feats):
    sent, words, wm, frames, fm, wlen, flen = feats
    torch.manual_seed(0)
    head = SeqTransfHead(D, layers=2, heads=2, max_positions=16).eval()
    randomise(head, 2)
    got = head(sent, words, wm, frames, fm)
    for j in range(len(frames)):
        v = ref_meanp_video(ref_temporal(head.temporal, frames[j], flen[j])[:flen[j]])
        torch.testing.assert_close(got[:, j], nrm(sent) @ v, atol=1e-4, rtol=1e-4)


def test_temporal_init_from_text_tower():
    from open_clip.transformer import Transformer
    torch.manual_seed(0)
    text = Transformer(D, 3, 2)
    pos = torch.randn(77, D)
    tt = TemporalTransformer(D, layers=2, heads=2, max_positions=77)
    assert tt.init_from_text(text, pos)
    for a, b in zip(tt.transformerClip.resblocks, text.resblocks):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
    assert torch.equal(tt.frame_position_embeddings.weight, pos)
    assert not TemporalTransformer(D, 2, 1, 77).init_from_text(text, pos)      # head count differs: random kept


# --------------------------------------------------------------------------- X-CLIP
def loop_xclip(head, sent, words, wlen, frames, flen, masked):
    """modeling_xclip._loose_similarity per pair: padded words/frames included unless `masked`."""
    tau = head.tau
    G, Lm = head.global_mat_weight, head.local_mat_weight
    W = {k: getattr(head, k) for k in ("word_logit_weight", "frame_logit_weight", "word_mat_weight",
                                       "frame_mat_weight", "word_mat_weight2", "frame_mat_weight2")}
    out = torch.zeros(len(sent), len(frames))
    for i in range(len(sent)):
        s = nrm(sent[i])
        lw = list(range(wlen[i] if masked else L))
        w = nrm(words[i])
        for j in range(len(frames)):
            lf = list(range(flen[j] if masked else T))
            x = ref_temporal(head.temporal, frames[j], flen[j])              # video level: seqTransf
            vid = ref_meanp_video(x[:flen[j]])
            f = nrm(frames[j])                                              # frame level: raw CLIP features
            sub = lambda M, a, b: M[a][:, b]                                # noqa: E731
            vs = float(s @ G @ vid)
            vw = aosm([float(w[l] @ vid) for l in lw], sub(W["word_logit_weight"], lw, lw), tau)
            sf = aosm([float(f[t] @ s) for t in lf], sub(W["frame_logit_weight"], lf, lf), tau)
            S = [[float(w[l] @ Lm @ f[t]) for t in range(T)] for l in range(L)]
            per_frame = [aosm([S[l][t] for l in lw], sub(W["word_mat_weight"], lw, lw), tau) for t in lf]
            per_word = [aosm([S[l][t] for t in lf], sub(W["frame_mat_weight"], lf, lf), tau) for l in lw]
            s2f = aosm(per_frame, sub(W["frame_mat_weight2"], lf, lf), tau)
            v2w = aosm(per_word, sub(W["word_mat_weight2"], lw, lw), tau)
            out[i, j] = (vs + vw + sf + (s2f + v2w) / 2) / 4
    return out


@torch.no_grad()
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("tau", [0.01, 0.5])
def test_xclip(feats, masked, tau):
    sent, words, wm, frames, fm, wlen, flen = feats
    torch.manual_seed(0)
    head = XCLIPHead(D, num_words=L, num_frames=T, temperature=tau, layers=1, heads=2, max_positions=16,
                     mask_padding=masked).eval()
    randomise(head, 3)                                 # away from identity: every re-weighting matrix counts
    got = head(sent, words, wm, frames, fm)
    torch.testing.assert_close(got, loop_xclip(head, sent, words, wlen, frames, flen, masked), atol=2e-4, rtol=2e-4)


@torch.no_grad()
def test_xclip_init_and_lengths(feats):
    sent, words, wm, frames, fm, _, _ = feats
    head = XCLIPHead(D, num_words=L, num_frames=T)
    for n in ("global_mat_weight", "local_mat_weight", "word_logit_weight", "frame_logit_weight", "word_mat_weight",
              "frame_mat_weight", "word_mat_weight2", "frame_mat_weight2"):
        p = getattr(head, n)
        assert torch.equal(p, torch.eye(p.shape[0])), n
    with pytest.raises(ValueError, match="frames"):
        head(sent, words, wm, frames[:, :3], fm[:, :3])
    free = XCLIPHead(D, length_weights=False, temporal=False)       # the any-T / any-L option
    for Tn in (1, 3, 17):
        assert free(sent, words, wm, torch.randn(2, Tn, D), torch.ones(2, Tn)).shape == (5, 2)


# --------------------------------------------------------------------------- DRL
def loop_drl(head, words, wlen, frames, flen, masked):
    """tvr/models/modeling.py wti_interaction per pair (padded similarities 0 before the max unless masked)."""
    out = torch.zeros(len(words), len(frames))
    for i in range(len(words)):
        ww = softmax_list([float(head.text_weight_fc(words[i, l])) for l in range(wlen[i])])
        w = nrm(words[i])
        for j in range(len(frames)):
            x = ref_temporal(head.temporal, frames[j], flen[j])
            fw = softmax_list([float(head.video_weight_fc(x[t])) for t in range(flen[j])])
            f = nrm(x)
            S = [[float(w[l] @ f[t]) if (l < wlen[i] and t < flen[j]) else 0.0 for t in range(T)] for l in range(L)]
            cand_t = range(flen[j]) if masked else range(T)
            cand_l = range(wlen[i]) if masked else range(L)
            t2v = sum(ww[l] * max(S[l][t] for t in cand_t) for l in range(wlen[i]))
            v2t = sum(fw[t] * max(S[l][t] for l in cand_l) for t in range(flen[j]))
            out[i, j] = (t2v + v2t) / 2
    return out


@torch.no_grad()
@pytest.mark.parametrize("masked", [False, True])
def test_drl(feats, masked):
    sent, words, wm, frames, fm, wlen, flen = feats
    torch.manual_seed(0)
    head = DRLHead(D, layers=1, heads=2, max_positions=16, mask_padding=masked).eval()
    randomise(head, 4)
    got = head(sent, words, wm, frames, fm)
    torch.testing.assert_close(got, loop_drl(head, words, wlen, frames, flen, masked), atol=1e-4, rtol=1e-4)


def test_drl_weight_mlp_has_width_d():
    head = DRLHead(D)
    assert [tuple(p.shape) for p in head.text_weight_fc.parameters()] == [(D, D), (D,), (1, D), (1,)]


def loop_cdcr(head, words, wlen, frames, flen, a1, a2):
    """cdcr=3 of the original, with loops: matched token pairs of each text i ↔ video i, weighted."""
    B = len(words)
    rows_t, rows_v, wt, rows_f, rows_w, wf = [], [], [], [], [], []
    for b in range(B):
        ww = softmax_list([float(head.text_weight_fc(words[b, l])) for l in range(wlen[b])])
        x = ref_temporal(head.temporal, frames[b], flen[b])
        fw = softmax_list([float(head.video_weight_fc(x[t])) for t in range(flen[b])])
        w, f = nrm(words[b]), nrm(x)
        S = [[float(w[l] @ f[t]) if (l < wlen[b] and t < flen[b]) else 0.0 for t in range(T)] for l in range(L)]
        for l in range(wlen[b]):
            t = max(range(T), key=lambda k: (S[l][k], -k))
            rows_t.append(w[l]), rows_v.append(f[t]), wt.append(ww[l])
        for t in range(flen[b]):
            l = max(range(L), key=lambda k: (S[k][t], -k))
            rows_f.append(f[t]), rows_w.append(w[l]), wf.append(fw[t])

    def corr(a, b, weights):
        a, b = torch.stack(a), torch.stack(b)
        za = (a - a.mean(0)) / a.std(0)
        zb = (b - b.mean(0)) / b.std(0)
        return sum(weights[n] * torch.outer(za[n], zb[n]) for n in range(len(weights))) / B

    c = (corr(rows_t, rows_v, wt) + corr(rows_f, rows_w, wf)) / 2
    on = sum((float(c[i, i]) - 1) ** 2 for i in range(D))
    off = sum(float(c[i, j]) ** 2 for i in range(D) for j in range(D) if i != j)
    return a1 * on + a2 * off


@torch.no_grad()
def test_cdcr(feats):
    sent, words, wm, _, _, wlen, _ = feats
    g = torch.Generator().manual_seed(5)
    frames = torch.randn(5, T, D, generator=g)
    flen = [5, 2, 3, 1, 4]
    fm = torch.arange(T)[None] < torch.tensor(flen)[:, None]
    torch.manual_seed(0)
    head = DRLHead(D, layers=1, heads=2, max_positions=16, cdcr_alpha1=0.14, cdcr_alpha2=0.3).eval()
    randomise(head, 6)
    _, reg = head(sent, words, wm, frames, fm, regularise=True)
    assert float(reg) == pytest.approx(loop_cdcr(head, words, wlen, frames, flen, 0.14, 0.3), rel=1e-4)


# --------------------------------------------------------------------------- shared behaviour
@torch.no_grad()
@pytest.mark.parametrize("name", ["meanp", "seqtransf", "xclip", "drl"])
def test_chunked_equals_unchunked_and_spec_rebuilds(feats, name):
    sent, words, wm, frames, fm, _, _ = feats
    torch.manual_seed(1)
    args = {"meanp": {}, "seqtransf": {"dim": D, "layers": 1, "heads": 2, "max_positions": 16},
            "xclip": {"dim": D, "num_words": L, "num_frames": T, "layers": 1, "heads": 2, "max_positions": 16},
            "drl": {"dim": D, "layers": 1, "heads": 2, "max_positions": 16}}[name]
    head = build_head({"name": name, **args}).eval()
    full = head(sent, words, wm, frames, fm, chunk_size=10_000)
    for c in (1, 2, 3):
        torch.testing.assert_close(head(sent, words, wm, frames, fm, chunk_size=c), full, atol=1e-6, rtol=1e-6)
    again = build_head(head.spec)
    again.load_state_dict(head.state_dict())
    torch.testing.assert_close(again.eval()(sent, words, wm, frames, fm), full)


def test_gradients_reach_features_and_parameters(feats):
    sent, words, wm, frames, fm, _, _ = feats
    torch.manual_seed(2)
    head = XCLIPHead(D, num_words=L, num_frames=T, layers=1, heads=2, max_positions=16)
    f = frames.clone().requires_grad_(True)
    head(sent, words, wm, f, fm, chunk_size=2).sum().backward()
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0
    assert head.word_mat_weight2.grad is not None and head.global_mat_weight.grad.abs().sum() > 0
