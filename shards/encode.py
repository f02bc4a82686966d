"""Cut one clip out of a source video and re-encode it to the training format.

The stored clip is h264 at a fixed frame rate, short side and keyframe
interval (GOP), without B-frames so that decode order is display order and a
reader can stop decoding as soon as it has its last sampled frame. The middle
frame is taken from the source at full quality and stored as a JPEG for the
captioner and the frame–caption loss.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from shards.config import ShardBuildConfig


class ClipError(Exception):
    """A clip that cannot be made; `reason` is the counted skip reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class StoredFormat:
    """The training format of stored clips (recorded in every sample's json)."""

    fps: float = 4.0
    short_side: int = 224
    keyframe_interval: int = 4
    crf: int = 23
    preset: str = "veryfast"
    jpeg_quality: int = 90
    frame_short_side: int = 256
    max_clip_seconds: float = 60.0
    fast_decode: bool = True
    aspect: str = "square"           # square | keep (see ShardBuildConfig.aspect)
    audio: bool = True               # keep the clip's audio (shards/audio.py)
    audio_rate: int = 16000
    audio_bitrate: int = 48000

    def __post_init__(self):
        if self.aspect not in ("keep", "square"):
            raise ValueError(f"build.aspect must be keep or square, got {self.aspect!r}")

    def clip_size(self, width: int, height: int) -> tuple[int, int]:
        """Stored (width, height) of a clip cut from a width×height source."""
        if self.aspect == "square":
            side = max(2, self.short_side // 2 * 2)
            return side, side
        return scaled_size(width, height, self.short_side)

    @classmethod
    def from_config(cls, cfg: ShardBuildConfig) -> "StoredFormat":
        return cls(fps=cfg.fps, short_side=cfg.short_side, keyframe_interval=cfg.keyframe_interval,
                   crf=cfg.crf, preset=cfg.preset, jpeg_quality=cfg.jpeg_quality,
                   frame_short_side=cfg.frame_short_side, max_clip_seconds=cfg.max_clip_seconds,
                   fast_decode=cfg.fast_decode, aspect=cfg.aspect, audio=cfg.audio, audio_rate=cfg.audio_rate,
                   audio_bitrate=cfg.audio_bitrate)


@dataclass
class EncodedClip:
    mp4: bytes
    jpg: bytes
    fps: float
    num_frames: int
    width: int
    height: int
    duration: float          # seconds of stored video (num_frames / fps)
    span: tuple              # (start, end) actually covered, seconds in the source
    truncated: bool          # the span ran past the end of the source


@dataclass
class SourceVideo:
    """An opened source video: container + its first video stream."""

    container: "av.container.InputContainer"
    stream: "av.video.stream.VideoStream"
    fps: float
    duration: float | None
    width: int
    height: int

    def close(self) -> None:
        self.container.close()


def open_source(path: str) -> SourceVideo:
    """Open a source video or raise ClipError(missing_video | unreadable_video | no_video_stream)."""
    import os
    if not os.path.exists(path):
        raise ClipError("missing_video", path)
    try:
        container = av.open(path, mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise ClipError("unreadable_video", f"{path}: {e}") from None
    if not container.streams.video:
        container.close()
        raise ClipError("no_video_stream", f"{path} has no video stream (audio-only?)")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 30.0
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    w, h = stream.codec_context.width, stream.codec_context.height
    if not w or not h:
        container.close()
        raise ClipError("unreadable_video", f"{path}: video stream has no size")
    return SourceVideo(container, stream, fps, duration, w, h)


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Size with the given short side, aspect kept, both sides even (yuv420p)."""
    scale = short_side / min(width, height)
    w = max(2, int(round(width * scale / 2)) * 2)
    h = max(2, int(round(height * scale / 2)) * 2)
    return w, h


def _jpeg(frame: "av.VideoFrame", short_side: int, quality: int) -> bytes:
    w, h = scaled_size(frame.width, frame.height, short_side)
    img = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_image()
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def cut_clip(src: SourceVideo, start: float, end: float, fmt: StoredFormat) -> EncodedClip:
    """Decode [start, end) of the source, resample to fmt.fps, resize, encode h264 + middle JPEG."""
    if src.duration is not None and start >= src.duration:
        raise ClipError("span_outside_video", f"start {start:.3f}s >= video duration {src.duration:.3f}s")
    end = min(end, start + fmt.max_clip_seconds)
    out_fps = min(float(fmt.fps), src.fps) if fmt.fps > 0 else src.fps
    n_target = max(1, int(math.floor((end - start) * out_fps + 1e-6)))
    targets = start + np.arange(n_target) / out_fps       # output frame times, seconds
    mid_time = (start + end) / 2

    stream = src.stream
    t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    try:
        src.container.seek(int((start + t0) / stream.time_base), stream=stream, backward=True)
    except av.error.FFmpegError:
        pass  # some files cannot seek: decode from where we are (first clip) or fail below

    chosen: list = [None] * n_target     # source frame for each output slot
    mid_frame, mid_dist = None, float("inf")
    j = 0
    prev = None
    last_t = None
    frame_dur = 1.0 / src.fps
    try:
        for frame in src.container.decode(stream):
            if frame.pts is None:
                continue
            t = float(frame.pts * stream.time_base) - t0
            if t < start - 0.5 * frame_dur:
                prev = frame
                continue
            if t >= end:
                break
            # every target before this frame's time is shown by the previous frame
            while j < n_target and targets[j] < t - 1e-6:
                chosen[j] = prev if prev is not None else frame
                j += 1
            d = abs(t - mid_time)
            if d < mid_dist:
                mid_frame, mid_dist = frame, d
            prev, last_t = frame, t
    except av.error.FFmpegError as e:
        raise ClipError("decode_error", str(e)) from None
    if last_t is None:
        if src.duration is not None and start >= src.duration - frame_dur:
            raise ClipError("span_outside_video", f"no frames at {start:.3f}s (video {src.duration:.3f}s)")
        raise ClipError("no_frames", f"no decodable frame in [{start:.3f}, {end:.3f})")
    while j < n_target and targets[j] < last_t + frame_dur:
        chosen[j] = prev
        j += 1
    truncated = j < n_target
    chosen = chosen[:j]

    w, h = fmt.clip_size(src.width, src.height)
    rate = Fraction(out_fps).limit_denominator(1001)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=rate)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        g = max(1, fmt.keyframe_interval)
        params = f"keyint={g}:min-keyint={g}:scenecut=0:bframes=0"
        vs.options = {"crf": str(fmt.crf), "preset": fmt.preset, "x264-params": params}
        if fmt.fast_decode:
            vs.options = {**vs.options, "tune": "fastdecode"}
        vs.codec_context.time_base = Fraction(1) / rate
        cache_src, cache_out = None, None
        for i, f in enumerate(chosen):
            if f is not cache_src:  # repeated source frames are resized once
                cache_src = f
                cache_out = f.reformat(width=w, height=h, format="yuv420p", interpolation="AREA")
            cache_out.pts = i  # the encoder copies the frame reference, pts included
            cache_out.time_base = vs.codec_context.time_base
            # a source keyframe must not force one here: keyframes only every keyframe_interval
            cache_out.pict_type = av.video.frame.PictureType.NONE
            for packet in vs.encode(cache_out):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
    n = len(chosen)
    return EncodedClip(mp4=buf.getvalue(), jpg=_jpeg(mid_frame, fmt.frame_short_side, fmt.jpeg_quality),
                       fps=float(rate), num_frames=n, width=w, height=h, duration=n / float(rate),
                       span=(start, min(end, start + n / out_fps)), truncated=truncated)
