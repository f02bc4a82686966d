"""`vip shards build`: metadata + subtitles + source videos → webdataset shards.

One output shard is one unit of work (`build_one_shard`), run over local
processes or Ray tasks by the same code. A shard is done when its tar and its
part record (`_parts/shard-%06d.json`: manifest rows + skips) exist; re-running
skips done shards. At the end the parts are merged into `manifest.parquet` and
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

from shards.atomic import atomic_path, write_json, write_text
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


@dataclass
class ShardResult:
    index: int
    written: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skips: dict = field(default_factory=dict)       # SkipLog.to_dict()
    error: str | None = None                        # the whole shard failed
    node: str | None = None                         # the Ray node that built it (None: a local process)


def part_path(out: str | Path, index: int) -> Path:
    return Path(out) / PARTS / f"shard-{index:06d}.json"


def is_done(out: str | Path, index: int) -> bool:
    return (Path(out) / shard_name(index)).exists() and part_path(out, index).exists()


def _sample_json(rec: ClipRecord, clip, fmt: StoredFormat) -> dict:
    return {
        "clip_id": rec.clip_id, "video_id": rec.video_id, "key": rec.key,
        "span": [round(clip.span[0], 3), round(clip.span[1], 3)],
        "requested_span": [round(rec.start, 3), round(rec.end, 3)],
        "subtitle": rec.subtitle, "fps": clip.fps, "num_frames": clip.num_frames,
        "width": clip.width, "height": clip.height, "duration": round(clip.duration, 4),
        "truncated": clip.truncated, "codec": "h264", "keyframe_interval": fmt.keyframe_interval,
        "aspect": fmt.aspect, "format": dataclasses.asdict(fmt),
    }


def build_one_shard(task: ShardTask) -> ShardResult:
    """Cut, encode and write every clip of one shard; bad clips are skipped and counted."""
    t0 = time.perf_counter()
    skips = SkipLog()
    rows = []
    res = ShardResult(index=task.index)
    try:
        by_video: dict[str, list[ClipRecord]] = collections.defaultdict(list)
        for rec in task.clips:
            by_video[rec.video_id].append(rec)
        out = Path(task.out)
        with ShardWriter(out / shard_name(task.index)) as writer:
            for vid, recs in by_video.items():
                try:
                    src = open_source(os.path.join(task.videos, f"{vid}.mp4"))
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
                        writer.add(rec.key, {"mp4": clip.mp4, "jpg": clip.jpg, "json": meta})
                        rows.append({"shard": shard_name(task.index), "key": rec.key, "clip_id": rec.clip_id,
                                     "video_id": rec.video_id, "duration": meta["duration"],
                                     "num_frames": clip.num_frames, "bytes": len(clip.mp4) + len(clip.jpg),
                                     "truncated": clip.truncated})
                finally:
                    src.close()
            res.written, res.bytes = writer.count, writer.bytes
            res.skips = skips.to_dict()
            # the part record lands before the tar is renamed into place: tar present ⇒ part present
            write_json(part_path(out, task.index), {"rows": rows, "skips": res.skips})
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
        yield ShardTask(index=index, clips=tuple(clips), out=cfg.out, videos=cfg.videos, fmt=fmt)


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
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "build_config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
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
            if is_done(out, task.index):
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


def _remove_leftovers(out: Path) -> None:
    """Temporary files of shard attempts that died mid-write (a node lost, kill -9): no reader
    opens them, and once every task has finished no attempt is still writing them."""
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


def _skiplog(skips: dict) -> SkipLog:
    """A SkipLog from its to_dict() form (a shard result or a part record); nothing is logged again."""
    part = SkipLog()
    part.counts.update(skips.get("counts", {}))
    part.examples = {k: list(v) for k, v in skips.get("examples", {}).items()}
    return part


def merge_manifest(out: str | Path) -> dict:
    """Parts → manifest.parquet (one row per sample) and shards.json (per-shard counts)."""
    return _merge_parts(out)[0]


def _merge_parts(out: str | Path) -> tuple[dict, dict]:
    """merge_manifest, also returning each done shard's recorded skips ({index: SkipLog dict}),
    so that every part is read once."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    out = Path(out)
    rows, shards, skips = [], [], {}
    for tar in sorted(out.glob("shard-*.tar")):
        index = int(tar.stem.split("-")[1])
        part = part_path(out, index)
        if not part.exists():
            continue
        data = json.loads(part.read_text())
        rows.extend(data["rows"])
        skips[index] = data.get("skips", {})
        shards.append({"name": tar.name, "num_samples": len(data["rows"]), "bytes": tar.stat().st_size})
    schema = pa.schema([("shard", pa.string()), ("key", pa.string()), ("clip_id", pa.string()),
                        ("video_id", pa.string()), ("duration", pa.float64()), ("num_frames", pa.int32()),
                        ("bytes", pa.int64()), ("truncated", pa.bool_())])
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(out / "manifest.parquet") as tmp:
        pq.write_table(table, tmp)
    index = {"num_samples": len(rows), "shards": shards}
    write_json(out / "shards.json", index)
    return index, skips
