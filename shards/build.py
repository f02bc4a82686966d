"""`vip shards build`: metadata + subtitles + source videos → webdataset shards.

One output shard is one unit of work (`build_one_shard`), run over local
processes or Ray tasks by the same code. `build.out` is a local folder or object storage
(s3://, gs://: shards/storage.py). A shard is published as its member index, then its tar,
then its part record (`_parts/shard-%06d.json`: manifest rows + skips), the shard's commit
marker: a shard is done when its tar and its part record exist; re-running skips done shards
(found with two listings, not a request per shard) and rebuilds the rest. At the end the parts are merged into `manifest.parquet` and
`shards.json` (per-shard sample counts the reader plans with), and the skips recorded in
the parts of shards done by an earlier run join the summary: a re-run reports the same skip
counts as the first run.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import yaml

from shards import storage
from shards.audio import AudioMissing, cut_audio
from shards.encode import ClipError, StoredFormat, cut_clip, open_source
from shards.keys import shard_name
from shards.metadata import ClipRecord, SkipLog, chunk, iter_clips, load_subtitles
from shards.writer import ShardWriter
from shards.config import ShardBuildConfig

log = logging.getLogger(__name__)
PARTS = "_parts"


@dataclass(frozen=True)
class ShardTask:
    index: int
    clips: tuple
    out: str
    videos: str
    fmt: StoredFormat
    staging: str | None = None      # local folder for shards bound for object storage


@dataclass
class ShardResult:
    index: int
    written: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skips: dict = field(default_factory=dict)       # SkipLog.to_dict()
    error: str | None = None                        # the whole shard failed
    audio: dict = field(default_factory=dict)       # with_audio / audio_short / written without: reason → n
    node: str | None = None                         # the Ray node that built it (None: a local process)


def part_path(out: str | Path, index: int) -> str:
    return storage.join(str(out), PARTS, f"shard-{index:06d}.json")


def is_done(out: str | Path, index: int) -> bool:
    return storage.exists(storage.join(str(out), shard_name(index))) and storage.exists(part_path(out, index))


def done_shards(out: str) -> set[int]:
    """Indices of the shards done in `out` (tar and commit marker present): two listings."""
    tars = {n for n in storage.listdir(out) or [] if n.startswith("shard-") and n.endswith(".tar")}
    parts = storage.listdir(storage.join(out, PARTS)) or []
    return {int(n[6:12]) for n in parts if n.startswith("shard-") and n.endswith(".json")
            and n[:-5] + ".tar" in tars and n[6:12].isdigit()}


def _sample_json(rec: ClipRecord, clip, fmt: StoredFormat) -> dict:
    return {
        "clip_id": rec.clip_id, "video_id": rec.video_id, "key": rec.key,
        "span": [round(clip.span[0], 3), round(clip.span[1], 3)],
        "requested_span": [round(rec.start, 3), round(rec.end, 3)],
        "subtitle": rec.subtitle, "fps": clip.fps, "num_frames": clip.num_frames,
        "width": clip.width, "height": clip.height, "duration": round(clip.duration, 4),
        "truncated": clip.truncated, "codec": "h264", "keyframe_interval": fmt.keyframe_interval,
        "aspect": fmt.aspect, "format": dataclasses.asdict(fmt), "has_audio": False,
    }


def _clip_audio(path: str, clip, fmt: StoredFormat, meta: dict, counts: collections.Counter):
    """The clip's m4a bytes (or None: written without audio, the reason counted and in the json)."""
    if not fmt.audio:
        return None
    try:
        a = cut_audio(path, clip.span[0], clip.span[1], fmt.audio_rate, fmt.audio_bitrate)
    except AudioMissing as e:
        counts[e.reason] += 1
        meta["audio_missing"] = e.reason
        return None
    except Exception as e:  # a codec surprise costs the audio, never the clip
        counts["audio_decode_error"] += 1
        meta["audio_missing"] = "audio_decode_error"
        log.info("audio of %s: %s: %s", meta["clip_id"], type(e).__name__, e)
        return None
    counts["with_audio"] += 1
    counts["audio_short"] += int(a.short)
    meta["has_audio"] = True
    meta["audio"] = {"codec": "aac", "container": "mp4", "rate": a.rate, "channels": 1,
                     "num_samples": a.num_samples, "seconds": round(a.num_samples / a.rate, 4), "short": a.short}
    return a.m4a


def build_one_shard(task: ShardTask) -> ShardResult:
    """Cut, encode and write every clip of one shard; bad clips are skipped and counted."""
    t0 = time.perf_counter()
    skips = SkipLog()
    audio_counts: collections.Counter = collections.Counter()
    rows = []
    res = ShardResult(index=task.index)
    try:
        by_video: dict[str, list[ClipRecord]] = collections.defaultdict(list)
        for rec in task.clips:
            by_video[rec.video_id].append(rec)
        out = task.out
        with ShardWriter(storage.join(out, shard_name(task.index)), staging=task.staging) as writer:
            for vid, recs in by_video.items():
                path = os.path.join(task.videos, f"{vid}.mp4")
                try:
                    src = open_source(path)
                except ClipError as e:
                    for r in recs:
                        skips.add(e.reason, r.clip_id, e.detail)
                    continue
                try:
                    for rec in sorted(recs, key=lambda r: r.start):
                        try:
                            clip = cut_clip(src, rec.start, rec.end, task.fmt)
                        except ClipError as e:
                            skips.add(e.reason, rec.clip_id, e.detail)
                            continue
                        except Exception as e:  # a codec surprise must not kill the shard
                            skips.add("encode_error", rec.clip_id, f"{type(e).__name__}: {e}")
                            continue
                        if clip.truncated:
                            log.info("clip %s: span runs past the video end; kept %.2fs", rec.clip_id, clip.duration)
                        meta = _sample_json(rec, clip, task.fmt)
                        m4a = _clip_audio(path, clip, task.fmt, meta, audio_counts)
                        writer.add(rec.key, {"mp4": clip.mp4, "jpg": clip.jpg, "json": meta,
                                             **({"m4a": m4a} if m4a else {})})
                        rows.append({"shard": shard_name(task.index), "key": rec.key, "clip_id": rec.clip_id,
                                     "video_id": rec.video_id, "duration": meta["duration"],
                                     "num_frames": clip.num_frames,
                                     "bytes": len(clip.mp4) + len(clip.jpg) + len(m4a or b""),
                                     "truncated": clip.truncated, "has_audio": m4a is not None})
                finally:
                    src.close()
            res.written, res.bytes = writer.count, writer.bytes
            res.skips = skips.to_dict()
            res.audio = dict(audio_counts)
        # the commit marker, last: the shard's tar and index are already published
        storage.write_text(part_path(out, task.index), json.dumps(
            {"rows": rows, "skips": res.skips, "audio": res.audio, "tar_bytes": writer.tar_bytes}))
    except Exception as e:
        log.error("shard %d failed: %s: %s", task.index, type(e).__name__, e)
        res.error = f"{type(e).__name__}: {e}"
        res.skips = skips.to_dict()
    res.seconds = time.perf_counter() - t0
    return res


@dataclass
class BuildSummary:
    shards_total: int = 0
    shards_built: int = 0
    shards_already_done: int = 0
    shards_failed: int = 0
    shards_empty: int = 0                 # every clip skipped: listed with 0 samples, dropped by the reader
    clips_written: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    skips: SkipLog = field(default_factory=SkipLog)
    failures: list = field(default_factory=list)
    audio: collections.Counter = field(default_factory=collections.Counter)   # ShardResult.audio, summed
    nodes: collections.Counter = field(default_factory=collections.Counter)   # Ray node id → shards built

    @property
    def clips_per_s(self) -> float:
        return self.clips_written / self.seconds if self.seconds > 0 else 0.0

    def table(self) -> str:
        lines = ["| build summary | |", "|---|---|",
                 f"| shards built / already done / failed | {self.shards_built} / {self.shards_already_done} / {self.shards_failed} |",
                 f"| clips written (this run) | {self.clips_written} |",
                 f"| bytes written | {self.bytes_written / 1e6:.1f} MB |",
                 f"| time | {self.seconds:.1f} s |",
                 f"| clips/s | {self.clips_per_s:.1f} |",
                 f"| clips skipped | {self.skips.total} |"]
        for reason, n in sorted(self.skips.counts.items()):
            lines.append(f"| skipped: {reason} | {n} |")
        if self.audio:
            lines.append(f"| clips with audio (this run) | {self.audio.get('with_audio', 0)} |")
            for reason, n in sorted(self.audio.items()):
                if reason != "with_audio" and n:
                    what = "audio kept, shorter than the span" if reason == "audio_short" else \
                        f"written without audio: {reason}"
                    lines.append(f"| {what} | {n} |")
        if self.shards_empty:
            lines.append(f"| empty shards (every clip skipped; the reader drops them) | {self.shards_empty} |")
        if len(self.nodes) > 1:
            per_node = ", ".join(f"{n[:8]}: {c}" for n, c in self.nodes.most_common())
            lines.append(f"| shards built per Ray node | {per_node} |")
        for f in self.failures:
            lines.append(f"| FAILED shard | {f} |")
        return "\n".join(lines)


def plan_tasks(cfg: ShardBuildConfig, skips: SkipLog) -> Iterator[ShardTask]:
    """Stream shard tasks in shard order (clips in metadata order, `clips_per_shard` each)."""
    subtitles = load_subtitles(cfg.subtitles, skips)
    fmt = StoredFormat.from_config(cfg)
    for index, clips in enumerate(chunk(iter_clips(cfg.metadata, subtitles, skips), cfg.clips_per_shard)):
        if cfg.limit_shards is not None and index >= cfg.limit_shards:
            return
        yield ShardTask(index=index, clips=tuple(clips), out=cfg.out, videos=cfg.videos, fmt=fmt,
                        staging=cfg.staging)


class _LocalPool:
    """Local processes (spawned: safe with codec threads)."""

    def __init__(self, workers: int):
        import multiprocessing as mp
        self.pool = ProcessPoolExecutor(max_workers=max(1, workers), mp_context=mp.get_context("spawn"))
        self.slots = max(1, workers) * 2

    def submit(self, task):
        return self.pool.submit(build_one_shard, task)

    def wait_any(self, pending):
        done, rest = wait(pending, return_when=FIRST_COMPLETED)
        return [(f, f.result()) for f in done], rest

    def close(self):
        self.pool.shutdown()


def _build_on_ray(task: ShardTask) -> ShardResult:
    """build_one_shard as a Ray task, naming the node it ran on."""
    import ray
    res = build_one_shard(task)
    res.node = ray.get_runtime_context().get_node_id()
    return res


class _RayPool:
    """Ray tasks on an existing (multi-node) cluster (address) or a private local one ('local').

    Tasks are spread over the nodes. A task lost with its node (node killed, pre-empted, out of
    memory) is run again by Ray on a live node, up to `RETRIES` times; a shard is written
    atomically (tar and part record published by rename), so a repeat overwrites it whole and a
    shard is never half there nor listed twice. Every node must see `build.out` and the videos
    (a shared file system)."""

    RETRIES = 4

    def __init__(self, address: str, workers: int):
        import ray
        self.ray = ray
        if not ray.is_initialized():
            if address == "local":
                # a private cluster on loopback only ("local": never join another cluster on this machine)
                ray.init(address="local", num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False,
                         _node_ip_address="127.0.0.1")
            else:
                ray.init(address=address, log_to_driver=False)
        self.remote = ray.remote(num_cpus=1, max_retries=self.RETRIES, scheduling_strategy="SPREAD")(_build_on_ray)
        self.slots = max(2, int(ray.cluster_resources().get("CPU", workers)) * 2)

    def submit(self, task):
        return self.remote.remote(task)

    def wait_any(self, pending):
        done, rest = self.ray.wait(list(pending), num_returns=1)
        out = []
        for ref in done:
            try:
                out.append((ref, self.ray.get(ref)))
            except Exception as e:  # lost more often than RETRIES (or its code died): count the shard failed
                out.append((ref, ShardResult(index=-1, error=f"{type(e).__name__}: {e}")))
        return out, set(rest)

    def close(self):
        pass


def build_shards(cfg: ShardBuildConfig,
                 on_shard_done: Callable[[BuildSummary, ShardResult], None] | None = None) -> BuildSummary:
    """Build every shard not already done; merge the manifest; return the summary.
    `on_shard_done(summary, result)` is called after each shard (progress hooks, fault drills)."""
    from tqdm import tqdm
    t0 = time.perf_counter()
    out = storage.check_url(cfg.out)
    storage.makedirs(out)
    storage.write_text(storage.join(out, "build_config.yaml"), yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    done = done_shards(out)
    summary = BuildSummary()
    pool = _RayPool(cfg.ray_address, cfg.workers) if cfg.ray_address else _LocalPool(cfg.workers)
    pending: dict = {}
    done_before: list[int] = []          # shards an earlier run finished: their skips are in their parts
    bar = tqdm(desc="shards", unit="shard", dynamic_ncols=True)
    try:
        def drain(block_until: int):
            while len(pending) > block_until:
                done, _ = pool.wait_any(set(pending))
                for fut, result in done:
                    index = pending.pop(fut)
                    result.index = index
                    _account(summary, result)
                    if on_shard_done is not None:
                        on_shard_done(summary, result)
                    bar.update(1)
                    el = time.perf_counter() - t0
                    bar.set_postfix(clips=summary.clips_written, clips_s=f"{summary.clips_written / el:.1f}")
        for task in plan_tasks(cfg, summary.skips):
            summary.shards_total += 1
            if task.index in done:
                summary.shards_already_done += 1
                done_before.append(task.index)
                bar.update(1)
                continue
            pending[pool.submit(task)] = task.index
            drain(pool.slots)
        drain(0)
    finally:
        bar.close()
        pool.close()
    _remove_leftovers(out)
    index, part_skips = _merge_parts(out)
    summary.shards_empty = sum(1 for s in index["shards"] if s["num_samples"] == 0)
    for i in done_before:                # video-level skips (missing_video, …) of shards not rebuilt
        summary.skips.merge(_skiplog(part_skips.get(i, {})))
    summary.seconds = time.perf_counter() - t0
    log.info("build: %d shards built, %d already done, %d failed; %d clips, %.1f clips/s, %d skipped",
             summary.shards_built, summary.shards_already_done, summary.shards_failed,
             summary.clips_written, summary.clips_per_s, summary.skips.total)
    return summary


def _remove_leftovers(out: str) -> None:
    """Temporary files of shard attempts that died mid-write (a node lost, kill -9): no reader
    opens them, and once every task has finished no attempt is still writing them. Object
    storage has none: each file is one upload, staged locally (build.staging)."""
    if storage.is_remote(out):
        return
    out = Path(out)
    stale = [*out.glob(".shard-*.tar.*.tmp"), *(out / PARTS).glob(".shard-*.json.*.tmp")]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.info("build: removed %d temporary file(s) of interrupted shard attempts", len(stale))


def _account(summary: BuildSummary, result: ShardResult) -> None:
    if result.error:
        summary.shards_failed += 1
        summary.failures.append(f"{shard_name(result.index)}: {result.error}")
    else:
        summary.shards_built += 1
    if result.node and not result.error:
        summary.nodes[result.node] += 1
    summary.clips_written += result.written
    summary.bytes_written += result.bytes
    summary.skips.merge(_skiplog(result.skips))
    summary.audio.update(result.audio)


def _skiplog(skips: dict) -> SkipLog:
    """A SkipLog from its to_dict() form (a shard result or a part record); nothing is logged again."""
    part = SkipLog()
    part.counts.update(skips.get("counts", {}))
    part.examples = {k: list(v) for k, v in skips.get("examples", {}).items()}
    return part


def merge_manifest(out: str) -> dict:
    """Parts → manifest.parquet (one row per sample) and shards.json (per-shard counts)."""
    return _merge_parts(out)[0]


def _merge_parts(out: str | Path) -> tuple[dict, dict]:
    """merge_manifest, also returning each done shard's recorded skips ({index: SkipLog dict}),
    so that every part is read once."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    out = str(out)
    rows, shards, skips = [], [], {}
    for index in sorted(done_shards(out)):
        data = json.loads(storage.read_bytes(part_path(out, index)))
        name = shard_name(index)
        rows.extend({"has_audio": False, **r} for r in data["rows"])   # parts from before audio: none
        skips[index] = data.get("skips", {})
        tar_bytes = data.get("tar_bytes")         # parts of older builds lack it: ask the store
        if tar_bytes is None:
            tar_bytes = storage.size(storage.join(out, name))
        shards.append({"name": name, "num_samples": len(data["rows"]), "bytes": int(tar_bytes)})
    schema = pa.schema([("shard", pa.string()), ("key", pa.string()), ("clip_id", pa.string()),
                        ("video_id", pa.string()), ("duration", pa.float64()), ("num_frames", pa.int32()),
                        ("bytes", pa.int64()), ("truncated", pa.bool_()), ("has_audio", pa.bool_())])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    storage.write_bytes(storage.join(out, "manifest.parquet"), buf.getvalue())
    index = {"num_samples": len(rows), "shards": shards}
    storage.write_text(storage.join(out, "shards.json"), json.dumps(index))
    return index, skips
