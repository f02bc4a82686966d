"""Shared fixtures. Test modules never import each other (nor this file): everything they share
is a fixture here — small configs, a synthetic corpus with real h264 and shards built from it,
a tiny exported model, a folder of short videos, free ports on 127.0.0.1."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from vip.config import DataConfig, ModelConfig, ShardBuildConfig, SynthConfig  # noqa: E402

TINY = ModelConfig(arch="vip-tiny", num_proxies=2, max_frames=4)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (220, 220, 30)}


def _small_synth(out) -> SynthConfig:
    return SynthConfig(out=str(out), num_videos=4, clips_per_video=3, clip_seconds=2.0, gap_seconds=0.5,
                       width=192, height=108, fps=30, seed=1)


def _small_build(synth_dir, out, **kw) -> ShardBuildConfig:
    base = ShardBuildConfig(metadata=f"{synth_dir}/metadata.jsonl", subtitles=f"{synth_dir}/subtitles.jsonl",
                            videos=f"{synth_dir}/videos", out=str(out), clips_per_shard=2, fps=8.0,
                            short_side=64, keyframe_interval=4, frame_short_side=64, workers=2)
    return dataclasses.replace(base, **kw)


def _small_data(shards, **kw) -> DataConfig:
    base = DataConfig(shards=str(shards), num_frames=4, image_size=32, batch_size=3, num_workers=0,
                      shuffle_shards=2, seed=3, context_length=32)
    return dataclasses.replace(base, **kw)


def _write_video(path, colour, n=10, w=80, h=48, fps=10, fmt="mp4"):
    """A square of `colour` (a name in COLOURS) moving right on a dark background (libx264)."""
    import av
    import numpy as np
    with av.open(str(path), mode="w", format=fmt) as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            img = np.full((h, w, 3), 20, np.uint8)
            x = 4 + i * 5
            img[16:32, x:x + 16] = COLOURS[colour]
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


# --------------------------------------------------------------------------- factories and constants
@pytest.fixture(scope="session")
def small_synth():
    """small_synth(out) → SynthConfig of 4 tiny videos × 3 clips."""
    return _small_synth


@pytest.fixture(scope="session")
def small_build():
    """small_build(synth_dir, out, **overrides) → ShardBuildConfig (2 clips per shard, 64 px)."""
    return _small_build


@pytest.fixture(scope="session")
def small_data():
    """small_data(shards, **overrides) → DataConfig (4 frames at 32², batch 3, no workers)."""
    return _small_data


@pytest.fixture(scope="session")
def tiny_model_cfg() -> ModelConfig:
    """The tiny random-weight CLIP-ViP config (2 proxies, 4 temporal rows)."""
    return TINY


@pytest.fixture(scope="session")
def palette() -> dict:
    """Colour name → RGB of the squares `write_video` draws."""
    return dict(COLOURS)


@pytest.fixture(scope="session")
def write_video():
    """write_video(path, colour, n=10, w=80, h=48, fps=10, fmt="mp4"): a moving square, real h264."""
    return _write_video


@pytest.fixture
def free_port():
    """free_port() → a TCP port free on 127.0.0.1 now (chosen at run time, never hard-coded)."""
    from vip.train.runtime import free_port as _free
    return _free


# --------------------------------------------------------------------------- data
@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    from shards.synth import make_corpus
    out = tmp_path_factory.mktemp("synth")
    make_corpus(_small_synth(out))
    return out


@pytest.fixture(scope="session")
def shard_dir(corpus, tmp_path_factory):
    """12 clips in 6 shards of 2 (built with 2 local processes)."""
    from shards.build import build_shards
    out = tmp_path_factory.mktemp("shards")
    summary = build_shards(_small_build(corpus, out))
    assert summary.shards_failed == 0 and summary.clips_written == 12, summary.table()
    return out


@pytest.fixture(scope="session")
def video_set(tmp_path_factory):
    """Four short videos (mp4, no extension, mkv), one corrupt file, annotations with a repeated
    id, a two-caption clip and a missing clip."""
    d = tmp_path_factory.mktemp("evalvideos")
    vids = d / "videos"
    vids.mkdir()
    _write_video(vids / "v0.mp4", "red", n=10)
    _write_video(vids / "v1.mp4", "green", n=7)
    _write_video(vids / "v2", "blue", n=13)                 # no extension
    _write_video(vids / "v3.mkv", "yellow", n=9, fmt="matroska")
    (vids / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video" * 4)
    ann = d / "ann.jsonl"
    rows = [{"clip_id": "v0", "text": "a red square moves right"},
            {"clip_id": "v1", "text": ["a green square", "green box moving"]},   # two captions
            {"clip_id": "v2", "text": "a blue square"},
            {"clip_id": "bad", "text": ["corrupt", "still corrupt"]},
            {"clip_id": "v3", "text": "yellow square"},
            {"clip_id": "v0", "text": "red thing"},                                 # repeated id: merged
            {"clip_id": "gone", "text": "missing file"}]
    ann.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """An exported tiny random-weight model (vip.load-able folder), seed 0."""
    import torch

    from vip.model import build_model
    from vip.model.convert import export
    torch.manual_seed(0)
    return export(build_model(TINY), TINY, tmp_path_factory.mktemp("export") / "tiny")


# --------------------------------------------------------------------------- in-process training
@pytest.fixture(scope="session")
def train_rt():
    """A real process group of one (gloo on 127.0.0.1, a port chosen now) and its Runtime, for
    DeepSpeed engines built inside the test process; torn down at the end of the session."""
    import torch.distributed as dist
    import deepspeed.utils.groups as ds_groups

    from vip.train.runtime import free_port, init_runtime
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")     # LOCAL_RANK stays: DeepSpeed reads it
    saved = {k: os.environ.get(k) for k in names}
    if not dist.is_initialized():
        ds_groups._WORLD_GROUP = None        # DeepSpeed caches the world group of an earlier process group
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1")
    try:
        rt = init_runtime(device="cpu", precision="fp32", training=True)
    finally:
        # the group is up: its address must not leak into launchers that later tests start (their
        # ranks would try to bind this group's port, or believe they are a world of one); LOCAL_RANK=0
        # stays (DeepSpeed's engine reads it; launchers set their own)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield rt
    if dist.is_initialized():
        dist.destroy_process_group()
    ds_groups._WORLD_GROUP = None


@pytest.fixture
def tiny_engine(train_rt):
    """tiny_engine(**train_overrides) → vip.train.engine.Engine around a fresh tiny model (seed 0,
    micro-batch 2, global batch 2, ZeRO 1, fp32, lr 1e-3, no warmup, 100 steps)."""
    import torch

    from vip.config import OptimConfig, TrainConfig
    from vip.model import build_model
    from vip.train.engine import build_engine

    def make(**train):
        torch.manual_seed(0)
        tc = TrainConfig(**{"global_batch": 2, "precision": "fp32", "zero_stage": 1, **train})
        return build_engine(build_model(TINY), train_rt, tc, OptimConfig(lr=1e-3, warmup_ratio=0.0),
                            micro_batch=2, total_steps=100)
    return make


@pytest.fixture(scope="session")
def model_batch():
    """model_batch(B=2, T=4, size=64, L=16) → a deterministic reader-style batch already on the CPU
    in model form (normalised float pixels, token ids, has_caption, keys)."""
    import torch

    def make(B=2, T=4, size=64, L=16):
        g = torch.Generator().manual_seed(1)
        tok = torch.randint(1, 4000, (2, B, L), generator=g)
        tok[:, :, -1] = 49407
        return {"key": [f"k{i}" for i in range(B)], "video": torch.randn(B, T, 3, size, size, generator=g),
                "frame": torch.randn(B, 3, size, size, generator=g), "subtitle": tok[0], "caption": tok[1],
                "has_caption": torch.ones(B, dtype=torch.bool)}
    return make
