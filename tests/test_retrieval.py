import numpy as np
import pytest
import torch

from vip.eval.metrics import dsl, retrieval_metrics


def _ranks_by_loop(sim, t2v):
    """Direct loops: each text's rank of its video; each video's best rank over its texts."""
    nt, nv = sim.shape
    t_ranks = []
    for i in range(nt):
        t_ranks.append(1 + sum(sim[i, j] > sim[i, t2v[i]] for j in range(nv)))
    v_ranks = {}
    for i in range(nt):
        v = t2v[i]
        r = 1 + sum(sim[k, v] > sim[i, v] for k in range(nt))
        v_ranks[v] = min(v_ranks.get(v, 10 ** 9), r)
    return np.array(t_ranks), np.array([v_ranks[v] for v in sorted(v_ranks)])


@pytest.mark.parametrize("seed", range(4))
def test_metrics_match_loops_with_multi_caption_and_ties(seed):
    rng = np.random.default_rng(seed)
    nv = 12
    t2v = np.concatenate([np.arange(nv), rng.integers(0, nv, size=9)])   # some videos have several texts
    sim = np.round(rng.normal(size=(len(t2v), nv)), 1)                   # rounding creates ties
    m = retrieval_metrics(torch.tensor(sim), t2v)
    tr, vr = _ranks_by_loop(sim, t2v)
    for prefix, r in (("t2v", tr), ("v2t", vr)):
        assert m[f"{prefix}_R@1"] == pytest.approx(100 * np.mean(r <= 1))
        assert m[f"{prefix}_R@5"] == pytest.approx(100 * np.mean(r <= 5))
        assert m[f"{prefix}_R@10"] == pytest.approx(100 * np.mean(r <= 10))
        assert m[f"{prefix}_MdR"] == pytest.approx(np.median(r))
        assert m[f"{prefix}_MnR"] == pytest.approx(np.mean(r))


def test_hand_computed_example():
    sim = torch.tensor([[0.9, 0.1, 0.0],    # text 0 → video 0: rank 1
                        [0.5, 0.4, 0.6],    # text 1 → video 1: rank 3
                        [0.2, 0.2, 0.2]])   # text 2 → video 2: tie with all → rank 1 (ties in favour)
    m = retrieval_metrics(sim, [0, 1, 2])
    assert m["t2v_R@1"] == pytest.approx(200 / 3) and m["t2v_MdR"] == 1 and m["t2v_MnR"] == pytest.approx(5 / 3)
    # video 2's column: text 1 scores 0.6 > 0.2 → rank 2; video 1: text 1 (0.4) < text 0? 0.1, 0.2 → rank 1
    assert m["v2t_R@1"] == pytest.approx(200 / 3) and m["v2t_MnR"] == pytest.approx(4 / 3)


def test_dsl_rescales_over_texts():
    sim = torch.tensor([[0.5, 0.1], [0.4, 0.2]])
    out = dsl(sim)
    col0 = torch.softmax(torch.tensor([0.5, 0.4]) * 100, 0)
    assert torch.allclose(out[:, 0], sim[:, 0] * col0)
    # DSL can flip a text's best video: text 1 prefers video 0 plainly; video 0 belongs to text 0
    assert sim[1].argmax() == 0 and out[1].argmax() == 1
