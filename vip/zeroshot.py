"""Zero-shot text↔video retrieval on held-out shards, run by every rank on its split."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
import torch.distributed as dist

from shards.reader import StreamLoader
from vip.config import DataConfig
from vip.retrieval import dsl, retrieval_metrics

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_split(model, data: DataConfig, rank: int, world: int, device, dtype, max_clips: int):
    """(keys, video features [N, D], subtitle features [N, D]) of this rank's share of the eval shards."""
    loader = StreamLoader(dataclasses.replace(data, train=False), rank=rank, world=world, device=device, dtype=dtype)
    keys, vids, txts = [], [], []
    limit = max(1, max_clips // world)
    was_training = model.training
    model.eval()
    for batch in loader:
        v = model.encode_video(batch["video"])
        t = model.encode_text(batch["subtitle"])
        keys += batch["key"]
        vids.append(v.float().cpu())
        txts.append(t.float().cpu())
        if len(keys) >= limit:
            break
    model.train(was_training)
    if not keys:
        return [], torch.zeros(0, 1), torch.zeros(0, 1)
    return keys[:limit], torch.cat(vids)[:limit], torch.cat(txts)[:limit]


def zero_shot_retrieval(model, data: DataConfig, rank: int, world: int, device, dtype=torch.float32,
                        max_clips: int = 1000) -> dict:
    """R@1/5/10, MdR, MnR (text→video with subtitles as queries, and video→text), plain and with DSL."""
    keys, v, t = encode_split(model, data, rank, world, device, dtype, max_clips)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (keys, v, t))
        keys = [k for p in parts for k in p[0]]
        v = torch.cat([p[1] for p in parts if len(p[0])])
        t = torch.cat([p[2] for p in parts if len(p[0])])
    sim = t @ v.T                                            # [texts, videos]
    gt = np.arange(len(keys))
    out = {"clips": len(keys), **retrieval_metrics(sim, gt)}
    out.update({f"dsl_{k}": val for k, val in retrieval_metrics(dsl(sim), gt).items()})
    return out


def format_table(rows: dict[str, dict]) -> str:
    """Markdown table: one row per named result, R@1/5/10 and MdR both directions."""
    cols = ["t2v_R@1", "t2v_R@5", "t2v_R@10", "t2v_MdR", "v2t_R@1", "v2t_R@5", "v2t_R@10", "v2t_MdR"]
    lines = ["| model | clips | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, m in rows.items():
        lines.append(f"| {name} | {m.get('clips', '')} | " + " | ".join(f"{m[c]:.1f}" for c in cols) + " |")
    return "\n".join(lines)
