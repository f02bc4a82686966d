"""Retrieval with an Everything-at-Once model: text → video, text → audio, text → (video+audio).

Annotation jsonl + a folder of clips with sound (the `vip eval` inputs): each rank decodes its
share of the clips (evenly spaced frames as `vip eval`, and the soundtrack as a centred log-mel
window with the `data.audio_*` settings), the fusion model embeds v, a and the fused va, the
texts are embedded as t, and every rank gets R@1/5/10, MdR, MnR of t→v, t→a and t→va (and the
reverse directions v2t, a2t, va2t). A clip without a soundtrack is kept: its audio is the
masking token only (counted as `without_audio`). The original reports t→va on its benchmarks.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from shards.audio import clip_log_mel
from shards.config import DataConfig
from vip.config import EvalConfig
from vip.eval.metrics import retrieval_metrics
from vip.eval.videos import index_folder, load_video, read_annotations
from vip.train.runtime import Runtime

log = logging.getLogger(__name__)
TARGETS = {"v": "v", "a": "a", "va": "va"}     # embedding key → metric prefix t2<key> / <key>2t


def _rename(m: dict, key: str) -> dict:
    return {k.replace("t2v_", f"t2{key}_").replace("v2t_", f"{key}2t_"): v for k, v in m.items()}


@torch.no_grad()
def evaluate_fusion(model, cfg: EvalConfig, tokenize, rt: Runtime, audio: DataConfig, name: str = "model",
                    progress: bool = False) -> dict:
    """{"model", "videos", "texts", "without_audio", "skipped", "metrics": {t2v_R@1 … t2a_… t2va_… }}.
    Clips are decoded in this process (eval.num_workers is not used here)."""
    from tqdm import tqdm

    from shards.reader import normalise
    from vip.model.archs import image_size
    items = read_annotations(cfg.annotations, cfg.paragraph)
    files = index_folder(cfg.videos)
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    size = image_size(model)
    mine, emb, failed, silent = [], {k: [] for k in TARGETS}, {}, 0
    idx = list(range(rt.rank, len(items), rt.world))
    try:
        for s in tqdm(range(0, len(idx), cfg.batch_size), desc="clips (video + audio)", unit="batch",
                      disable=not progress or not rt.is_main):
            vids, mels, masks, keys = [], [], [], []
            for i in idx[s:s + cfg.batch_size]:
                path = files.get(items[i].clip_id)
                if path is None:
                    failed[i] = "missing"
                    continue
                try:
                    frames = load_video(path, cfg.num_frames, size, cfg.resize)
                except Exception as e:  # noqa: BLE001 - VideoError and codec surprises: skipped, counted
                    failed[i] = getattr(e, "reason", "decode_error")
                    continue
                mel, mask = clip_log_mel(path.read_bytes(), audio, False, None)
                silent += int(not mask.any())
                vids.append(normalise(frames))
                mels.append(torch.from_numpy(mel))
                masks.append(torch.from_numpy(mask))
                keys.append(i)
            if not keys:
                continue
            out = model.fuse(video=torch.stack(vids).to(rt.device, dtype), audio=torch.stack(mels).to(rt.device, dtype),
                             audio_mask=torch.stack(masks).to(rt.device))
            for k in TARGETS:
                emb[k].append(out[k].float().cpu())
            mine += keys
    finally:
        model.train(was_training)
    local = (mine, {k: torch.cat(v) if v else torch.zeros(0, model.fused_dim) for k, v in emb.items()}, failed, silent)
    parts = [local]
    if rt.world > 1:
        parts = [None] * rt.world
        dist.all_gather_object(parts, local)
    keys = [k for p in parts for k in p[0]]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    feats = {k: torch.cat([p[1][k] for p in parts])[order] for k in TARGETS}
    keys = [keys[i] for i in order]
    failed = {k: v for p in parts for k, v in p[2].items()}
    if not keys:
        raise RuntimeError(f"no clip of {len(items)} could be decoded ({failed})")
    texts, t2v = [], []
    for col, i in enumerate(keys):
        texts += items[i].texts
        t2v += [col] * len(items[i].texts)
    model.eval()
    try:
        t = torch.cat([model.fuse(text=tokenize(texts[i:i + cfg.text_batch_size]).to(rt.device))["t"].float().cpu()
                       for i in range(0, len(texts), cfg.text_batch_size)])
    finally:
        model.train(was_training)
    metrics = {}
    for k in TARGETS:
        metrics.update(_rename(retrieval_metrics(t @ feats[k].T, t2v), k))
    return {"model": name, "annotations": str(cfg.annotations), "videos": len(keys), "texts": len(texts),
            "without_audio": sum(p[3] for p in parts), "skipped": len(failed),
            "skipped_reasons": {r: list(failed.values()).count(r) for r in set(failed.values())},
            "metrics": metrics}


def format_fusion_table(res: dict) -> str:
    """One markdown row per direction: R@1 R@5 R@10 MdR MnR."""
    m = res["metrics"]
    lines = ["| query → target | R@1 | R@5 | R@10 | MdR | MnR |", "|---|---|---|---|---|---|"]
    for k, label in (("t2v", "text → video"), ("t2a", "text → audio"), ("t2va", "text → video+audio")):
        lines.append(f"| {label} | {m[f'{k}_R@1']:.1f} | {m[f'{k}_R@5']:.1f} | {m[f'{k}_R@10']:.1f} | "
                     f"{m[f'{k}_MdR']:.1f} | {m[f'{k}_MnR']:.1f} |")
    return "\n".join(lines)
