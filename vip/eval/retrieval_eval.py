"""`vip eval`: text→video and video→text retrieval on annotation jsonl + a video folder.

Works on an exported vip model (`vip.load`) or, as the MeanPool zero-shot baseline, on a
local open_clip checkpoint (``ModelConfig(video_encoder="meanpool")``). Metrics come from
`vip.retrieval` (R@1/5/10, MdR, MnR both directions, several captions per video), plain and
with DSL. A video that is missing or fails to decode is skipped and counted, and its texts
are dropped from the queries. Under torch.distributed each rank encodes its share of the
videos and the features are all-gathered.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from vip.config import EvalConfig, ModelConfig
from vip.eval.videos import VideoFolder, collate, read_annotations
from vip.retrieval import dsl, retrieval_metrics

log = logging.getLogger(__name__)
METRICS = ["R@1", "R@5", "R@10", "MdR", "MnR"]


# --------------------------------------------------------------------------- model + tokenizer
def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def image_size(model) -> int:
    """Input side length of the model's vision tower (grid × patch)."""
    v = model.visual
    grid = v.grid_size[0] if isinstance(v.grid_size, (tuple, list)) else v.grid_size
    patch = v.patch_size[0] if isinstance(v.patch_size, (tuple, list)) else v.patch_size
    return int(grid) * int(patch)


def tokenizer_for(arch: str, context_length: int):
    """open_clip tokenizer of `arch` (tiny test archs use the default CLIP BPE)."""
    import open_clip
    from vip.model.archs import TINY_ARCHS
    name = "ViT-B-32" if arch in TINY_ARCHS else arch
    tok = open_clip.get_tokenizer(name, context_length=context_length)
    return lambda texts: tok(list(texts), context_length=context_length)


def load_eval_model(cfg: EvalConfig, device: torch.device):
    """(model in eval mode, ModelConfig, name) from cfg.model (export) or cfg.open_clip (MeanPool)."""
    from vip.model import build_model
    from vip.model.convert import load, read_model_config
    if cfg.model:
        mcfg = read_model_config(cfg.model)
        return load(cfg.model, device=device), mcfg, Path(cfg.model).name
    if cfg.open_clip:
        mcfg = ModelConfig(arch=cfg.arch, pretrained=cfg.open_clip, video_encoder="meanpool",
                           max_frames=cfg.num_frames, quick_gelu=cfg.quick_gelu)
        return build_model(mcfg).to(device).eval(), mcfg, f"meanpool:{Path(cfg.open_clip).name}"
    raise ValueError("eval needs eval.model (exported folder) or eval.open_clip (checkpoint file)")


# --------------------------------------------------------------------------- features
def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def encode_videos(model, clip_ids: list[str], cfg: EvalConfig, device, progress: bool = True):
    """(kept indices into clip_ids, features [n, D] float32 cpu, failures {index: reason})."""
    from tqdm import tqdm
    rank, world = _rank_world()
    mine = list(range(rank, len(clip_ids), world))
    ds = VideoFolder([clip_ids[i] for i in mine], cfg.videos, cfg.num_frames, image_size(model), cfg.resize)
    loader = DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=collate)
    dtype = next(model.parameters()).dtype
    idx, feats, failed = [], [], {}
    for batch in tqdm(loader, desc="videos", unit="batch", disable=not progress or rank != 0):
        failed.update({mine[i]: r for i, r in batch["failed"]})
        if batch["video"] is None:
            continue
        f = model.encode_video(batch["video"].to(device, dtype))        # [b, D]
        idx += [mine[i] for i in batch["index"]]
        feats.append(f.float().cpu())
    feats_t = torch.cat(feats) if feats else torch.zeros(0, getattr(model, "embed_dim", 1))
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (idx, feats_t, failed))
        idx = [i for p in parts for i in p[0]]
        feats_t = torch.cat([p[1] for p in parts if len(p[0])]) if idx else feats_t
        failed = {k: v for p in parts for k, v in p[2].items()}
    order = np.argsort(idx, kind="stable")
    return [idx[i] for i in order], feats_t[torch.as_tensor(order, dtype=torch.long)], failed


@torch.no_grad()
def encode_texts(model, texts: list[str], tokenize, device, batch_size: int = 256) -> torch.Tensor:
    """[len(texts), D] float32 cpu."""
    out = [model.encode_text(tokenize(texts[i:i + batch_size]).to(device)).float().cpu()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 1)


# --------------------------------------------------------------------------- evaluation
def evaluate(model, cfg: EvalConfig, tokenize, device=None, name: str = "model", progress: bool = True) -> dict:
    """Encode the annotated videos and texts, return the result dict (also what is written as JSON)."""
    device = device or torch.device("cpu")
    items = read_annotations(cfg.annotations, cfg.paragraph)
    clip_ids = [it.clip_id for it in items]
    kept, vfeat, failed = encode_videos(model, clip_ids, cfg, device, progress)
    texts, t2v = [], []
    for col, i in enumerate(kept):
        texts += items[i].texts
        t2v += [col] * len(items[i].texts)
    dropped_texts = sum(len(items[i].texts) for i in failed)
    if failed:
        log.warning("skipped %d of %d videos (%s); %d texts dropped", len(failed), len(items),
                    dict(Counter(failed.values())), dropped_texts)
    if not kept:
        raise RuntimeError(f"no video of {len(items)} could be decoded ({dict(Counter(failed.values()))})")
    tfeat = encode_texts(model, texts, tokenize, device, cfg.text_batch_size)
    sim = tfeat @ vfeat.T                                                # [texts, videos]
    plain = retrieval_metrics(sim, t2v)
    with_dsl = retrieval_metrics(dsl(sim), t2v)
    return {"model": name, "annotations": str(cfg.annotations), "paragraph": cfg.paragraph,
            "num_frames": cfg.num_frames, "videos": len(kept), "texts": len(texts),
            "skipped": len(failed), "skipped_reasons": dict(Counter(failed.values())),
            "skipped_ids": sorted(clip_ids[i] for i in failed), "dropped_texts": dropped_texts,
            "metrics": plain, "dsl_metrics": with_dsl}


def format_table(results: list[dict]) -> str:
    """Markdown: one row per result, plain and +DSL; R@K in %, MdR/MnR 1-based ranks."""
    cols = [f"{d}_{m}" for d in ("t2v", "v2t") for m in METRICS]
    lines = ["| model | videos | texts | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for r in results:
        for label, m in ((r["model"], r["metrics"]), (r["model"] + " +DSL", r["dsl_metrics"])):
            lines.append(f"| {label} | {r['videos']} | {r['texts']} | " + " | ".join(f"{m[c]:.1f}" for c in cols) + " |")
    return "\n".join(lines)


def init_distributed_from_env() -> None:
    """Under torchrun (WORLD_SIZE > 1): join the process group (nccl on GPU, else gloo)."""
    import os
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def run_eval(cfg: EvalConfig, progress: bool = True) -> dict:
    """`vip eval`: load, evaluate, print the table (rank 0) and write cfg.out (JSON)."""
    init_distributed_from_env()
    device = pick_device(cfg.device)
    model, mcfg, name = load_eval_model(cfg, device)
    tokenize = tokenizer_for(cfg.tokenizer or mcfg.arch, model.context_length)
    res = evaluate(model, cfg, tokenize, device, name, progress)
    res["config"] = dataclasses.asdict(cfg)
    if _rank_world()[0] == 0:
        print(format_table([res]))
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
    return res
