"""The paths `bench/data.py` times, and how it times them (clips per CPU-second).

Each path does the same job at a different depth, so their differences say where a
clip's CPU time goes:

- floor: decode (no conversion) just the frames a sampled clip needs, from mp4 bytes in memory;
- decode_frames: `shards.video.decode_frames` (decode + one swscale pass to RGB at the model size);
- worker: `shards.reader.ClipStream` in this process: tar read, json, decode, middle-frame JPEG,
  tokenise, collate uint8 pixels: the work of one data-loading core per clip when the
  GPU normalises (what the trainer does);
- loader: `shards.reader.StreamLoader` on the CPU (the worker's batches + CLIP normalisation on the
  CPU): what CPU training pays, and the reader before normalisation moved to the device;
- naive: from the 720p source, decode every frame of the span, pick, resize, normalise.
"""
from __future__ import annotations

import io
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HDVILA_MEAN_SECONDS = 13.4


# --------------------------------------------------------------------------- timing
def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process from /proc (Linux); 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _children() -> list[int]:
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").glob("*"):
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


@dataclass
class Timing:
    clips: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    rounds: list = field(default_factory=list)     # [clips, wall s, cpu s] per round

    @property
    def per_core(self) -> float:
        """Median over rounds of clips per CPU-second."""
        rates = [n / c for n, _, c in self.rounds if c > 0]
        return statistics.median(rates) if rates else 0.0

    @property
    def wall_rate(self) -> float:
        return self.clips / self.wall if self.wall > 0 else 0.0

    def to_dict(self) -> dict:
        return {"clips": self.clips, "wall_s": round(self.wall, 3), "cpu_s": round(self.cpu, 3),
                "clips_per_cpu_s": round(self.per_core, 3), "clips_per_wall_s": round(self.wall_rate, 3),
                "cpu_over_wall": round(self.cpu / self.wall, 3) if self.wall else None,
                "rounds": [[n, round(w, 3), round(c, 3)] for n, w, c in self.rounds]}


def timed(step: Callable[[], int], seconds: float, min_clips: int, rounds: int = 3,
          cpu_of: Callable[[], float] = time.process_time) -> Timing:
    """Call `step()` (returns clips done) for ≥ seconds and ≥ min_clips in total, in `rounds` rounds."""
    t = Timing()
    for _ in range(rounds):
        n, w0, c0 = 0, time.perf_counter(), cpu_of()
        while n < max(1, min_clips // rounds) or time.perf_counter() - w0 < seconds / rounds:
            n += step()
        w, c = time.perf_counter() - w0, cpu_of() - c0
        t.rounds.append([n, w, c])
        t.clips, t.wall, t.cpu = t.clips + n, t.wall + w, t.cpu + c
    return t


def cycle(items: list):
    while True:
        yield from items


# --------------------------------------------------------------------------- stored clips
@dataclass
class StoredClip:
    key: str
    mp4: bytes
    meta: dict


def load_clips(shard_dir: Path) -> tuple[list[StoredClip], dict]:
    """Every stored clip's mp4 + json in memory, and the format's byte accounting."""
    from shards.tarindex import TarReader
    clips, sizes = [], {"mp4": 0, "jpg": 0, "json": 0, "m4a": 0, "headers": 0}
    for tar in sorted(shard_dir.glob("shard-*.tar")):
        r = TarReader(str(tar))
        try:
            for key in r.index.keys:
                for ext, (_, size) in r.index.members[key].items():
                    sizes[ext] = sizes.get(ext, 0) + size
                    sizes["headers"] += 512 + (-size) % 512   # tar header + padding of the member
                clips.append(StoredClip(key, r.read(key, "mp4"), json.loads(r.read(key, "json"))))
        finally:
            r.close()
    n = len(clips)
    seconds = sum(c.meta["duration"] for c in clips)
    # per clip in a large shard (the end-of-archive padding of these tiny 2-clip shards is left out)
    per_clip = sum(sizes.values()) / n
    timed_bytes = sizes["mp4"] + sizes["m4a"]           # grow with the clip's length
    fixed = per_clip - timed_bytes / n                  # jpg + json + tar headers/padding
    per_clip_13s = timed_bytes / seconds * HDVILA_MEAN_SECONDS + fixed
    acct = {"clips": n, "video_seconds": round(seconds, 2), "bytes_per_clip": per_clip,
            "mp4_bytes_per_clip": sizes["mp4"] / n, "jpg_bytes_per_clip": sizes["jpg"] / n,
            "json_bytes_per_clip": sizes["json"] / n, "m4a_bytes_per_clip": sizes["m4a"] / n, "tar_overhead_per_clip": sizes["headers"] / n,
            "mp4_kbit_per_s": sizes["mp4"] * 8 / seconds / 1e3,
            "bytes_per_13.4s_clip": per_clip_13s, "tb_per_100m_clips": per_clip_13s * 100e6 / 1e12,
            "width": clips[0].meta["width"], "height": clips[0].meta["height"],
            "frames_per_clip": sum(c.meta["num_frames"] for c in clips) / n,
            "clips_with_off_grid_keyframes": sum(bool(off_grid_keyframes(c)) for c in clips)}
    return clips, acct


def off_grid_keyframes(clip: StoredClip) -> list[int]:
    """Keyframes not on the fixed GOP grid (frame index % keyframe_interval != 0): each makes
    `decode_frames`' seek land earlier than planned and costs an extra I-frame."""
    import av
    with av.open(io.BytesIO(clip.mp4), mode="r") as container:
        stream = container.streams.video[0]
        tb, t0 = float(stream.time_base), stream.start_time or 0
        fps, gop = clip.meta["fps"], clip.meta["keyframe_interval"]
        keys = [int(round((p.pts - t0) * tb * fps)) for p in container.demux(stream)
                if p.pts is not None and p.is_keyframe]
    return [k for k in keys if k % gop]


# --------------------------------------------------------------------------- the paths
def decode_only(mp4: bytes, indices, fps: float, gop: int) -> int:
    """The floor: decode (no conversion) just the frames needed for `indices`, seeking to the
    keyframe of each GOP that holds a wanted frame exactly as `decode_frames` does (the position
    after a seek comes from the frame's timestamp); returns the number of frames decoded."""
    import av
    want = sorted({int(i) for i in indices})
    decoded = 0
    with av.open(io.BytesIO(mp4), mode="r") as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        tb, t0 = float(stream.time_base), stream.start_time or 0
        pos, frames = 0, None
        for target in want:
            if pos is not None and target < pos:
                continue
            kf = (target // gop) * gop
            if frames is None or (pos is not None and kf > pos):
                if frames is not None or kf > 0:
                    container.seek(t0 + int(round(kf / fps / tb)), stream=stream, backward=True)
                    pos = None
                frames = container.decode(stream)
            while pos is None or pos <= target:
                frame = next(frames, None)
                if frame is None:
                    return decoded
                decoded += 1
                if pos is None:
                    pos = int(round((frame.pts - t0) * tb * fps))
                pos += 1
    return decoded


def naive_clip(path: str, start: float, end: float, T: int, size: int, rng) -> tuple[object, int, int]:
    """Naive: decode every frame of [start, end) of the source, sample T, resize to size², normalise.
    Returns (tensor [T, 3, size, size], frames decoded including the pre-roll from the keyframe,
    frames in the span)."""
    import av
    import numpy as np

    from shards.reader import normalise
    from shards.video import sample_indices
    with av.open(path, mode="r") as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        tb = float(stream.time_base)
        t0 = stream.start_time or 0
        rate = float(stream.average_rate)
        n = int(round((end - start) * rate))          # frames of the span, known from the metadata
        pick = sample_indices(n, T, True, rng)
        need = {int(i) for i in pick}
        container.seek(t0 + int(start / tb), stream=stream, backward=True)
        got, i, decoded = {}, 0, 0          # i: index of the frame within the span
        for frame in container.decode(stream):
            decoded += 1
            t = (frame.pts - t0) * tb
            if t < start - 0.5 / rate:
                continue
            if t >= end - 1e-6 or i >= n:
                break
            if i in need:
                got[i] = frame.reformat(width=size, height=size, format="rgb24").to_ndarray()
            i += 1
    last = max(got)
    x = normalise(np.stack([got.get(int(k), got[last]) for k in pick]))
    return x, decoded, i


def measure_naive(s, corpus: Path) -> dict:
    import numpy as np
    truth = [json.loads(line) for line in (corpus / "truth.jsonl").read_text().splitlines()]
    clips = [(str(corpus / "videos" / f"{t['clip_id'].split('.')[0]}.mp4"), *t["span_s"]) for t in truth]
    it = cycle(clips)
    counter = {"n": 0, "decoded": 0, "span": 0}
    naive_clip(*clips[0], s.num_frames, s.image_size, np.random.default_rng(0))  # warm up

    def step() -> int:
        path, a, b = next(it)
        counter["n"] += 1
        _, d, span = naive_clip(path, a, b, s.num_frames, s.image_size, np.random.default_rng([s.seed, counter["n"]]))
        counter["decoded"] += d
        counter["span"] += span
        return 1

    t = timed(step, s.naive_seconds, min_clips=3)
    return {"timing": t.to_dict(), "per_core": t.per_core,
            "frames_decoded_per_clip": counter["decoded"] / max(1, counter["n"]),
            "span_frames_per_clip": counter["span"] / max(1, counter["n"]),
            "source": f"{s.width}x{s.height} h264 {s.src_fps} fps (x264 ultrafast, default GOP)"}


def measure_floor(s, clips: list[StoredClip]) -> dict:
    import numpy as np

    from shards.video import sample_indices
    it = cycle(clips)
    counter = {"n": 0, "decoded": 0}

    def step() -> int:
        c = next(it)
        counter["n"] += 1
        idx = sample_indices(c.meta["num_frames"], s.num_frames, True, np.random.default_rng([s.seed, counter["n"]]))
        counter["decoded"] += decode_only(c.mp4, idx, c.meta["fps"], c.meta["keyframe_interval"])
        return 1

    step()
    t = timed(step, s.seconds, min_clips=len(clips))
    return {"timing": t.to_dict(), "per_core": t.per_core,
            "frames_decoded_per_clip": counter["decoded"] / counter["n"]}


def measure_decode_frames(s, clips: list[StoredClip]) -> dict:
    import numpy as np

    from shards.video import decode_frames, sample_indices
    it = cycle(clips)
    counter = {"n": 0}

    def step() -> int:
        c = next(it)
        counter["n"] += 1
        idx = sample_indices(c.meta["num_frames"], s.num_frames, True, np.random.default_rng([s.seed, counter["n"]]))
        decode_frames(c.mp4, idx, s.image_size, "squash", fps=c.meta["fps"],
                      keyframe_interval=c.meta["keyframe_interval"], threads=1)
        return 1

    step()
    t = timed(step, s.seconds, min_clips=len(clips))
    return {"timing": t.to_dict(), "per_core": t.per_core}


def data_config(s, shard_dir: Path, workers: int, audio: bool = False):
    from vip.config import DataConfig
    return DataConfig(shards=str(shard_dir), num_frames=s.num_frames, image_size=s.image_size,
                      batch_size=s.batch_size, num_workers=workers, train=True, seed=s.seed,
                      shuffle_shards=4, decode_threads=1, prefetch_factor=2, audio=audio,
                      audio_seconds=min(8.0, s.clip_seconds))


def measure_worker(s, shard_dir: Path, audio: bool = False) -> dict:
    """ClipStream batches (uint8 pixels) in this process: a data-loading worker's CPU per clip
    (audio: also the m4a member decoded to a log-mel window, data.audio=true)."""
    from shards.reader import StreamLoader
    stream = iter(StreamLoader(data_config(s, shard_dir, 0, audio)).dataset())
    b = next(stream)                                                  # warm up: tar indexes, tokenizer
    shapes = {k: [list(v.shape), str(v.dtype)] for k, v in b.items() if hasattr(v, "shape")}
    events: dict = {}

    def step() -> int:
        batch = next(stream)
        for reason, *_ in batch["_events"]:
            events[reason] = events.get(reason, 0) + 1
        return len(batch["key"])

    t = timed(step, s.seconds, min_clips=3 * s.batch_size)
    return {"timing": t.to_dict(), "per_core": t.per_core, "batch_shapes": shapes, "events": events}


def measure_loader(s, shard_dir: Path, workers: int = 0) -> dict:
    """StreamLoader batches normalised on the CPU. workers=0: this process only; workers>0:
    DataLoader workers, CPU time = workers + this process."""
    from shards.reader import StreamLoader
    loader = StreamLoader(data_config(s, shard_dir, workers))
    batches = iter(loader)
    shapes = {}
    for _ in range(max(1, workers)):  # warm up: tar indexes, tokenizer, worker start
        b = next(batches)
        shapes = {k: [list(v.shape), str(v.dtype)] for k, v in b.items() if hasattr(v, "shape")}
    pids = _children() if workers else []
    if workers and len(pids) < workers:
        raise RuntimeError("could not find the DataLoader workers in /proc: their CPU time would be missed")

    def workers_cpu() -> float:
        return sum(_proc_cpu_seconds(p) for p in pids)

    def step() -> int:
        return len(next(batches)["key"])

    main0, workers0 = time.process_time(), workers_cpu()
    t = timed(step, s.seconds, min_clips=3 * s.batch_size * max(1, workers),
              cpu_of=lambda: time.process_time() + workers_cpu())
    main_cpu, workers_cpu_s = time.process_time() - main0, workers_cpu() - workers0
    batches = None   # stop the workers before the numbers are read
    out = {"timing": t.to_dict(), "per_core": t.per_core, "wall_clips_per_s": t.wall_rate,
           "workers": workers, "batch_shapes": shapes, "events": dict(loader.events)}
    if workers:
        out["wall_clips_per_s_per_worker"] = t.wall_rate / workers
        out["main_process_cpu_share"] = main_cpu / max(1e-9, main_cpu + workers_cpu_s)
    return out
