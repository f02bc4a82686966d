"""The one encode loop of evaluation and embedding: batches → features of every rank, gathered once.

`encode_batches` reads batches ``{"key": [b], "video": [b, T, 3, H, W] | None, "text": [b, L]
token ids (optional), "failed": [(key, reason)] (optional)}``, encodes the video (and the text
where the batch has tokens) with the model in eval mode, and all-gathers keys, features and
failures across ranks once (`all_gather_object`), sorted by key. Two batch sources feed it:

* `folder_batches` — this rank's share (``clip_ids[rank::world]``) of a video folder, decoded by
  `vip.eval.videos`; keys are indices into the clip list (`vip eval`, `vip embed`, fine-tuning
  validation);
* `shard_batches` — this rank's shards read in eval order (evenly spaced frames, one pass) by
  `shards.reader.StreamLoader`; keys are sample keys and the texts are the subtitles (zero-shot
  evaluation during training, `vip embed eval.shards=…`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from vip.train.runtime import DTYPES, Runtime, world_info


@dataclass
class Encoded:
    """Features of every rank's batches, sorted by key (row i of video/text belongs to keys[i])."""

    keys: list
    video: torch.Tensor                    # [N, D] float32, CPU
    text: Optional[torch.Tensor]           # [N, D] float32, CPU; None when the batches had no tokens
    failed: dict                           # key → reason, for videos that could not be read


def runtime_of(model) -> Runtime:
    """A Runtime for a model that is already placed: rank and world from torch.distributed
    (`world_info`), device and precision from the model's parameters."""
    p = next(model.parameters())
    precision = {v: k for k, v in DTYPES.items()}.get(p.dtype, "fp32")
    rank, world = world_info()
    return Runtime(rank=rank, world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")), device=p.device,
                   precision=precision)


def _cat(parts: list, dim: int) -> torch.Tensor:
    parts = [p for p in parts if p is not None and len(p)]
    return torch.cat(parts) if parts else torch.zeros(0, dim)


def frame_features(model, video: torch.Tensor) -> torch.Tensor:
    """`encode_batches`' video_fn for retrieval heads: per-frame features [b, T, D] (unnormalised)."""
    return model.encode_video_frames(video)[0]


@torch.no_grad()
def encode_batches(model, batches: Iterable[dict], rt: Runtime, limit: Optional[int] = None,
                   progress: bool = False, desc: str = "videos", video_fn=None) -> Encoded:
    """Encode this rank's batches (at most `limit` clips), then gather every rank's features.
    video_fn(model, video) → features (default: model.encode_video, [b, D]; `frame_features`
    gives [b, T, D] for a retrieval head).

    Pixels go to `rt.device` in the model's own dtype; features come back as float32 on the
    CPU. The model is put in eval mode and restored to its mode afterwards. Every rank must
    call this (it is a collective when rt.world > 1) and every rank gets the whole result."""
    from tqdm import tqdm
    dtype = next(model.parameters()).dtype
    dim = int(getattr(model, "embed_dim", 0) or 0)
    keys, vids, txts, failed = [], [], [], {}
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress or not rt.is_main):
            failed.update(dict(batch.get("failed") or ()))
            if batch.get("video") is None or not len(batch["key"]):
                continue
            x = batch["video"].to(rt.device, dtype)
            vids.append((video_fn(model, x) if video_fn else model.encode_video(x)).float().cpu())
            if batch.get("text") is not None:
                txts.append(model.encode_text(batch["text"].to(rt.device)).float().cpu())
            keys += list(batch["key"])
            if limit is not None and len(keys) >= limit:
                break
    finally:
        model.train(was_training)
        if hasattr(batches, "close"):        # a generator: stop its DataLoader workers now, not at GC
            batches.close()
    if txts and len(txts) != len(vids):
        raise ValueError("some batches have text tokens and some do not")
    if limit is not None:
        keys = keys[:limit]
    video = _cat(vids, dim)[:len(keys)]
    text = _cat(txts, dim)[:len(keys)] if txts else None
    if rt.world > 1:
        parts = [None] * rt.world
        dist.all_gather_object(parts, (keys, video, text, failed))
        keys = [k for p in parts for k in p[0]]
        video = _cat([p[1] for p in parts], dim)
        has_text = any(p[2] is not None for p in parts)
        text = _cat([p[2] for p in parts], dim) if has_text else None
        failed = {k: v for p in parts for k, v in p[3].items()}
        if text is not None and len(text) != len(keys):
            raise ValueError("ranks disagree on whether batches have text tokens")
    order = sorted(range(len(keys)), key=keys.__getitem__)
    idx = torch.as_tensor(order, dtype=torch.long)
    return Encoded(keys=[keys[i] for i in order], video=video[idx],
                   text=text[idx] if text is not None else None, failed=failed)


# --------------------------------------------------------------------------- batch sources
def folder_batches(clip_ids: list[str], folder, rt: Runtime, num_frames: int, size: int, resize: str = "squash",
                   batch_size: int = 16, num_workers: int = 0) -> Iterator[dict]:
    """This rank's share of `clip_ids` (every rt.world-th from rt.rank) decoded from `folder`:
    batches keyed by index into clip_ids; missing or undecodable videos come as `failed`."""
    from torch.utils.data import DataLoader

    from vip.eval.videos import VideoFolder, collate
    mine = list(range(rt.rank, len(clip_ids), rt.world))
    ds = VideoFolder([clip_ids[i] for i in mine], folder, num_frames, size, resize)
    for b in DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate):
        yield {"key": [mine[i] for i in b["index"]], "video": b["video"],
               "failed": [(mine[i], reason) for i, reason in b["failed"]]}


def shard_loader(data, rt: Runtime):
    """This rank's StreamLoader over `data.shards` in eval order (evenly spaced frames, one pass,
    no shuffling), pixels normalised on rt.device in rt.dtype."""
    from shards.reader import StreamLoader
    return StreamLoader(dataclasses.replace(data, train=False), rank=rt.rank, world=rt.world, device=rt.device,
                        dtype=rt.dtype)


def shard_batches(loader, text: bool = True) -> Iterator[dict]:
    """A StreamLoader's batches keyed by sample key; with `text`, the subtitles as text tokens."""
    for b in loader:
        yield {"key": b["key"], "video": b["video"], **({"text": b["subtitle"]} if text else {})}


@torch.no_grad()
def encode_texts(model, texts: list[str], tokenize, device, batch_size: int = 256) -> torch.Tensor:
    """[len(texts), D] float32 CPU features of strings (every rank encodes all of them)."""
    out = [model.encode_text(tokenize(texts[i:i + batch_size]).to(device)).float().cpu()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, int(getattr(model, "embed_dim", 0) or 0))


@torch.no_grad()
def encode_text_tokens(model, texts: list[str], tokenize, device, batch_size: int = 256
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Strings → (sentence [N, D], words [N, L, D], word mask [N, L]) float32 CPU, unnormalised
    (`CLIPViP.encode_text_tokens`; L = the tokenizer's context length)."""
    parts = [model.encode_text_tokens(tokenize(texts[i:i + batch_size]).to(device))
             for i in range(0, len(texts), batch_size)]
    if not parts:
        raise ValueError("no texts to encode")
    return (torch.cat([p[0] for p in parts]).float().cpu(), torch.cat([p[1] for p in parts]).float().cpu(),
            torch.cat([p[2] for p in parts]).cpu())
