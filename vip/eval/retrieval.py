"""Text↔video retrieval evaluation, on a shard folder and on annotation jsonl + a video folder.

* `evaluate_shards` — zero-shot retrieval on held-out shards during training (and the demo):
  each clip's subtitle is its one text query; every rank encodes its shards.
* `evaluate` / `run_eval` (`vip eval`) — annotation jsonl + a video folder, several captions
  per video (or one paragraph), on an exported vip model or, as the MeanPool zero-shot
  baseline, a local open_clip checkpoint. A video that is missing or fails to decode is
  skipped and counted, and its texts are dropped from the queries.

Both go through the one encode loop (`vip.eval.encode.encode_batches`: each rank encodes
its share, features all-gathered once) and `vip.eval.metrics` (R@1/5/10, MdR, MnR both
directions, plain and with DSL). Every rank gets the result.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import numpy as np
import torch

from shards.atomic import write_json
from vip.config import DataConfig, EvalConfig
from vip.eval.encode import (encode_batches, encode_text_tokens, encode_texts, folder_batches, frame_features,
                             runtime_of, shard_batches, shard_loader)
from vip.eval.metrics import COLUMNS, format_table, plain_and_dsl
from vip.eval.models import command_runtime, load_eval_model, require, require_model, require_path
from vip.eval.videos import read_annotations
from vip.model.archs import image_size, tokenizer_for
from vip.train.runtime import Runtime

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- shards (training)
def evaluate_shards(model, data: DataConfig, rt: Runtime, max_clips: int = 1000) -> dict:
    """Zero-shot retrieval on `data.shards` (read in eval order; at most max_clips // world per
    rank): {"clips", "t2v_R@1", …, "v2t_MnR", "dsl_t2v_R@1", …}. A collective when rt.world > 1."""
    loader = shard_loader(data, rt)
    enc = encode_batches(model, shard_batches(loader, text=True), rt, limit=max(1, max_clips // rt.world))
    if not enc.keys:
        log.warning("zero-shot evaluation: no clip could be read from %s", data.shards)
        return {"clips": 0, **{k: float("nan") for k in COLUMNS}, **{f"dsl_{k}": float("nan") for k in COLUMNS}}
    plain, with_dsl = plain_and_dsl(enc.text @ enc.video.T, np.arange(len(enc.keys)))   # [texts, videos]
    return {"clips": len(enc.keys), **plain, **{f"dsl_{k}": v for k, v in with_dsl.items()}}


# --------------------------------------------------------------------------- annotations + folder
def evaluate(model, cfg: EvalConfig, tokenize, rt: Runtime | None = None, name: str = "model",
             progress: bool = True) -> dict:
    """Encode the annotated videos (each rank its share) and all texts; the result dict (also
    what `run_eval` writes as JSON). rt: default the model's device and torch.distributed's world."""
    rt = rt or runtime_of(model)
    items = read_annotations(cfg.annotations, cfg.paragraph)
    clip_ids = [it.clip_id for it in items]
    batches = folder_batches(clip_ids, cfg.videos, rt, cfg.num_frames, image_size(model), cfg.resize,
                             cfg.batch_size, cfg.num_workers)
    head = resolve_head(model, cfg.head)
    enc = encode_batches(model, batches, rt, progress=progress, video_fn=frame_features if head else None)
    kept, failed = enc.keys, enc.failed
    texts, t2v = [], []
    for col, i in enumerate(kept):
        texts += items[i].texts
        t2v += [col] * len(items[i].texts)
    reasons = dict(Counter(failed.values()))
    dropped_texts = sum(len(items[i].texts) for i in failed)
    if failed:
        log.warning("skipped %d of %d videos (%s); %d texts dropped", len(failed), len(items), reasons, dropped_texts)
    if not kept:
        raise RuntimeError(f"no video of {len(items)} could be decoded ({reasons})")
    if head is None:
        tfeat = encode_texts(model, texts, tokenize, rt.device, cfg.text_batch_size)
        sim = tfeat @ enc.video.T                                            # [texts, videos]
    else:
        sim = head_similarity(head, encode_text_tokens(model, texts, tokenize, rt.device, cfg.text_batch_size),
                              enc.video, rt.device, cfg.head_chunk)
    plain, with_dsl = plain_and_dsl(sim, t2v)                                # DSL on top of either
    return {"model": name, "head": head.spec["name"] if head is not None else "none", "annotations": str(cfg.annotations), "paragraph": cfg.paragraph,
            "num_frames": cfg.num_frames, "videos": len(kept), "texts": len(texts),
            "skipped": len(failed), "skipped_reasons": reasons,
            "skipped_ids": sorted(clip_ids[i] for i in failed), "dropped_texts": dropped_texts,
            "metrics": plain, "dsl_metrics": with_dsl}


# --------------------------------------------------------------------------- retrieval heads
def resolve_head(model, choice: str = "auto"):
    """The head that scores (None: text·video of the pooled features). auto: the model's head if it
    has one; none: no head; a name: the model's head of that name (meanp, parameter-free, also
    without one). A ConfigError when the model lacks the head asked for."""
    from vip.model.heads import MeanPHead
    have = getattr(model, "head", None)
    if choice == "none" or (choice == "auto" and have is None):
        return None
    if choice == "auto" or (have is not None and have.spec["name"] == choice):
        return have
    if choice == "meanp":
        return MeanPHead()
    from vip.config import ConfigError
    raise ConfigError(f"eval.head={choice}: the model has {'a ' + have.spec['name'] if have else 'no'} head "
                      f"(fine-tune one with `vip finetune finetune.head={choice}`; eval.head=auto uses the model's)")


@torch.no_grad()
def head_similarity(head, text_tokens: tuple, frames: torch.Tensor, device, chunk_size: int = 256) -> torch.Tensor:
    """A head's [texts, videos] similarity of (sentence, words, word mask) × frames [N, T, D] (every
    frame real: the decoders always give T frames), scored on `device` block by block; CPU float32."""
    params = list(head.parameters())
    dtype = params[0].dtype if params else torch.float32                    # meanp has no parameters
    sentence, words, word_mask = (x.to(device, dtype if x.is_floating_point() else None) for x in text_tokens)
    frames = frames.to(device, dtype)
    mask = torch.ones(frames.shape[:2], dtype=torch.bool, device=device)
    was_training = head.training
    head.eval()
    try:
        return head(sentence, words, word_mask, frames, mask, chunk_size=chunk_size).float().cpu()
    finally:
        head.train(was_training)


def check_eval_config(cfg: EvalConfig) -> None:
    """ConfigError naming the override to set when `vip eval` lacks a required option."""
    require(cfg.annotations, "eval.annotations=FILE.jsonl", "the annotations")
    require(cfg.videos, "eval.videos=DIR", "the video folder")
    require_path(cfg.annotations, "eval.annotations")
    require_path(cfg.videos, "eval.videos", "folder")
    require_model(cfg, "eval")


def run_eval(cfg: EvalConfig, progress: bool = True, audio: DataConfig | None = None) -> dict:
    """`vip eval`: load, evaluate (every rank of a torchrun its share), print the table and
    write cfg.out (JSON) on rank 0. An Everything-at-Once model is evaluated text → video, audio
    and video+audio (vip.eval.fusion; soundtracks with audio's data.audio_* settings)."""
    check_eval_config(cfg)
    with command_runtime(cfg.device, cfg.precision) as rt:
        model, mcfg, name = load_eval_model(cfg, rt)
        head = resolve_head(model, cfg.head)
        # with a head, texts are tokenised at the length it was trained with (X-CLIP's L×L weights need it)
        length = (head.spec.get("context_length") if head is not None else None) or model.context_length
        tokenize = tokenizer_for(cfg.tokenizer or mcfg.arch, length)
        if hasattr(model, "fusion_head"):
            from vip.eval.fusion import evaluate_fusion, format_fusion_table
            with torch.no_grad():
                res = evaluate_fusion(model, cfg, tokenize, rt, audio or DataConfig(), name, progress)
            res["config"] = dataclasses.asdict(cfg)
            if rt.is_main:
                print(format_fusion_table(res))
                write_json(cfg.out, res, indent=2)
            return res
        with torch.no_grad():
            res = evaluate(model, cfg, tokenize, rt, name, progress)
        res["config"] = dataclasses.asdict(cfg)
        if rt.is_main:
            print(format_table({name: res}))
            write_json(cfg.out, res, indent=2)
    return res
