"""Config sections owned by the shards library: synthetic corpus, shard build, streaming reader.

Frozen dataclasses; an application composes them into its own config (``vip.config.Config``)
and passes each function only the section it needs. Fields with fixed choices are typed
``Literal`` so a loader can reject a bad value with the allowed ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

X264Preset = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
                     "veryslow", "placebo"]


@dataclass(frozen=True)
class SynthConfig:
    """Synthetic HD-VILA-style corpus: moving coloured shapes with matching text."""

    out: str = "data/synth"
    num_videos: int = 8
    clips_per_video: int = 4
    clip_seconds: float = 4.0      # length of each clip span
    gap_seconds: float = 0.5       # unused footage between clips
    width: int = 1280
    height: int = 720
    fps: int = 30
    seed: int = 0
    crf: int = 23                  # x264 quality of the source videos
    preset: X264Preset = "ultrafast"      # x264 speed preset of the source videos
    texture: Literal["flat", "natural"] = "flat"          # flat: plain background | natural: panning 1/f-noise background with
    #                                grain (decodes and compresses like camera footage; benchmarks)
    audio: bool = False            # soundtracks: a tone pattern per clip named in its subtitle, plus noise
    #                                (AAC stereo 44.1 kHz; shards/synth_audio.py); off: silent videos as before
    text: Literal["template", "speech", "description"] = "template"   # subtitles: template (names colour,
    #                                shape, motion) | speech (ASR-like, loosely related: the HD-VILA register)
    #                                | description (short MSR-VTT-like: held-out evaluation sets); shards/texts.py


@dataclass(frozen=True)
class ShardBuildConfig:
    """How clips are cut, re-encoded and packed into webdataset shards."""

    metadata: str = "data/synth/metadata.jsonl"
    subtitles: str = "data/synth/subtitles.jsonl"
    videos: str = "data/synth/videos"
    out: str = "data/shards"       # a folder, or s3://bucket/prefix, gs://… (shards/storage.py)
    clips_per_shard: int = 1000     # ~100-300 MB shards at the default format
    # stored format, chosen by bench/data.py (docs/benchmarks.md): fewest reader cores per clip
    fps: float = 4.0               # stored frame rate (<= source rate)
    short_side: int = 224          # stored short side in pixels (even)
    keyframe_interval: int = 4     # GOP length of the stored clip, in frames
    crf: int = 23
    preset: X264Preset = "veryfast"
    jpeg_quality: int = 90
    frame_short_side: int = 256    # stored middle-frame JPEG (captioner input)
    fast_decode: bool = True       # x264 --tune fastdecode (no CABAC/deblock: faster reads, ~16% bigger files)
    aspect: Literal["square", "keep"] = "square"         # square: short_side² (the reader's default squash done once at build
    #                                time: 1.6x fewer reader cores, 38% less storage on textured 16:9 video,
    #                                docs/benchmarks.md; not readable with data.resize=crop) | keep: aspect kept
    max_clip_seconds: float = 60.0  # longer spans are cut to this
    workers: int = 2               # local processes (ignored with ray_address)
    ray_address: Optional[str] = None  # "auto", "ray://…" or "local" to use Ray
    limit_shards: Optional[int] = None  # build only the first N shards (tests, smoke runs)
    # audio (shards/audio.py, docs/data_format.md "Audio"): each clip's span of the source soundtrack,
    # mono at audio_rate, AAC-LC in MP4 (<key>.m4a); clips whose source has none are written without
    audio: bool = True
    audio_rate: int = 16000        # Hz, mono
    audio_bitrate: int = 48000     # bit/s
    staging: Optional[str] = None  # local folder where shards bound for object storage are written before
    #                                upload (default: the system temporary folder)


@dataclass(frozen=True)
class DataConfig:
    """The streaming reader: shards → training batches (docs/architecture.md, "Batches")."""

    shards: str = "data/shards"    # a folder, or s3://…, gs://…, http(s)://… (read with range requests)
    captions: Optional[str] = None  # folder (or URL) of caption sidecars; default <shards>/captions
    num_frames: int = 12
    image_size: int = 224
    resize: Literal["squash", "crop"] = "squash"         # squash (reference) | crop (short-side resize + centre crop)
    context_length: int = 70
    tokenizer: str = "ViT-B-32"    # open_clip model name whose tokenizer is used
    batch_size: int = 8            # per rank (micro-batch)
    num_workers: int = 2
    shuffle_shards: int = 4        # shards interleaved at once by a worker
    seed: int = 0
    train: bool = True             # random frame jitter + shuffling; False: evenly spaced, in order
    decode_threads: int = 1        # codec threads per worker
    # audio (Everything at Once; shards/audio.py): decode <key>.m4a to a log-mel spectrogram of
    # audio_seconds (a random window in training, centred in evaluation; shorter audio padded and
    # masked; clips without audio: all padding, has_audio False). Window/hop/FFT in samples.
    audio: bool = False
    audio_rate: int = 16000
    audio_seconds: float = 8.0     # the original's 8 s clips (768 STFT frames → 12 tokens)
    audio_n_fft: int = 512
    audio_window: int = 400        # 25 ms at 16 kHz
    audio_hop: int = 160           # 10 ms at 16 kHz: 100 frames a second
    audio_n_mels: int = 40
    prefetch_factor: int = 2
    # remote shard sets (s3://, gs://, http(s)://; shards/storage.py, docs/scaling.md "Object storage")
    io_timeout: float = 60.0       # seconds to connect and between bytes of a response, per request
    io_retries: int = 5            # retries of a timeout, dropped connection or 5xx (backoff, counted)
    io_backoff: float = 0.5        # first retry after ~this many seconds, doubling
    io_concurrency: int = 16       # range requests in flight per shard of a batch
    io_coalesce_bytes: int = 1048576  # merge a batch's reads of one shard across gaps up to this (one request)
