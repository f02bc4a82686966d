"""Shared fixtures: a small synthetic corpus with real h264 and shards built from it."""
from __future__ import annotations

import dataclasses
import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from vip.config import DataConfig, ShardBuildConfig, SynthConfig  # noqa: E402


def small_synth(out) -> SynthConfig:
    return SynthConfig(out=str(out), num_videos=4, clips_per_video=3, clip_seconds=2.0, gap_seconds=0.5,
                       width=192, height=108, fps=30, seed=1)


def small_build(synth_dir, out, **kw) -> ShardBuildConfig:
    base = ShardBuildConfig(metadata=f"{synth_dir}/metadata.jsonl", subtitles=f"{synth_dir}/subtitles.jsonl",
                            videos=f"{synth_dir}/videos", out=str(out), clips_per_shard=2, fps=8.0,
                            short_side=64, keyframe_interval=4, frame_short_side=64, workers=2)
    return dataclasses.replace(base, **kw)


def small_data(shards, **kw) -> DataConfig:
    base = DataConfig(shards=str(shards), num_frames=4, image_size=32, batch_size=3, num_workers=0,
                      shuffle_shards=2, seed=3, context_length=32)
    return dataclasses.replace(base, **kw)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    from shards.synth import make_corpus
    out = tmp_path_factory.mktemp("synth")
    make_corpus(small_synth(out))
    return out


@pytest.fixture(scope="session")
def shard_dir(corpus, tmp_path_factory):
    """12 clips in 6 shards of 2 (built with 2 local processes)."""
    from shards.build import build_shards
    out = tmp_path_factory.mktemp("shards")
    summary = build_shards(small_build(corpus, out))
    assert summary.shards_failed == 0 and summary.clips_written == 12, summary.table()
    return out
