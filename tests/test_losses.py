"""OCL losses against direct loop-based computations (python floats), incl. missing captions."""
import math

import pytest
import torch
import torch.nn.functional as F

from vip.losses import VARIANTS, ocl_loss


def _feats(B, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1).float()
            for k in ("video", "frame", "subtitle", "caption")}


def _dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b))


def _nll(scores, target):
    """-log softmax(scores)[target] for a python list of scores."""
    m = max(scores)
    return -(scores[target] - m - math.log(sum(math.exp(s - m) for s in scores)))


def _ce(queries, keys, s):
    """mean_i -log softmax_j(s·q_i·k_j)[i] (empty → 0)."""
    if not queries:
        return 0.0
    return sum(_nll([s * _dot(q, k) for k in keys], i) for i, q in enumerate(queries)) / len(queries)


def _sym(xs, ys, s):
    return _ce(xs, ys, s) + _ce(ys, xs, s)


def _ref_vsc(V, S, C, has, s):
    B = len(V)
    idx = [i for i in range(B) if has[i]]
    Cv, Vc = [C[i] for i in idx], [V[i] for i in idx]
    loss = _ce(S, V, s) + _ce(Cv, Vc, s)                  # text → video
    sub = []
    for i in range(B):  # subtitle positive: all subtitles + captions of other captioned clips
        cands = [s * _dot(V[i], S[j]) for j in range(B)] + [s * _dot(V[i], C[j]) for j in idx if j != i]
        sub.append(_nll(cands, i))
    loss += sum(sub) / B
    cap = []
    for i in idx:       # caption positive: all captions + subtitles of the other clips
        caps = [s * _dot(V[i], C[j]) for j in idx]
        cands = caps + [s * _dot(V[i], S[j]) for j in range(B) if j != i]
        cap.append(_nll(cands, idx.index(i)))
    if cap:
        loss += sum(cap) / len(cap)
    return loss


def _reference(variant, f, has, logit_scale):
    s = math.exp(logit_scale)
    L = {k: [list(map(float, r)) for r in v] for k, v in f.items()}
    idx = [i for i in range(len(has)) if has[i]]
    sub = lambda k: [L[k][i] for i in idx]  # noqa: E731
    terms = {"vs": lambda: _sym(L["video"], L["subtitle"], s),
             "vc": lambda: _sym(sub("video"), sub("caption"), s),
             "fc": lambda: _sym(sub("frame"), sub("caption"), s),
             "vsc": lambda: _ref_vsc(L["video"], L["subtitle"], L["caption"], has, s)}
    out = {t: terms[t]() for t in VARIANTS[variant]}
    return sum(out.values()), out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("has", [[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]])
def test_variants_match_loop_reference(variant, has):
    f = _feats(5, seed=len(variant) + sum(has))
    has_t = torch.tensor(has, dtype=torch.bool)
    logit_scale = torch.tensor(2.3)
    total, terms = ocl_loss(variant, **f, has_caption=has_t, logit_scale=logit_scale)
    ref_total, ref_terms = _reference(variant, f, has, 2.3)
    assert set(terms) == set(ref_terms)
    for k in terms:
        assert abs(terms[k].item() - ref_terms[k]) < 1e-4 * max(1.0, abs(ref_terms[k])), (k, terms[k], ref_terms[k])
    assert abs(total.item() - ref_total) < 1e-4 * max(1.0, abs(ref_total))


def test_missing_caption_features_never_matter():
    """A caption-less clip's caption vector (a placeholder's features) cannot change the loss."""
    f = _feats(6, seed=1)
    has = torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.bool)
    base, _ = ocl_loss("d", **f, has_caption=has, logit_scale=torch.tensor(4.6))
    f2 = dict(f)
    f2["caption"] = f["caption"].clone()
    f2["caption"][~has] = f["subtitle"][~has]            # e.g. a placeholder equal to the subtitle
    for v in ("a", "b", "c", "d"):
        a, _ = ocl_loss(v, **f, has_caption=has, logit_scale=torch.tensor(4.6))
        b, _ = ocl_loss(v, **f2, has_caption=has, logit_scale=torch.tensor(4.6))
        assert torch.equal(a, b)
    # and gradients do not reach those rows
    cap = f["caption"].clone().requires_grad_(True)
    loss, _ = ocl_loss("d", **{**f, "caption": cap}, has_caption=has, logit_scale=torch.tensor(4.6))
    loss.backward()
    assert cap.grad[~has].abs().max() == 0 and cap.grad[has].abs().max() > 0
    assert torch.isfinite(base)


def test_defaults_and_errors():
    f = _feats(4, seed=2)
    all_true, _ = ocl_loss("d", **f, has_caption=torch.ones(4, dtype=torch.bool), logit_scale=torch.tensor(3.0))
    none, _ = ocl_loss("d", **f, logit_scale=torch.tensor(3.0))
    assert torch.equal(all_true, none)
    one, _ = ocl_loss("d", **f, logit_scale=torch.tensor([3.0]))        # DeepSpeed holds it as [1]
    assert one.shape == () and torch.allclose(one, none)
    vs, terms = ocl_loss("vs", video=f["video"], subtitle=f["subtitle"], logit_scale=torch.tensor(3.0))
    assert set(terms) == {"vs"} and vs.item() > 0
    with pytest.raises(ValueError):
        ocl_loss("e", **f, logit_scale=torch.tensor(3.0))
    with pytest.raises(ValueError):
        ocl_loss("a", video=f["video"], subtitle=f["subtitle"], caption=f["caption"], logit_scale=torch.tensor(3.0))


def test_bf16_features_and_gradient_to_logit_scale():
    f = {k: v.bfloat16() for k, v in _feats(4, seed=3).items()}
    ls = torch.tensor(4.6, requires_grad=True)
    loss, _ = ocl_loss("d", **f, has_caption=torch.tensor([1, 0, 1, 1], dtype=torch.bool), logit_scale=ls)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(ls.grad) and ls.grad != 0
