"""`vip analyze domain-gap`: how separable two text corpora are in a CLIP text tower's space.

CLIP-ViP's measure of the language domain gap (e.g. ASR subtitles vs. captions vs. a
downstream dataset's queries): embed `n` texts of each corpus, cluster the mixed features
with K-means (k = 2, k-means++ init, seeded), and score the clusters against the corpus
label with normalised mutual information. NMI near 1: the corpora are far apart; near 0:
indistinguishable. Repeated with fresh samples; mean ± std. numpy only (no scikit-learn).

`analyze.features=words` replaces the text tower by TF-IDF vectors of the words (a departure
from the paper, named: it needs no model). A text tower's view of "far apart" depends on what
it learned; a random or small tower sees mostly surface form. Word statistics measure the
register itself (fillers, length, vocabulary), the same with every model or none.

    vip analyze domain-gap analyze.model=DIR analyze.corpora=[subs=a.jsonl,caps=b.txt] analyze.n=1000
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Sequence

import numpy as np


# --------------------------------------------------------------------------- clustering + NMI
def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(labels_true: Sequence[int], labels_pred: Sequence[int]) -> float:
    """Normalised mutual information, arithmetic-mean normalisation: I(U; V) / ((H(U) + H(V)) / 2).
    1.0 when both labelings are a single cluster (as scikit-learn's default)."""
    a = np.unique(np.asarray(labels_true), return_inverse=True)[1]
    b = np.unique(np.asarray(labels_pred), return_inverse=True)[1]
    if len(a) != len(b):
        raise ValueError("labelings differ in length")
    c = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(c, (a, b), 1)                                                # contingency [U, V]
    ha, hb = _entropy(c.sum(1)), _entropy(c.sum(0))
    if ha == 0 and hb == 0:
        return 1.0
    n = c.sum()
    nz = c > 0
    pij = c[nz] / n
    pi = (c.sum(1, keepdims=True) / n).repeat(c.shape[1], 1)[nz]
    pj = (c.sum(0, keepdims=True) / n).repeat(c.shape[0], 0)[nz]
    mi = float((pij * np.log(pij / (pi * pj))).sum())
    return float(max(0.0, mi / ((ha + hb) / 2)))


def kmeans(x: np.ndarray, k: int = 2, seed: int = 0, iters: int = 100, tol: float = 1e-6) -> np.ndarray:
    """Lloyd's K-means with k-means++ init: x [N, D] → labels [N]."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float64)
    n = len(x)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):                                                  # k-means++: ∝ squared distance
        d2 = np.min(((x[:, None] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1 / n)
        centres.append(x[rng.choice(n, p=p)])
    c = np.array(centres)                                                  # [k, D]
    labels = np.zeros(n, np.int64)
    for _ in range(iters):
        d = (x ** 2).sum(1)[:, None] - 2 * x @ c.T + (c ** 2).sum(1)[None]   # [N, k]
        labels = d.argmin(1)
        new = np.array([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
        shift = np.abs(new - c).max()
        c = new
        if shift < tol:
            break
    return labels


def domain_gap_features(fa: np.ndarray, fb: np.ndarray, n: int = 1000, repeats: int = 10, seed: int = 0) -> dict:
    """NMI of 2-means clusters vs. corpus label on n samples of each feature set [Na, D], [Nb, D]."""
    rng = np.random.default_rng(seed)
    vals = []
    for r in range(repeats):
        ia = rng.choice(len(fa), n, replace=len(fa) < n)
        ib = rng.choice(len(fb), n, replace=len(fb) < n)
        x = np.concatenate([fa[ia], fb[ib]])                               # [2n, D]
        y = np.repeat([0, 1], n)
        vals.append(nmi(y, kmeans(x, 2, seed=seed + r)))
    return {"nmi_mean": float(np.mean(vals)), "nmi_std": float(np.std(vals)), "nmi": vals,
            "n": n, "repeats": repeats}


# --------------------------------------------------------------------------- texts → features
def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """jsonl (the `text_field` of each line; a list contributes each string), plain text (one per
    line), or caption sidecars: a `.parquet` file or a folder of them (the non-empty captions)."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".parquet":
        from shards.captions import read_sidecar
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not files:
            raise FileNotFoundError(f"{path}: no .parquet caption sidecars")
        return [c for f in files for c in read_sidecar(f).values()]
    out: list[str] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            v = json.loads(line)[text_field]
            out += [v] if isinstance(v, str) else [str(t) for t in v]
        else:
            out.append(line.strip())
    return out


def text_features(model, tokenize, texts: list[str], device="cpu", batch_size: int = 256) -> np.ndarray:
    """L2-normalised text features [N, D] from a CLIPViP's (or open_clip CLIP's) encode_text."""
    from vip.eval.encode import encode_texts
    return encode_texts(model, texts, tokenize, device, batch_size).numpy()


def word_features(corpora: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """L2-normalised TF-IDF vectors [N, V] of lower-cased word unigrams, one vocabulary and one
    IDF over all the corpora given (so that their vectors share a space)."""
    import re
    tokens = {name: [re.findall(r"[a-z']+", t.lower()) for t in texts] for name, texts in corpora.items()}
    docs = [d for ds in tokens.values() for d in ds]
    vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
    df = np.zeros(len(vocab))
    for d in docs:
        df[[vocab[w] for w in set(d)]] += 1
    idf = np.log((1 + len(docs)) / (1 + df)) + 1                            # smoothed, as scikit-learn's
    out = {}
    for name, ds in tokens.items():
        x = np.zeros((len(ds), len(vocab)))                                 # [N, V]
        for i, d in enumerate(ds):
            np.add.at(x[i], [vocab[w] for w in d], 1.0)
        x *= idf
        out[name] = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return out


def domain_gap_table(model, tokenize, corpora: dict[str, str], pairs: list[tuple[str, str]] | None = None,
                     n: int = 1000, repeats: int = 10, seed: int = 0, text_field: str = "text", device="cpu",
                     batch_size: int = 256) -> tuple[str, list]:
    """(markdown table, rows) of NMI mean ± std for each corpus pair (default: all pairs).
    model=None: TF-IDF word features instead of a text tower (analyze.features=words)."""
    texts = {}
    for name, path in corpora.items():
        t = read_texts(path, text_field)
        rng = np.random.default_rng(seed)
        if len(t) > n * repeats:          # encode only what sampling could need
            t = [t[i] for i in rng.choice(len(t), n * repeats, replace=False)]
        texts[name] = t
    if model is None:
        feats = word_features(texts)
    else:
        feats = {name: text_features(model, tokenize, t, device, batch_size) for name, t in texts.items()}
    pairs = pairs or list(itertools.combinations(corpora, 2))
    rows = [{"a": a, "b": b, **domain_gap_features(feats[a], feats[b], n, repeats, seed)} for a, b in pairs]
    lines = ["| corpus A | corpus B | NMI (mean ± std) |", "|---|---|---|"]
    lines += [f"| {r['a']} | {r['b']} | {r['nmi_mean']:.3f} ± {r['nmi_std']:.3f} |" for r in rows]
    return "\n".join(lines), rows


# --------------------------------------------------------------------------- vip analyze domain-gap
def parse_corpora(cfg) -> tuple[dict[str, str], list[tuple[str, str]] | None]:
    """analyze.corpora (NAME=PATH …) and analyze.pairs (A:B …) → ({name: path}, pairs or None);
    ConfigError naming the override when they are missing or malformed."""
    from vip.config import ConfigError
    from vip.eval.models import require_path
    corpora: dict[str, str] = {}
    for item in cfg.corpora:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"analyze.corpora: {item!r} is not NAME=PATH")
        if name in corpora:
            raise ConfigError(f"analyze.corpora: {name!r} is named twice")
        require_path(path, f"analyze.corpora[{name}]")
        corpora[name] = path
    if len(corpora) < 2:
        raise ConfigError("missing corpora: set analyze.corpora=[NAME=PATH,NAME=PATH,…] (at least two)")
    pairs = []
    for item in cfg.pairs:
        a, sep, b = item.partition(":")
        if not sep or a not in corpora or b not in corpora:
            raise ConfigError(f"analyze.pairs: {item!r} is not A:B with A and B in analyze.corpora ({sorted(corpora)})")
        pairs.append((a, b))
    if cfg.n < 1 or cfg.repeats < 1:
        raise ConfigError(f"analyze.n and analyze.repeats must be ≥ 1 (got {cfg.n}, {cfg.repeats})")
    return corpora, pairs or None


def run_domain_gap(cfg) -> int:
    """`vip analyze domain-gap` on an AnalyzeConfig: print the table, write the rows to cfg.out."""
    import torch

    from shards.atomic import write_json
    from vip.eval.models import command_runtime, load_eval_model, require_model
    from vip.model.archs import tokenizer_for
    corpora, pairs = parse_corpora(cfg)
    if cfg.features == "words":
        table, rows = domain_gap_table(None, None, corpora, pairs, cfg.n, cfg.repeats, cfg.seed, cfg.text_field)
        print(table)
        if cfg.out:
            write_json(cfg.out, rows, indent=2)
        return 0
    require_model(cfg, "analyze")
    with command_runtime(cfg.device, "fp32") as rt:
        model, mcfg, _ = load_eval_model(cfg, rt)
        tokenize = tokenizer_for(cfg.tokenizer or mcfg.arch, model.context_length)
        with torch.no_grad():
            table, rows = domain_gap_table(model, tokenize, corpora, pairs, cfg.n, cfg.repeats, cfg.seed,
                                           cfg.text_field, rt.device, cfg.batch_size)
    if not rt.is_main:
        return 0
    print(table)
    if cfg.out:
        write_json(cfg.out, rows, indent=2)
    return 0
