"""Streaming reader: shards → training batches (docs/architecture.md, "Batches"), exactly resumable.

The chain of small picklable stages, per DataLoader worker:

    plan (shards.plan)  →  fetch (tar offset index: json, mp4, jpg)  →  join caption sidecar
    →  sample frame indices  →  decode only those frames (resize in the same pass)
    →  data.audio: decode the m4a member to a log-mel window (shards/audio.py)
    →  tokenize  →  collate (uint8 pixels, channels-last, stacked into shared memory)

and one stage in the consuming process, on the device the model runs on:

    →  normalise (uint8 [..., H, W, 3] → CLIP-normalised [..., 3, H, W] in the model's dtype) (shards/pixels.py)

Workers hand over uint8 pixels: 4× fewer bytes through shared memory, pinning and the
host→device copy than float32, and the per-pixel arithmetic (about 40% of a worker's CPU
time when it ran there; docs/benchmarks.md) runs on the GPU instead of data-loading cores.

Only mp4/jpg/json/txt/m4a members are ever read, and nothing is unpickled. Each
batch carries the stream position after it; `StreamLoader.state_dict()` is the
position after the last batch handed to the caller, and `load_state_dict`
continues from there with no sample repeated or skipped, for any number of
workers, at a cost independent of the position.
"""
from __future__ import annotations

import collections
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards import storage
from shards.captions import read_sidecar, sidecar_path
from shards.config import DataConfig
from shards.pixels import (CLIP_MEAN, CLIP_STD, normalise, normalise_pixels, stack_pixels,  # noqa: F401
                           to_model_input)
from shards.plan import Lead, Position, RankPlan, ShardSet, redeal, too_few_shards
from shards.shardset import check_resize, load_shardset, stored_aspect  # noqa: F401  (part of the reader's API)
from shards.tarindex import TarReader
from shards.video import decode_frames, decode_jpeg, sample_indices

log = logging.getLogger(__name__)

STATE_VERSION = 1
# read-time events whose sample is still yielded (a short clip repeats frames): not a lost sample
KEPT_EVENTS = frozenset({"short_clip_padded", "corrupt_audio"})   # corrupt_audio: kept without its sound


def io_options(cfg: DataConfig) -> storage.IOOptions:
    """The reader's storage settings (`data.io_*`)."""
    return storage.IOOptions(timeout=cfg.io_timeout, retries=cfg.io_retries, backoff=cfg.io_backoff,
                             concurrency=cfg.io_concurrency)


# --------------------------------------------------------------------------- stages
class _Tokenizer:
    """open_clip tokenizer, created lazily in each worker (not pickled)."""

    def __init__(self, name: str, context_length: int):
        self.name, self.context_length = name, context_length
        self._tok = None

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self._tok is None:
            import open_clip
            self._tok = open_clip.get_tokenizer(self.name, context_length=self.context_length)
        return self._tok(texts, context_length=self.context_length)

    def __getstate__(self):
        return {"name": self.name, "context_length": self.context_length, "_tok": None}


class SampleError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class _OpenShard:
    reader: TarReader
    captions: dict


class ClipStream(IterableDataset):
    """Batches for one rank; DataLoader worker w yields batches w, w+W, … of the rank's stream.

    Its batches carry raw pixels (`video` uint8 [B, T, H, W, 3], `frame` uint8 [B, H, W, 3]);
    `StreamLoader` turns them into the model's input (docs/architecture.md, "Batches") where the model runs."""

    def __init__(self, cfg: DataConfig, shards: ShardSet, rank: int = 0, world: int = 1,
                 start: Position = Position(), lead: Lead | None = None):
        self.cfg, self.shards, self.rank, self.world, self.start = cfg, shards, rank, world, start
        self.plan = RankPlan(shards, rank, world, cfg.seed, shuffle=cfg.train, shuffle_shards=cfg.shuffle_shards,
                             lead=lead)
        self.tokenize = _Tokenizer(cfg.tokenizer, cfg.context_length)
        self.tokenize(["warm up"])  # import open_clip once here; forked workers inherit it
        self.captions_dir = cfg.captions or storage.join(shards.root, "captions")
        self.io_opts = io_options(cfg)
        self._open: OrderedDict = OrderedDict()

    # -- shard access (LRU of open tars + their caption sidecars; a batch at a group boundary
    #    spans two groups, so two groups' shards stay open)
    def _shard(self, sid: int) -> _OpenShard:
        if sid in self._open:
            self._open.move_to_end(sid)
            return self._open[sid]
        name = self.shards.names[sid]
        reader = TarReader(storage.join(self.shards.root, name), self.io_opts, self.cfg.io_coalesce_bytes)
        caps = read_sidecar(sidecar_path(self.captions_dir, name), self.io_opts) if reader.is_open else {}
        self._open[sid] = _OpenShard(reader, caps)
        while len(self._open) > 2 * self.cfg.shuffle_shards + 1:
            _, old = self._open.popitem(last=False)
            old.reader.close()
        return self._open[sid]

    def prefetch(self, items: list) -> None:
        """Read a batch's members shard by shard, few coalesced range requests each (remote shards;
        local ones are read member by member from the page cache). A failure stays with its
        members: `load_sample` meets it and counts the sample."""
        by_shard: dict = {}
        for _, sid, idx in items:
            by_shard.setdefault(sid, []).append(idx)
        ranges = failed = 0
        for sid, idxs in by_shard.items():
            try:
                reader = self._shard(sid).reader
            except PermissionError:
                raise
            except Exception as e:       # a caption sidecar that cannot be read: load_sample meets it again
                log.debug("prefetch: %s: %s", self.shards.names[sid], e)
                continue
            keys = reader.index.keys
            exts = ("mp4", "jpg", "json", "txt") + (("m4a",) if self.cfg.audio else ())   # not sound nobody decodes
            ranges += reader.prefetch([keys[i] for i in idxs if i < len(keys)], exts)
            failed += reader.failed
        if ranges and failed == ranges:  # the store is down, not one member unreadable: stop, do not
            raise storage.RemoteIOError(  # skip a whole epoch sample by sample
                f"{storage.display(self.shards.root)}: every read of a batch", "failure", self.cfg.io_retries + 1,
                RuntimeError(f"all {ranges} range requests failed after {self.cfg.io_retries} retries each"))

    def release(self) -> None:
        for shard in self._open.values():
            shard.reader.release()

    # -- one sample
    def load_sample(self, epoch: int, sid: int, idx: int, events: list) -> dict:
        cfg = self.cfg
        shard = self._shard(sid)
        keys = shard.reader.index.keys
        if shard.reader.index.missing:
            raise SampleError("missing_shard", f"{self.shards.names[sid]}#{idx}: {shard.reader.index.error}")
        if idx >= len(keys):
            raise SampleError("missing_sample", f"{self.shards.names[sid]}#{idx}: "
                              f"{shard.reader.index.error or 'fewer samples than shards.json says'}")
        key = keys[idx]
        try:
            meta = json.loads(shard.reader.read(key, "json").decode("utf-8"))
            mp4 = shard.reader.read(key, "mp4")
            jpg = shard.reader.read(key, "jpg")
        except (KeyError, EOFError, UnicodeDecodeError, json.JSONDecodeError, OSError) as e:
            raise SampleError("corrupt_member", f"{key}: {e}") from None
        if cfg.resize == "crop" and meta.get("aspect") == "square":   # shards without build_config.yaml
            raise ValueError(f"{key}: clips stored square (build.aspect=square) were already squashed; "
                             "data.resize=crop would crop a distorted image: use data.resize=squash")
        rng = np.random.default_rng([cfg.seed, epoch, 7, sid, idx])
        n = int(meta.get("num_frames") or 0)
        if n <= 0:
            raise SampleError("corrupt_member", f"{key}: json says {n} frames")
        if n < cfg.num_frames:
            events.append(("short_clip_padded", key, f"{n} frames < T={cfg.num_frames}: frames repeated"))
        indices = sample_indices(n, cfg.num_frames, cfg.train, rng)
        try:
            frames = decode_frames(mp4, indices, cfg.image_size, cfg.resize, fps=meta.get("fps"),
                                   keyframe_interval=meta.get("keyframe_interval"), threads=cfg.decode_threads)
            frame = decode_jpeg(jpg, cfg.image_size, cfg.resize)
        except Exception as e:  # av.error.*, PIL errors: a corrupt member never kills the stream
            raise SampleError("corrupt_member", f"{key}: {type(e).__name__}: {e}") from None
        subtitle = meta.get("subtitle")
        if not isinstance(subtitle, str) or not subtitle.strip():
            raise SampleError("missing_subtitle", key)
        sample = {"key": key, "frames": frames, "frame": frame, "subtitle": subtitle,
                  "caption": shard.captions.get(key)}
        if cfg.audio:   # after the frame draws: the video sampling is the same with or without audio
            sample["audio"], sample["audio_mask"] = self.load_audio(shard, key, meta, rng, events)
        return sample

    def load_audio(self, shard: _OpenShard, key: str, meta: dict, rng, events: list):
        """log-mel [n_mels, F] + frame mask [F] of the clip's audio (all padding without audio: a
        clip whose audio member is missing or corrupt keeps its video, the event counted)."""
        from shards.audio import empty_window, stored_window
        if meta.get("has_audio"):
            try:
                return stored_window(shard.reader.read(key, "m4a"), meta, self.cfg, rng)
            except Exception as e:  # KeyError, EOFError, av errors: the clip stays, without audio
                events.append(("corrupt_audio", key, f"{type(e).__name__}: {e}"))
        return empty_window(self.cfg)

    # -- batches
    def collate(self, samples: list[dict]) -> dict:
        captions = [s["caption"] for s in samples]
        has_caption = torch.tensor([c is not None for c in captions], dtype=torch.bool)
        cap_tokens = self.tokenize([c if c is not None else "" for c in captions])
        cap_tokens[~has_caption] = 0  # no placeholder text: rows without a caption are all padding
        return {
            "video": stack_pixels([s["frames"] for s in samples]),          # [B, T, H, W, 3] uint8
            "frame": stack_pixels([s["frame"] for s in samples]),           # [B, H, W, 3] uint8
            "subtitle": self.tokenize([s["subtitle"] for s in samples]),     # [B, L]
            "caption": cap_tokens,                                          # [B, L]
            "has_caption": has_caption,                                     # [B]
            "key": [s["key"] for s in samples],
            **({"audio": torch.from_numpy(np.stack([s["audio"] for s in samples])),        # [B, n_mels, F]
                "audio_mask": torch.from_numpy(np.stack([s["audio_mask"] for s in samples])),  # [B, F]
                "has_audio": torch.tensor([bool(s["audio_mask"].any()) for s in samples])}  # [B]
               if self.cfg.audio else {}),
        }

    def __iter__(self):
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info else (0, 1)
        B = self.cfg.batch_size
        single = not self.cfg.train
        b = w
        while True:
            pos = self.plan.advance(self.start, b * B)
            if single and pos.epoch != self.start.epoch:
                return
            items = self.plan.take(pos, B, single_epoch=single)
            if not items:
                return
            events: list = []
            samples = []
            io0 = storage.snapshot()
            try:
                self.prefetch(items)
                for epoch, sid, idx in items:
                    try:
                        samples.append(self.load_sample(epoch, sid, idx, events))
                    except SampleError as e:
                        events.append((e.reason, f"{self.shards.names[sid]}#{idx}", e.detail))
            finally:
                self.release()
            after = self.plan.advance(pos, len(items))
            batch = self.collate(samples) if samples else {"key": []}
            batch["_state"] = {"epoch": after.epoch, "offset": after.offset}
            batch["_events"] = events
            batch["_io"] = storage.delta(io0)
            yield batch
            b += W


def _worker_init(_: int) -> None:
    """One compute thread per worker: parallelism comes from the workers themselves.

    Workers ignore SIGTERM/SIGINT: a scheduler preempting the job signals every process,
    and the trainer must be able to finish its checkpoint with its workers alive (they
    exit on their own when the main process goes away)."""
    import signal
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StreamLoader:
    """Iterates a rank's batches through a DataLoader; tracks and restores the stream position.

    Batches follow docs/architecture.md, "Batches" (`video` [B, T, 3, H, W] and `frame` [B, 3, H, W] CLIP-normalised)
    on `device` (default: CPU) with pixels in `dtype`; workers send uint8 and the normalisation
    runs on that device. state_dict() → {"epoch", "offset", "batches", ...}: small, stored in
    checkpoints. Also counts read-time problems by reason (`events`) and the time spent waiting.

    0-sample shards are dropped from the shard set; a set with fewer (non-empty) shards than
    ranks is refused here, on every rank alike (ValueError naming the counts: a config problem),
    so every rank has samples in every epoch and, in training, yields a batch for every step.
    """

    def __init__(self, cfg: DataConfig, rank: int = 0, world: int = 1, pin_memory: bool = False,
                 shards: ShardSet | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        self.cfg, self.rank, self.world, self.pin_memory = cfg, rank, world, pin_memory
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.shards = (shards or load_shardset(cfg.shards, io_options(cfg))).without_empty()   # 0-sample shards never planned
        if not self.shards.names:
            raise ValueError(f"every shard in {self.shards.root} is empty: nothing to read")
        if len(self.shards.names) < world:   # every rank must read ≥ 1 shard per epoch: a config problem
            raise ValueError(too_few_shards(self.shards, world))
        check_resize(self.shards.root, cfg.resize, io_options(cfg))   # at open time, not on every sample
        self.position = Position()
        self.lead: Lead | None = None        # an elastic resume's re-dealt rest (shards.plan)
        self.batches = 0
        self.events: collections.Counter = collections.Counter()
        self.wait_seconds = 0.0
        self.io: collections.Counter = collections.Counter()   # storage requests, bytes, retries (shards/storage.py)
        self._warned: collections.Counter = collections.Counter()

    def dataset(self) -> ClipStream:
        return ClipStream(self.cfg, self.shards, self.rank, self.world, start=self.position, lead=self.lead)

    def __iter__(self):
        ds = self.dataset()
        kw = {"prefetch_factor": self.cfg.prefetch_factor} if self.cfg.num_workers > 0 else {}
        loader = DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                            pin_memory=self.pin_memory, worker_init_fn=_worker_init, **kw)
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait_seconds += time.perf_counter() - t0
            state = batch.pop("_state")
            self.io.update(batch.pop("_io", {}))
            for reason, what, detail in batch.pop("_events"):
                self.events[reason] += 1
                self._warned[reason] += 1
                if self._warned[reason] <= 20:
                    log.warning("data [%s] %s: %s", reason, what, detail)
            self.position = Position(int(state["epoch"]), int(state["offset"]))
            self.batches += 1
            if not batch["key"]:
                continue  # every sample of this batch was bad (counted above)
            yield to_model_input(batch, self.device, self.dtype)

    @property
    def epoch(self) -> int:
        return self.position.epoch

    def state_dict(self) -> dict:
        lead = self.lead.to_dict() if self.lead is not None and self.position.epoch <= self.lead.epoch else None
        return {"version": STATE_VERSION, "epoch": self.position.epoch, "offset": self.position.offset,
                "batches": self.batches, "seed": self.cfg.seed, "rank": self.rank, "world": self.world,
                "batch_size": self.cfg.batch_size, "num_shards": len(self.shards.names),
                "shard_set": self.shards.fingerprint(), "lead": lead, "events": dict(self.events)}

    def _check_same_stream(self, state: dict, keys: tuple) -> None:
        """Refuse a state whose sample order this loader cannot continue (names what differs)."""
        expect = {"seed": self.cfg.seed, "world": self.world, "rank": self.rank,
                  "num_shards": len(self.shards.names), "shard_set": self.shards.fingerprint()}
        for k in keys:
            v = expect[k]
            if k in state and state[k] != v:
                hint = ""
                if k == "num_shards" and self.shards.empty and state[k] == v + len(self.shards.empty):
                    hint = (f" (the saved plan counted the set's {len(self.shards.empty)} empty shards, which "
                            "are now dropped from the shard set, so the sample order differs)")
                if k == "shard_set":
                    hint = " (shard names or sample counts differ from the set the run started on)"
                raise ValueError(f"data state was saved with {k}={state[k]}, this run has {k}={v}: "
                                 f"the stream cannot continue exactly{hint}")

    def load_state_dict(self, state: dict) -> None:
        self._check_same_stream(state, ("seed", "world", "rank", "num_shards", "shard_set"))
        self.position = Position(int(state["epoch"]), int(state["offset"]))
        self.lead = Lead.from_dict(state.get("lead"))
        self.batches = int(state.get("batches", 0))
        self.events = collections.Counter(state.get("events", {}))

    def load_redealt(self, states: list[dict]) -> None:
        """Elastic resume: continue from the data states of all N ranks of a run (any N, in rank
        order) on this loader's world. In the epochs the old ranks were in, every sample they had
        not consumed is read exactly once by the new ranks and no consumed one again; then the plan
        for this world (shards.plan.redeal). The same seed and shard set are required."""
        if [int(s.get("rank", i)) for i, s in enumerate(states)] != list(range(len(states))):
            raise ValueError("data states of an elastic resume must be every old rank's, in rank order")
        n = len(states)
        if len(self.shards.names) < n:
            raise ValueError(too_few_shards(self.shards, n))
        for st in states:
            self._check_same_stream(st, ("seed", "num_shards", "shard_set"))
            if int(st.get("world", n)) != n:
                raise ValueError(f"data state of rank {st.get('rank')} says world {st['world']}, {n} states given")
        kw = {"seed": self.cfg.seed, "shuffle": self.cfg.train, "shuffle_shards": self.cfg.shuffle_shards}
        plans = [RankPlan(self.shards, r, n, lead=Lead.from_dict(st.get("lead")), **kw) for r, st in enumerate(states)]
        positions = [Position(int(st["epoch"]), int(st["offset"])) for st in states]
        leads, start = redeal(plans, positions, self.world)
        self.lead, self.position = leads[self.rank], start
        self.batches = max(int(st.get("batches", 0)) for st in states)
        # read-problem counts of the whole old world go to new rank 0, so the run's totals are kept
        self.events = collections.Counter()
        if self.rank == 0:
            for st in states:
                self.events.update(st.get("events", {}))


def stream_report(cfg: DataConfig, num_batches: int = 10) -> str:
    """Stream a few batches (rank 0 of 1) and describe them: shapes and clips/s."""
    loader = StreamLoader(cfg)
    t0 = time.perf_counter()
    n = clips = 0
    shapes = {}
    for batch in loader:
        if n == 0:
            shapes = {k: tuple(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            t_first = time.perf_counter() - t0
        clips += len(batch["key"])
        n += 1
        if n >= num_batches:
            break
    dt = time.perf_counter() - t0
    lines = [f"shards: {len(loader.shards.names)} ({loader.shards.num_samples} samples) in {cfg.shards}",
             f"batches: {n}, clips: {clips}, {clips / dt:.1f} clips/s ({cfg.num_workers} workers; "
             f"first batch after {t_first:.2f}s)"]
    lines += [f"  {k}: {v}" for k, v in shapes.items()]
    if loader.events:
        lines.append(f"read problems: {dict(loader.events)}")
    if storage.is_remote(cfg.shards) and n:
        io = loader.io
        lines.append(f"storage: {io['requests'] / n:.1f} requests and {io['bytes'] / n / 1e6:.2f} MB per batch, "
                     f"{io['retries']} retries, {io['failed']} failed reads")
    lines.append(f"resume state: {loader.state_dict()}")
    return "\n".join(lines)
