"""Retrieval metrics: R@K, MdR, MnR for text→video and video→text.

Conventions: ranks are 1-based; a tie counts in the query's favour (rank = 1 +
number of candidates scored strictly higher). Several captions per video are
allowed: every caption is a text→video query; for video→text, a video's rank
is the best rank among its captions. DSL (dual softmax at inference) rescales
sim[t, v] by softmax over texts of 100·sim[:, v]. `format_table` is the one markdown
writer of retrieval results (`vip eval`, the demo).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

METRICS = ("R@1", "R@5", "R@10", "MdR", "MnR")
COLUMNS = tuple(f"{d}_{m}" for d in ("t2v", "v2t") for m in METRICS)   # the keys of retrieval_metrics


def dsl(sim: torch.Tensor, temperature: float = 100.0) -> torch.Tensor:
    """Dual-softmax re-scoring: sim · softmax(temperature·sim) over the text axis (dim 0)."""
    return sim * torch.softmax(sim * temperature, dim=0)


def _summary(ranks: np.ndarray, prefix: str) -> dict:
    return {f"{prefix}_R@1": float((ranks <= 1).mean() * 100), f"{prefix}_R@5": float((ranks <= 5).mean() * 100),
            f"{prefix}_R@10": float((ranks <= 10).mean() * 100), f"{prefix}_MdR": float(np.median(ranks)),
            f"{prefix}_MnR": float(ranks.mean())}


def retrieval_metrics(sim: torch.Tensor, text_to_video: np.ndarray | list[int]) -> dict:
    """sim [num_texts, num_videos]; text_to_video[i] = the video of text i."""
    sim = sim.float().cpu()
    t2v = torch.as_tensor(np.asarray(text_to_video), dtype=torch.long)
    nt, nv = sim.shape
    if len(t2v) != nt:
        raise ValueError(f"{len(t2v)} labels for {nt} texts")
    gt = sim[torch.arange(nt), t2v]                                   # [num_texts]
    t_ranks = 1 + (sim > gt[:, None]).sum(1)                          # text → video
    # video → text: each text is ranked among all texts for its video's column
    v_rank_of_text = 1 + (sim.T[t2v] > gt[:, None]).sum(1)             # [num_texts]
    v_ranks = torch.full((nv,), np.iinfo(np.int64).max, dtype=torch.long)
    v_ranks.scatter_reduce_(0, t2v, v_rank_of_text, reduce="amin")
    has_text = torch.zeros(nv, dtype=torch.bool)
    has_text[t2v] = True
    out = _summary(t_ranks.numpy(), "t2v")
    out.update(_summary(v_ranks[has_text].numpy(), "v2t"))
    return out


def plain_and_dsl(sim: torch.Tensor, text_to_video: np.ndarray | list[int]) -> tuple[dict, dict]:
    """(retrieval_metrics of sim, retrieval_metrics of dsl(sim))."""
    return retrieval_metrics(sim, text_to_video), retrieval_metrics(dsl(sim), text_to_video)


def _flat(result: Mapping) -> dict:
    """Either result shape → {videos, texts, t2v_R@1 …, dsl_t2v_R@1 …}: a folder evaluation
    (`metrics`, `dsl_metrics`, `videos`, `texts`) or a shard evaluation (flat, `clips`)."""
    if "metrics" in result:
        out = {"videos": result.get("videos", ""), "texts": result.get("texts", ""), **result["metrics"]}
        out.update({f"dsl_{k}": v for k, v in result.get("dsl_metrics", {}).items()})
        return out
    return {"videos": result.get("clips", ""), "texts": result.get("clips", ""), **result}


def format_table(results: Mapping[str, Mapping]) -> str:
    """Markdown, one row per named result and one more (`name +DSL`) where it has DSL numbers;
    R@K in %, MdR/MnR 1-based ranks, both directions."""
    lines = ["| model | videos | texts | " + " | ".join(COLUMNS) + " |", "|---|---|---|" + "---|" * len(COLUMNS)]
    for name, result in results.items():
        r = _flat(result)
        for label, prefix in ((name, ""), (f"{name} +DSL", "dsl_")):
            if f"{prefix}{COLUMNS[0]}" in r:
                cells = " | ".join(f"{r[prefix + c]:.1f}" for c in COLUMNS)
                lines.append(f"| {label} | {r['videos']} | {r['texts']} | {cells} |")
    return "\n".join(lines)
