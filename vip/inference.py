"""Inference helpers: encode videos (files, uint8 arrays, tensors) and texts with a vip model.

    from vip.inference import load
    m = load("runs/pretrain/export")                 # VideoTextModel around a CLIPViP
    v = m.encode_video(["a.mp4", "b.mkv"])            # [2, D] L2-normalised
    t = m.encode_text(["a dog catches a frisbee"])    # [1, D]
    s = m.similarity(["a.mp4", "b.mkv"], ["a dog", "a cat"])   # [2 texts, 2 videos] cosine
    # an export fine-tuned with a retrieval head (vip finetune finetune.head=xclip|drl|…) scores with it:
    # m.head is the head; similarity(...) uses it (head=False: the pooled cosine instead)

An Everything-at-Once export (model.fusion set; docs/fusion.md) also embeds sound, in its joint space:

    a = m.encode_audio(["a.mp4"])                     # [1, P] the files' soundtracks
    va = m.encode_fused(["a.mp4"])                    # [1, P] video + its own soundtrack, fused
    e = m.fused(videos=["a.mp4"], texts=["a dog barks"])   # {"t", "v", "a", "tv", "va", "ta"}: [B, P]

Files that cannot be used raise an error naming the path: FileNotFoundError (missing),
ValueError for an empty path, `vip.eval.videos.VideoError` (a ValueError) with reason
`no_video_stream` (audio only) or `decode_error`. An empty list of videos (or texts) gives an
empty [0, D] tensor.

`vip embed` writes the embeddings of a video folder (or a shard folder) to parquet.
"""
from __future__ import annotations

import collections
import logging
import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from shards.atomic import atomic_path
from shards.reader import normalise
from shards.video import sample_indices
from vip.config import EvalConfig, ModelConfig

log = logging.getLogger(__name__)
VideoInput = Union[str, os.PathLike, np.ndarray, torch.Tensor]


def _to_clip(x, num_frames: int, size: int, resize: str) -> torch.Tensor:
    """One video → normalised float [T, 3, size, size]."""
    from vip.eval.videos import load_video
    if isinstance(x, (str, os.PathLike)):
        return normalise(load_video(x, num_frames, size, resize))
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"a frame array must be uint8 [T, H, W, 3], got {x.dtype} {x.shape}")
        x = x[sample_indices(len(x), num_frames, train=False)]            # evenly spaced T frames
        v = normalise(x)                                                  # [T, 3, H, W]
        if v.shape[-2:] != (size, size):
            # squash-resize uint8 frames, then normalise (same order as the decoder path)
            u = torch.from_numpy(np.ascontiguousarray(x)).movedim(-1, 1).float()
            u = F.interpolate(u, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            v = normalise(u.round().clamp(0, 255).to(torch.uint8).movedim(1, -1).numpy())
        return v
    raise TypeError(f"unsupported video input {type(x).__name__}")


class VideoTextModel:
    """A CLIPViP plus its tokenizer and input size: encode paths, arrays, tensors and strings.

    Drop-in for the CLIPViP it wraps: tensors pass straight through (video [B, T, 3, H, W],
    token ids [B, L]) and any other attribute (state_dict, training, visual, …) is the model's."""

    def __init__(self, model, model_cfg: ModelConfig, num_frames: int | None = None, resize: str = "squash",
                 tokenizer: str | None = None):
        from vip.model.archs import image_size, tokenizer_for
        self.model, self.cfg = model.eval(), model_cfg
        self.num_frames = num_frames or model_cfg.max_frames
        self.resize = resize
        self.image_size = image_size(model)
        self.tokenize = tokenizer_for(tokenizer or model_cfg.arch, model.context_length)

    def __getattr__(self, name):
        model = self.__dict__.get("model")
        if model is None:
            raise AttributeError(name)
        return getattr(model, name)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "VideoTextModel":
        self.model.to(device)
        return self

    def video_tensor(self, videos: VideoInput | Sequence[VideoInput], num_frames: int | None = None) -> torch.Tensor:
        """Inputs → normalised [B, T, 3, H, W]. Float tensors are taken as already normalised."""
        T = num_frames or self.num_frames
        if isinstance(videos, torch.Tensor):
            if videos.ndim == 4:
                return videos[None]                                       # [T, 3, H, W] → [1, T, 3, H, W]
            if videos.ndim == 5:
                return videos
            raise ValueError(f"a video tensor must be [T, 3, H, W] or [B, T, 3, H, W], got {tuple(videos.shape)}")
        if isinstance(videos, (str, os.PathLike, np.ndarray)):
            videos = [videos]
        videos = list(videos)
        clips = []
        for i, v in enumerate(videos):
            if isinstance(v, (str, os.PathLike)) and not os.fspath(v):   # Path("") would be the cwd
                raise ValueError(f"video {i} of {len(videos)} is an empty path '': give a video file path, "
                                 "a uint8 [T, H, W, 3] array or a float tensor")
            clips.append(_to_clip(v, T, self.image_size, self.resize))
        if not clips:
            return torch.zeros(0, T, 3, self.image_size, self.image_size)
        return torch.stack(clips)

    @torch.no_grad()
    def encode_video(self, videos: VideoInput | Sequence[VideoInput], num_frames: int | None = None,
                     batch_size: int = 16) -> torch.Tensor:
        """→ L2-normalised [B, D] (float32, on the model's device); no videos → [0, D]."""
        x = self.video_tensor(videos, num_frames)
        if not len(x):
            return torch.zeros(0, self.embed_dim, device=self.device)
        dtype = next(self.model.parameters()).dtype
        return torch.cat([self.model.encode_video(x[i:i + batch_size].to(self.device, dtype)).float()
                          for i in range(0, len(x), batch_size)])

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str] | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Strings (or token ids [N, L]) → L2-normalised [N, D] (float32)."""
        if isinstance(texts, torch.Tensor):
            return self.model.encode_text(texts.to(self.device)).float()
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return torch.cat([self.model.encode_text(self.tokenize(texts[i:i + batch_size]).to(self.device)).float()
                          for i in range(0, len(texts), batch_size)])

    # ------------------------------------------------------------------ Everything at Once
    def audio_tensor(self, audios) -> tuple[torch.Tensor, torch.Tensor]:
        """Files (their soundtracks) → (log-mel [B, n_mels, F], mask [B, F]) with `self.audio_cfg`
        (data.audio_* settings; default DataConfig's); a (mel, mask) pair passes through."""
        from shards.audio import clip_log_mel
        if isinstance(audios, tuple) and len(audios) == 2 and isinstance(audios[0], torch.Tensor):
            return audios
        audios = [audios] if isinstance(audios, (str, os.PathLike)) else list(audios)
        cfg = self.__dict__.get("audio_cfg")
        if cfg is None:
            from shards.config import DataConfig
            cfg = DataConfig()
        mels = [clip_log_mel(Path(a).read_bytes(), cfg, False) for a in audios]
        return (torch.from_numpy(np.stack([m for m, _ in mels])), torch.from_numpy(np.stack([k for _, k in mels])))

    @torch.no_grad()
    def fused(self, videos=None, texts=None, audios=None, num_frames: int | None = None) -> dict[str, torch.Tensor]:
        """Everything-at-Once embeddings [B, P] (float32) of the inputs given: t, v, a and the fused
        pairs tv, va, ta. audios default to the videos' own soundtracks when videos are files."""
        if not hasattr(self.model, "fusion_head"):
            raise TypeError("this model has no fusion head (export a model trained with finetune.method=eao)")
        dtype = next(self.model.parameters()).dtype
        kw = {}
        if videos is not None:
            kw["video"] = self.video_tensor(videos, num_frames).to(self.device, dtype)
            if audios is None and not isinstance(videos, torch.Tensor):
                audios = videos
        if audios is not None:
            mel, mask = self.audio_tensor(audios)
            kw["audio"], kw["audio_mask"] = mel.to(self.device, dtype), mask.to(self.device)
        if texts is not None:
            texts = [texts] if isinstance(texts, str) else texts
            kw["text"] = (texts if isinstance(texts, torch.Tensor) else self.tokenize(list(texts))).to(self.device)
        out = self.model.fuse(**kw)
        return {k: v.float() for k, v in out.items() if not k.startswith("present_")}

    def encode_audio(self, audios) -> torch.Tensor:
        """Soundtracks (files, or a (mel, mask) pair) → L2-normalised [B, P] in the joint space."""
        return self.fused(audios=audios)["a"]

    def encode_fused(self, videos, audios=None, num_frames: int | None = None) -> torch.Tensor:
        """Videos + soundtracks (default: the videos' own) fused → L2-normalised [B, P] (va)."""
        return self.fused(videos=videos, audios=audios, num_frames=num_frames)["va"]

    @property
    def head(self):
        """The model's retrieval head (vip.model.heads), or None."""
        return getattr(self.model, "head", None)

    @torch.no_grad()
    def encode_video_frames(self, videos, num_frames: int | None = None, batch_size: int = 16) -> torch.Tensor:
        """→ per-frame features [B, T, D] (unnormalised, float32; what a retrieval head scores)."""
        x = self.video_tensor(videos, num_frames)
        dtype = next(self.model.parameters()).dtype
        parts = [self.model.encode_video_frames(x[i:i + batch_size].to(self.device, dtype))[0].float()
                 for i in range(0, len(x), batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, x.shape[1], self.embed_dim, device=self.device)

    @torch.no_grad()
    def encode_text_tokens(self, texts, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Strings (tokenised at the head's training length when there is a head) or token ids →
        (sentence [N, D], words [N, L, D], word mask [N, L])."""
        if not isinstance(texts, torch.Tensor):
            texts = [texts] if isinstance(texts, str) else list(texts)
            length = (self.head.spec.get("context_length") if self.head is not None else None) or self.tokenize.context_length
            from vip.model.archs import tokenizer_for
            tok = self.tokenize if length == self.tokenize.context_length else tokenizer_for(self.tokenize.name, length)
            texts = tok(texts)
        parts = [self.model.encode_text_tokens(texts[i:i + batch_size].to(self.device))
                 for i in range(0, len(texts), batch_size)]
        return tuple(torch.cat([p[k] for p in parts]) for k in range(3))

    def similarity(self, videos, texts, num_frames: int | None = None, head: bool | None = None,
                   chunk_size: int = 256) -> torch.Tensor:
        """[num_texts, num_videos]: the retrieval head's similarity when the model has one (head=None
        or True), else (or head=False) the cosine of the pooled features. Multiply by
        exp(logit_scale) for logits. The head scores chunk_size² pairs at a time."""
        if head is None:
            head = self.head is not None
        if not head:
            return self.encode_text(texts) @ self.encode_video(videos, num_frames).T
        if self.head is None:
            raise ValueError("this model has no retrieval head (fine-tune one: vip finetune finetune.head=…)")
        from vip.eval.retrieval import head_similarity
        frames = self.encode_video_frames(videos, num_frames)
        return head_similarity(self.head, self.encode_text_tokens(texts), frames, self.device, chunk_size)


def load(path: str | os.PathLike, device: str | torch.device = "cpu", num_frames: int | None = None,
         resize: str = "squash", audio=None) -> VideoTextModel:
    """An exported vip model folder → VideoTextModel (eval mode). audio: a DataConfig whose
    data.audio_* settings turn soundtracks into log-mels (fusion models; default DataConfig's)."""
    from vip.model.convert import load as load_model, read_model_config
    m = VideoTextModel(load_model(path, device=device), read_model_config(path), num_frames, resize)
    m.audio_cfg = audio
    return m


# module-level function forms
def encode_video(model, videos, num_frames: int = 12) -> torch.Tensor:
    """`model`: a VideoTextModel, or a CLIPViP (tiny/test archs use the default tokenizer)."""
    return _wrap(model).encode_video(videos, num_frames)


def encode_text(model, texts) -> torch.Tensor:
    return _wrap(model).encode_text(texts)


def similarity(model, videos, texts, num_frames: int = 12) -> torch.Tensor:
    return _wrap(model).similarity(videos, texts, num_frames)


def _wrap(model) -> VideoTextModel:
    if isinstance(model, VideoTextModel):
        return model
    arch = "ViT-B-32"
    return VideoTextModel(model, ModelConfig(arch=arch, max_frames=12), tokenizer=arch)


# --------------------------------------------------------------------------- vip embed
def _write_parquet(keys: list[str], emb: np.ndarray, out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    out.parent.mkdir(parents=True, exist_ok=True)
    D = emb.shape[1] if emb.ndim == 2 else 0
    col = pa.ListArray.from_arrays(pa.array(np.arange(0, len(keys) * D + 1, D, dtype=np.int32)),
                                   pa.array(emb.reshape(-1).astype(np.float32)))
    with atomic_path(out) as tmp:
        pq.write_table(pa.table({"key": pa.array(keys, pa.string()), "embedding": col}), str(tmp))


def embed_folder(m: VideoTextModel, folder: str | Path, batch_size: int = 16, num_workers: int = 0,
                 progress: bool = True, rt=None) -> tuple[list[str], np.ndarray, dict]:
    """Every video file in `folder` → (file names, [N, D] float32, {name: failure reason}).
    rt: split over its ranks (gathered on every rank); default the model's device, world of torch.distributed."""
    from vip.eval.encode import encode_batches, folder_batches, runtime_of
    rt = rt or runtime_of(m.model)
    names = sorted(p.name for p in Path(folder).iterdir() if p.is_file())
    batches = folder_batches(names, folder, rt, m.num_frames, m.image_size, m.resize, batch_size, num_workers)
    enc = encode_batches(m.model, batches, rt, progress=progress, desc="embed")
    return [names[i] for i in enc.keys], enc.video.numpy(), {names[i]: r for i, r in enc.failed.items()}


def embed_shards(m: VideoTextModel, shards: str, batch_size: int = 16, num_workers: int = 0, rt=None
                 ) -> tuple[list[str], np.ndarray, dict]:
    """A shard folder read in eval order (evenly spaced frames, in order) → (keys, [N, D], {reason: count})
    of the clips that could not be embedded. Clips shorter than T frames are embedded (frames repeated)
    and are not failures (`short_clip_padded` is logged, not returned)."""
    import torch.distributed as dist

    from shards.reader import KEPT_EVENTS
    from vip.config import DataConfig
    from vip.eval.encode import encode_batches, runtime_of, shard_batches, shard_loader
    rt = rt or runtime_of(m.model)
    data = DataConfig(shards=shards, num_frames=m.num_frames, image_size=m.image_size, resize=m.resize,
                      batch_size=batch_size, num_workers=num_workers, train=False)
    loader = shard_loader(data, rt)                                      # pixels normalised on rt.device
    enc = encode_batches(m.model, shard_batches(loader, text=False), rt)
    events = [dict(loader.events)]                                       # failures counted by reason
    if rt.world > 1:
        events = [None] * rt.world
        dist.all_gather_object(events, dict(loader.events))
    failed, kept = {}, {}
    for ev in events:
        for reason, count in ev.items():
            into = kept if reason in KEPT_EVENTS else failed                # a padded clip is embedded fine
            into[reason] = into.get(reason, 0) + count
    if kept:
        log.info("embed: %s (embedded, not failures)", kept)
    return list(enc.keys), enc.video.numpy(), failed


def check_embed_config(cfg: EvalConfig) -> None:
    """ConfigError naming the override to set when `vip embed` lacks a required option."""
    from vip.config import ConfigError
    from vip.eval.models import require, require_path
    require(cfg.model, "eval.model=DIR", "the exported model")
    require_path(cfg.model, "eval.model")
    if not cfg.shards and not cfg.videos:
        raise ConfigError("missing the input: set eval.videos=DIR (a video folder) or eval.shards=DIR (a shard folder)")
    if cfg.shards:
        require_path(cfg.shards, "eval.shards", "folder")
    else:
        require_path(cfg.videos, "eval.videos", "folder")


def run_embed(cfg: EvalConfig) -> str | None:
    """`vip embed`: cfg.model + (cfg.shards | cfg.videos) → parquet at cfg.out (key, embedding).
    Under torchrun each rank encodes its share; rank 0 writes and returns the summary (others None)."""
    from vip.eval.models import command_runtime
    check_embed_config(cfg)
    with command_runtime(cfg.device, cfg.precision) as rt:
        m = load(cfg.model, device=rt.device, num_frames=cfg.num_frames, resize=cfg.resize)
        m.model.to(rt.dtype)
        if cfg.shards:
            keys, emb, failed = embed_shards(m, cfg.shards, cfg.batch_size, cfg.num_workers, rt)
        else:
            keys, emb, failed = embed_folder(m, cfg.videos, cfg.batch_size, cfg.num_workers, rt=rt)
    if not rt.is_main:
        return None
    out = Path(cfg.out if cfg.out.endswith(".parquet") else str(Path(cfg.out).with_suffix(".parquet")))
    _write_parquet(keys, emb, out)
    return embed_summary(len(keys), emb.shape[1] if len(keys) else 0, out, failed, by_file=not cfg.shards)


def embed_summary(n: int, dim: int, out, failed: dict, by_file: bool) -> str:
    """`vip embed`'s one-line summary. failed: {file name: reason} (a folder, by_file) or
    {reason: clip count} (shards); the failure count is the number of videos, not of reasons."""
    reasons = dict(collections.Counter(failed.values())) if by_file else dict(failed)
    line = f"{n} embeddings (dim {dim}) → {out}; {sum(reasons.values())} failed"
    if reasons:
        line += f" {reasons}"
    if by_file and failed:
        names = sorted(failed)
        line += f" ({', '.join(names[:5])}{', …' if len(names) > 5 else ''})"
    return line
