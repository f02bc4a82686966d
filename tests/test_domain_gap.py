"""Domain gap: NMI by hand, K-means on separable / identical feature sets, the text path."""
from __future__ import annotations

import math

import numpy as np
import pytest

from vip.eval.domain_gap import domain_gap_features, kmeans, nmi, read_texts


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


def test_read_texts_and_table(tmp_path, tiny_model_cfg):
    import torch
    from vip.eval.domain_gap import domain_gap_table
    from vip.model import build_model
    from vip.model.archs import tokenizer_for
    (tmp_path / "a.jsonl").write_text('{"text": "a red square"}\n{"text": ["one", "two"]}\n')
    (tmp_path / "b.txt").write_text("hello\n\nworld\n")
    assert read_texts(tmp_path / "a.jsonl") == ["a red square", "one", "two"]
    assert read_texts(tmp_path / "b.txt") == ["hello", "world"]
    (tmp_path / "c.jsonl").write_text('{"q": "x"}\n')
    assert read_texts(tmp_path / "c.jsonl", text_field="q") == ["x"]
    torch.manual_seed(0)
    m = build_model(tiny_model_cfg).eval()
    with torch.no_grad():
        table, rows = domain_gap_table(m, tokenizer_for("vip-tiny", m.context_length),
                                       {"A": str(tmp_path / "a.jsonl"), "B": str(tmp_path / "b.txt")}, n=4, repeats=2)
    assert "| A | B |" in table and 0 <= rows[0]["nmi_mean"] <= 1


def test_cli_domain_gap(tmp_path, tiny_export, capsys):
    import json
    from vip.cli import main
    (tmp_path / "a.txt").write_text("\n".join(f"a red square number {i}" for i in range(6)))
    (tmp_path / "b.txt").write_text("\n".join(f"um so yeah we talked {i}" for i in range(6)))
    (tmp_path / "c.txt").write_text("\n".join(f"a blue circle number {i}" for i in range(6)))
    common = [f"analyze.model={tiny_export}", "analyze.device=cpu", "analyze.n=5", "analyze.repeats=2"]
    corpora = f"analyze.corpora=[cap={tmp_path / 'a.txt'},asr={tmp_path / 'b.txt'},cap2={tmp_path / 'c.txt'}]"
    rc = main(["analyze", "domain-gap", *common, corpora, "analyze.pairs=[cap:asr,asr:cap2]",
               f"analyze.out={tmp_path / 'r.json'}"])
    out = capsys.readouterr().out
    assert rc == 0 and "| cap | asr |" in out and "| asr | cap2 |" in out and "| cap | cap2 |" not in out
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [(r["a"], r["b"]) for r in rows] == [("cap", "asr"), ("asr", "cap2")]


def test_cli_domain_gap_errors(tmp_path, tiny_export, capsys):
    from vip.cli import main
    (tmp_path / "a.txt").write_text("x\n")
    model = f"analyze.model={tiny_export}"
    cases = [([f"analyze.corpora=[a={tmp_path / 'a.txt'}]", model], "analyze.corpora=[NAME=PATH"),
             ([f"analyze.corpora=[a={tmp_path / 'a.txt'},b={tmp_path / 'a.txt'}]"], "analyze.model="),
             ([f"analyze.corpora=[a={tmp_path / 'a.txt'},b]", model], "is not NAME=PATH"),
             ([f"analyze.corpora=[a={tmp_path / 'a.txt'},b={tmp_path / 'a.txt'}]", model, "analyze.pairs=[a:c]"],
              "analyze.pairs"),
             ([f"analyze.corpora=[a={tmp_path / 'a.txt'},b={tmp_path / 'nope.txt'}]", model], "no such file")]
    for args, needle in cases:
        assert main(["analyze", "domain-gap", *args]) == 2
        assert needle in capsys.readouterr().err, needle
    with pytest.raises(SystemExit) as e:
        main(["analyze", "domain-gap", "--corpus", "a=b", model])
    assert e.value.code == 2 and "analyze.corpora" in capsys.readouterr().err


def test_read_texts_from_caption_sidecars(tmp_path):
    """Captions are read straight from the caption job's sidecars (a file or a folder): non-empty
    captions only, so `vip analyze domain-gap` compares what training will see."""
    from shards.captions import write_sidecar
    write_sidecar(tmp_path / "caps" / "shard-000000.parquet",
                  [{"key": "a", "caption": "a red circle"}, {"key": "b", "caption": None, "error": "corrupt_jpeg: x"},
                   {"key": "c", "caption": "  "}], model="hf:x")
    write_sidecar(tmp_path / "caps" / "shard-000001.parquet", [{"key": "d", "caption": "a blue square"}], model="hf:x")
    assert read_texts(tmp_path / "caps") == ["a red circle", "a blue square"]
    assert read_texts(tmp_path / "caps" / "shard-000001.parquet") == ["a blue square"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .parquet"):
        read_texts(tmp_path / "empty")


def test_word_features_equal_a_direct_tfidf():
    from vip.eval.domain_gap import word_features
    corpora = {"a": ["a red circle", "A red, red square"], "b": ["um so it's a circle"]}
    f = word_features(corpora)
    docs = [["a", "red", "circle"], ["a", "red", "red", "square"], ["um", "so", "it's", "a", "circle"]]
    vocab = sorted({w for d in docs for w in d})
    for name, rows in (("a", docs[:2]), ("b", docs[2:])):
        for got, d in zip(f[name], rows):
            want = np.array([d.count(w) * (math.log(4 / (1 + sum(w in e for e in docs))) + 1) for w in vocab])
            np.testing.assert_allclose(got, want / np.linalg.norm(want), rtol=1e-12)


def test_cli_domain_gap_words_needs_no_model(tmp_path, capsys):
    import json
    from vip.cli import main
    rng = np.random.default_rng(0)
    colours, shapes = ["red", "blue", "green"], ["circle", "square", "star"]
    desc = [f"a {rng.choice(colours)} {rng.choice(shapes)} moves left" for _ in range(40)]
    desc2 = [f"a {rng.choice(colours)} {rng.choice(shapes)} moves left" for _ in range(40)]
    speech = [f"um so like we have this {rng.choice(colours)} thing you know right" for _ in range(40)]
    for name, lines in (("d", desc), ("d2", desc2), ("s", speech)):
        (tmp_path / f"{name}.txt").write_text("\n".join(lines))
    corpora = ",".join(f"{n}={tmp_path / (n + '.txt')}" for n in ("d", "d2", "s"))
    rc = main(["analyze", "domain-gap", "analyze.features=words", f"analyze.corpora=[{corpora}]",
               "analyze.pairs=[s:d,d2:d]", "analyze.n=30", "analyze.repeats=3", f"analyze.out={tmp_path / 'r.json'}"])
    assert rc == 0 and "| s | d |" in capsys.readouterr().out
    rows = {(r["a"], r["b"]): r["nmi_mean"] for r in json.loads((tmp_path / "r.json").read_text())}
    assert rows[("s", "d")] > 0.9 and rows[("d2", "d")] < 0.2      # another register vs the same one
