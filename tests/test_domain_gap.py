"""Domain gap: NMI by hand, K-means on separable / identical feature sets, the text path."""
from __future__ import annotations

import math

import numpy as np
import pytest

from vip.analyze import domain_gap_features, kmeans, nmi, read_texts


def test_nmi_hand_example():
    # U = [0,0,1,1], V = [0,0,0,1]: contingency [[2,0],[1,1]]
    y, p = [0, 0, 1, 1], [0, 0, 0, 1]
    hu = math.log(2)
    hv = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    mi = 0.5 * math.log(0.5 / (0.5 * 0.75)) + 0.25 * math.log(0.25 / (0.5 * 0.75)) + 0.25 * math.log(0.25 / (0.5 * 0.25))
    assert nmi(y, p) == pytest.approx(mi / ((hu + hv) / 2))
    assert nmi(y, [5, 5, 7, 7]) == pytest.approx(1.0) and nmi(y, [1, 1, 0, 0]) == pytest.approx(1.0)
    assert nmi(y, [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    assert nmi([0, 0], [3, 3]) == 1.0


def test_kmeans_recovers_blobs():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (50, 5)), rng.normal(10, 1, (40, 5))])
    lab = kmeans(x, 2, seed=0)
    assert len(set(lab[:50])) == 1 and len(set(lab[50:])) == 1 and lab[0] != lab[-1]
    assert (kmeans(x, 2, seed=0) == lab).all()                # seeded: deterministic


def test_domain_gap_separable_and_same():
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, (300, 16))
    b = rng.normal(0, 1, (300, 16)) + 8.0
    far = domain_gap_features(a, b, n=200, repeats=3, seed=0)
    assert far["nmi_mean"] > 0.99 and len(far["nmi"]) == 3
    same = rng.normal(0, 1, (600, 16))
    near = domain_gap_features(same[:300], same[300:], n=200, repeats=3, seed=0)
    assert near["nmi_mean"] < 0.05


def test_read_texts_and_table(tmp_path):
    import torch
    from vip.analyze import domain_gap_table
    from vip.config import ModelConfig
    from vip.eval.retrieval_eval import tokenizer_for
    from vip.model import build_model
    (tmp_path / "a.jsonl").write_text('{"text": "a red square"}\n{"text": ["one", "two"]}\n')
    (tmp_path / "b.txt").write_text("hello\n\nworld\n")
    assert read_texts(tmp_path / "a.jsonl") == ["a red square", "one", "two"]
    assert read_texts(tmp_path / "b.txt") == ["hello", "world"]
    torch.manual_seed(0)
    m = build_model(ModelConfig(arch="vip-tiny", num_proxies=2, max_frames=4)).eval()
    with torch.no_grad():
        table, rows = domain_gap_table(m, tokenizer_for("vip-tiny", m.context_length),
                                       {"A": str(tmp_path / "a.jsonl"), "B": str(tmp_path / "b.txt")}, n=4, repeats=2)
    assert "| A | B |" in table and 0 <= rows[0]["nmi_mean"] <= 1


def test_cli_domain_gap(tmp_path, capsys):
    import torch
    from vip.config import ModelConfig
    from vip.cli import main
    from vip.model import build_model
    from vip.model.convert import export
    cfg = ModelConfig(arch="vip-tiny", num_proxies=2, max_frames=4)
    torch.manual_seed(0)
    exp = export(build_model(cfg), cfg, tmp_path / "m")
    (tmp_path / "a.txt").write_text("\n".join(f"a red square number {i}" for i in range(6)))
    (tmp_path / "b.txt").write_text("\n".join(f"um so yeah we talked {i}" for i in range(6)))
    rc = main(["analyze", "domain-gap", "--model", str(exp), "--corpus", f"cap={tmp_path / 'a.txt'}",
               "--corpus", f"asr={tmp_path / 'b.txt'}", "--n", "5", "--repeats", "2", "--out", str(tmp_path / "r.json")])
    assert rc == 0 and "| cap | asr |" in capsys.readouterr().out
