"""The captioning job: shards → caption sidecars on a Ray cluster (docs/captioning.md;
docs/architecture.md, "Captioning").

    driver (this process)                         cluster
    ─────────────────────                         ───────
    list shards (shards.json), skip finished ones
    cut each shard into chunks  ──submit──►  load_chunk task (CPU): tar → JPEG → resized uint8
                                ──submit──►  CaptionActor.caption_chunk (GPU or CPU actor)
    collect rows per shard  ◄── rows ──────  (keys, captions, per-clip errors)
    all chunks of a shard in → write captions/shard-%06d.parquet atomically

The unit of bookkeeping is a shard: its sidecar is written once, when every
clip of the shard has a caption or a recorded error, so a sidecar on disk
means "done" and a re-run skips it. Images never pass through the driver: it
holds object refs and caption strings only, and at most
`actors × inflight_per_actor` chunks are in flight. An actor that dies (node
lost, OOM, killed) is replaced and its chunks are resubmitted from the same
decoded images; a chunk's result is accepted once, so no clip is lost or
duplicated. A chunk that fails `max_attempts` times gets null captions with
the error recorded.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from captioning.frames import Chunk, load_chunk, plan_chunks
from shards import storage
from shards.captions import sidecar_path, write_sidecar
from captioning.config import CaptionConfig

log = logging.getLogger("captioning")


# --------------------------------------------------------------------------- actor
class CaptionActor:
    """Holds one captioner (one GPU on a cluster); captions whole chunks, batch by batch."""

    def __init__(self, cfg: CaptionConfig, slot: int = 0, incarnation: int = 0, fault_exit_chunk: int | None = None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        import torch
        if cfg.device == "cpu":
            torch.set_num_threads(max(1, int(cfg.actor_cpus)))
        from captioning.captioners import build_captioner
        self.cfg, self.slot, self.incarnation = cfg, slot, incarnation
        self.fault_exit_chunk = fault_exit_chunk   # fault injection (tests, drills): exit on this chunk
        self.captioner = build_captioner(cfg)
        self.calls = 0

    def info(self) -> dict:
        return {"input_spec": dataclasses.asdict(self.captioner.input_spec),
                "provenance": dataclasses.asdict(self.captioner.provenance), "pid": os.getpid()}

    def caption_chunk(self, meta: dict, images) -> dict:
        """meta/images from load_chunk → {"chunk", "rows": [{key, caption, error}] in tar order, …}."""
        self.calls += 1
        if (self.fault_exit_chunk is not None and self.slot == 0 and self.incarnation == 0
                and self.calls == self.fault_exit_chunk):
            log.error("FAULT INJECTION (fault_exit_chunk=%d): actor 0 exits now", self.calls)
            os._exit(1)
        t0 = time.perf_counter()
        captions: dict = {}
        errors = dict(meta["errors"])
        ok, bs = meta["ok"], max(1, self.cfg.batch_size)
        for i in range(0, len(ok), bs):
            self._caption_batch(ok[i:i + bs], images[i:i + bs], captions, errors)
        rows = []
        for key in meta["keys"]:
            if key in errors:
                rows.append({"key": key, "caption": None, "error": errors[key]})
            elif captions.get(key):
                rows.append({"key": key, "caption": captions[key], "error": None})
            else:
                rows.append({"key": key, "caption": None, "error": "empty_caption: the model generated no text"})
        return {"chunk": meta["chunk"], "rows": rows, "fatal": meta["fatal"], "index_error": meta["index_error"],
                "images": len(ok), "seconds": time.perf_counter() - t0, "node": _node_id()}

    def _caption_batch(self, keys: list, images, captions: dict, errors: dict) -> None:
        """Caption a batch; on an exception (e.g. CUDA OOM) split it in halves down to single images."""
        try:
            texts = self.captioner.caption(images, keys)
        except Exception as e:
            if len(keys) > 1:
                _free_cuda_cache()
                half = len(keys) // 2
                log.warning("batch of %d failed (%s: %s): retrying in halves", len(keys), type(e).__name__, e)
                self._caption_batch(keys[:half], images[:half], captions, errors)
                self._caption_batch(keys[half:], images[half:], captions, errors)
            else:
                errors[keys[0]] = f"caption_error: {type(e).__name__}: {e}"
            return
        captions.update(zip(keys, texts))


def _node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    import ray
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _free_cuda_cache() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- summary
@dataclass
class CaptionSummary:
    """What one run did; `table()` is printed at the end of the job."""

    out: str = ""
    model: str = ""
    model_tag: str = ""
    device: str = ""
    actors: int = 0
    shards_total: int = 0
    shards_already_done: int = 0
    shards_written: int = 0
    shards_failed: int = 0
    clips: int = 0                 # rows written
    captions: int = 0              # rows with a caption
    failures: collections.Counter = field(default_factory=collections.Counter)  # reason → clips (or shards)
    actor_restarts: int = 0
    chunk_retries: int = 0
    nodes: collections.Counter = field(default_factory=collections.Counter)    # Ray node id → clips captioned
    startup_seconds: float = 0.0   # cluster connect + actors loaded
    seconds: float = 0.0

    @property
    def captions_per_s(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_captions_per_s(self) -> float:
        busy = self.seconds - self.startup_seconds
        return self.clips / busy if busy > 0 else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["failures"], d["nodes"] = dict(self.failures), dict(self.nodes)
        d["captions_per_s"], d["steady_captions_per_s"] = self.captions_per_s, self.steady_captions_per_s
        return d

    def table(self) -> str:
        fails = ", ".join(f"{k}: {v}" for k, v in sorted(self.failures.items())) or "none"
        rows = [("sidecars", self.out), ("model", f"{self.model} ({self.model_tag})"),
                ("actors", f"{self.actors} on {self.device}"),
                ("shards", f"{self.shards_total} total, {self.shards_written} written, "
                           f"{self.shards_already_done} already done, {self.shards_failed} failed"),
                ("clips", f"{self.clips} ({self.captions} captioned)"), ("failures", fails),
                ("actor restarts / chunk retries", f"{self.actor_restarts} / {self.chunk_retries}"),
                *([("clips per Ray node", ", ".join(f"{n[:8]}: {c}" for n, c in self.nodes.most_common()))]
                  if len(self.nodes) > 1 else []),
                ("time", f"{self.seconds:.1f} s ({self.startup_seconds:.1f} s startup)"),
                ("captions/s", f"{self.captions_per_s:.2f} overall, {self.steady_captions_per_s:.2f} after startup")]
        return "\n".join(["| caption job | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


# --------------------------------------------------------------------------- driver
@dataclass
class _Call:
    chunk: Chunk
    meta_ref: object
    images_ref: object
    slot: int
    incarnation: int
    attempt: int


@dataclass
class _ShardState:
    count: int
    rows: dict = field(default_factory=dict)   # chunk index → rows
    fatal: Optional[str] = None
    index_error: Optional[str] = None


class CaptionJob:
    """Drives one run. `run(on_chunk_done)` calls the hook (if any) with the job after each chunk."""

    def __init__(self, cfg: CaptionConfig, fault_exit_chunk: int | None = None):
        self.cfg, self.fault_exit_chunk = cfg, fault_exit_chunk
        # sidecar folder: a local folder or a URL (s3://, gs://: shards/storage.py)
        self.out = storage.check_url(cfg.out) if cfg.out else storage.join(cfg.shards, "captions")
        self.summary = CaptionSummary(out=str(self.out))
        self.actors: list = []
        self.incarnations: list[int] = []
        self.load: list[int] = []
        self.slot_nodes: dict[int, str] = {}     # actor slot → the Ray node its last result came from
        self._ray = None

    # -- what is left to do
    def pending_shards(self) -> list[tuple[int, str, int]]:
        """(shard id, name, samples) of every shard without a sidecar."""
        from shards.reader import load_shardset
        shardset = load_shardset(self.cfg.shards)
        names, counts = shardset.names, shardset.counts
        if self.cfg.limit_shards is not None:
            names, counts = names[:self.cfg.limit_shards], counts[:self.cfg.limit_shards]
        self.summary.shards_total = len(names)
        listed = storage.listdir(self.out)                 # one listing, not N requests
        done = set(listed) if listed is not None else {
            n for n in (storage.basename(str(sidecar_path(self.out, name))) for name in names)
            if storage.exists(storage.join(self.out, n))}
        todo = []
        for sid, (name, count) in enumerate(zip(names, counts)):
            if storage.basename(str(sidecar_path(self.out, name))) in done:
                self.summary.shards_already_done += 1
            else:
                todo.append((sid, name, count))
        return todo

    # -- cluster
    def _connect(self) -> bool:
        """Reach the cluster (cfg.ray_address or $RAY_ADDRESS) or start a private one on 127.0.0.1.
        Returns True when this call started Ray (and so must shut it down)."""
        import ray
        self._ray = ray
        if ray.is_initialized():
            return False
        address = self.cfg.ray_address or os.environ.get("RAY_ADDRESS")
        if address and address != "local":
            log.info("connecting to the Ray cluster at %s", address)
            ray.init(address=address)
        else:
            log.info("starting a private local Ray on 127.0.0.1")
            ray.init(address="local", num_cpus=self.cfg.local_cpus or os.cpu_count(), include_dashboard=False,
                     _node_ip_address="127.0.0.1", log_to_driver=False)
        return True

    def _plan_actors(self) -> tuple[CaptionConfig, int]:
        """(config with the device resolved, number of actors) from the cluster's resources."""
        res = self._ray.cluster_resources()
        gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
        device = self.cfg.device if self.cfg.device != "auto" else ("cuda" if gpus else "cpu")
        if device == "cuda":
            if not gpus:
                raise RuntimeError("caption.device=cuda but the cluster has no GPUs")
            n = self.cfg.num_actors or gpus
        else:
            fit = int((cpus - self.cfg.decode_cpus) // max(self.cfg.actor_cpus, 1e-3))
            n = self.cfg.num_actors or max(1, min(8, fit))
            if n * self.cfg.actor_cpus + self.cfg.decode_cpus > cpus:
                log.warning("%d actors × %.1f CPUs leave no CPU for decode tasks on a %.0f-CPU cluster: "
                            "the job can stall (lower caption.num_actors or caption.actor_cpus)",
                            n, self.cfg.actor_cpus, cpus)
        return dataclasses.replace(self.cfg, device=device), n

    def _new_actor(self, cfg: CaptionConfig, slot: int, incarnation: int):
        # spread over the nodes of a multi-node cluster; restarts are ours (_replace_actor: a new
        # actor, wherever there is room, and the dead one's chunks resubmitted from their images)
        if getattr(self, "_actor_cls", None) is None:
            self._actor_cls = self._ray.remote(CaptionActor).options(
                num_cpus=cfg.actor_cpus, num_gpus=1 if cfg.device == "cuda" else 0, max_restarts=0,
                max_task_retries=0, scheduling_strategy="SPREAD")
        return self._actor_cls.remote(cfg, slot, incarnation, self.fault_exit_chunk)

    def _replace_actor(self, slot: int, incarnation: int, why: Exception) -> None:
        if self.incarnations[slot] != incarnation:
            return  # already replaced after another of its calls failed
        self.summary.actor_restarts += 1
        if self.summary.actor_restarts > self.cfg.max_actor_restarts:
            raise RuntimeError(f"{self.summary.actor_restarts} captioner actors died (caption.max_actor_restarts="
                               f"{self.cfg.max_actor_restarts}); last error: {why}")
        log.warning("captioner actor %d died (%s); starting a replacement", slot, str(why).splitlines()[0][:200])
        try:
            self._ray.kill(self.actors[slot], no_restart=True)
        except Exception:
            pass
        self.incarnations[slot] += 1
        self.load[slot] = 0  # the dead actor's other calls come back as failures and are not counted again
        self.actors[slot] = self._new_actor(self._actor_cfg, slot, self.incarnations[slot])

    # -- main loop
    def run(self, on_chunk_done: Callable[["CaptionJob"], None] | None = None) -> CaptionSummary:
        t0 = time.perf_counter()
        todo = self.pending_shards()
        s = self.summary
        if not todo:
            log.info("caption: all %d shards already have sidecars in %s: nothing to do", s.shards_total, self.out)
            s.seconds = time.perf_counter() - t0
            return s
        clips_todo = sum(c for _, _, c in todo)
        log.info("caption: %d shards (%d clips) to do, %d already done → %s",
                 len(todo), clips_todo, s.shards_already_done, self.out)
        started = self._connect()
        try:
            self._actor_cfg, n = self._plan_actors()
            self.actors = [self._new_actor(self._actor_cfg, i, 0) for i in range(n)]
            self.incarnations, self.load = [0] * n, [0] * n
            log.info("caption: waiting for %d captioner actor(s) (%s, %s CPU%s each) to load %s", n,
                     self._actor_cfg.device, self.cfg.actor_cpus,
                     " + 1 GPU" if self._actor_cfg.device == "cuda" else "", self.cfg.model)
            info = self._ray.get(self.actors[0].info.remote())  # surfaces model-loading errors here
            self._ray.get([a.info.remote() for a in self.actors[1:]])
            s.startup_seconds = time.perf_counter() - t0
            prov = info["provenance"]
            self.provenance = prov
            s.model, s.model_tag, s.device, s.actors = prov["model"], prov["model_tag"], self._actor_cfg.device, n
            log.info("caption: %d actor(s) on %s ready after %.1fs: %s (%s), %s",
                     n, s.device, s.startup_seconds, s.model, s.model_tag, json.dumps(prov["generation"]))
            self._loop(todo, info["input_spec"], clips_todo, on_chunk_done)
            s.seconds = time.perf_counter() - t0
        finally:
            for a in self.actors:
                try:
                    self._ray.kill(a, no_restart=True)
                except Exception:
                    pass
            if started:
                self._ray.shutdown()
        self._record()
        log.info("caption: %d shards written, %d failed; %d clips, %d captioned, %.2f captions/s; failures %s",
                 s.shards_written, s.shards_failed, s.clips, s.captions, s.captions_per_s, dict(s.failures) or "none")
        return s

    def _loop(self, todo, spec: dict, clips_todo: int, hook) -> None:
        from ray.exceptions import RayActorError, RayError
        from tqdm import tqdm
        ray, cfg, s = self._ray, self.cfg, self.summary
        loader = ray.remote(load_chunk).options(num_cpus=cfg.decode_cpus, num_returns=2, max_retries=3)
        chunks = (c for sid, name, count in todo
                  for c in plan_chunks(sid, name, storage.join(cfg.shards, name), count, cfg.chunk_size))
        retry: collections.deque = collections.deque()
        calls: dict = {}
        self.states: dict[int, _ShardState] = {}
        cap = max(1, len(self.actors) * max(1, cfg.inflight_per_actor))
        bar = tqdm(total=clips_todo, unit="clip", desc="caption", dynamic_ncols=True, mininterval=1.0)
        t_loop = time.perf_counter()
        try:
            while True:
                while len(calls) < cap:
                    if retry:
                        chunk, meta_ref, images_ref, attempt = retry.popleft()
                    else:
                        chunk = next(chunks, None)
                        if chunk is None:
                            break
                        meta_ref, images_ref = loader.remote(chunk, spec["size"], spec["resize"])
                        attempt = 1
                    slot = min(range(len(self.actors)), key=lambda i: self.load[i])
                    ref = self.actors[slot].caption_chunk.remote(meta_ref, images_ref)
                    self.load[slot] += 1
                    calls[ref] = _Call(chunk, meta_ref, images_ref, slot, self.incarnations[slot], attempt)
                if not calls:
                    break
                ready, _ = ray.wait(list(calls), num_returns=1)
                for ref in ready:
                    call = calls.pop(ref)
                    if call.incarnation == self.incarnations[call.slot]:
                        self.load[call.slot] -= 1
                    try:
                        result = ray.get(ref)
                        if result.get("node"):
                            self.slot_nodes[call.slot] = result["node"]
                    except RayError as e:
                        if isinstance(e, RayActorError):
                            self._replace_actor(call.slot, call.incarnation, e)
                        if call.attempt < cfg.max_attempts:
                            s.chunk_retries += 1
                            log.warning("chunk %s: attempt %d failed (%s): retrying", call.chunk.name,
                                        call.attempt, type(e).__name__)
                            retry.append((call.chunk, call.meta_ref, call.images_ref, call.attempt + 1))
                            continue
                        result = self._failed_result(call, e)
                    n = self._accept(call.chunk, result)
                    bar.update(n)
                    el = time.perf_counter() - t_loop
                    bar.set_postfix(caps_s=f"{s.clips / el:.1f}", failed=sum(s.failures.values()),
                                    restarts=s.actor_restarts)
                    if hook is not None:
                        hook(self)
        finally:
            bar.close()
        for sid, st in self.states.items():  # only after an abort: shards left unfinished get no sidecar
            log.warning("shard %d left unfinished (%d/%d chunks)", sid, len(st.rows), st.count)

    def _failed_result(self, call: _Call, err: Exception) -> dict:
        """Rows with null captions for a chunk that failed every attempt (its keys come from the decode task)."""
        reason = f"captioner_failed: {type(err).__name__} after {call.attempt} attempts"
        try:
            meta = self._ray.get(call.meta_ref)
        except Exception as e:  # the decode task itself is gone: the shard cannot be finished this run
            return {"chunk": call.chunk.name, "rows": [], "fatal": f"decode_failed: {type(e).__name__}: {e}",
                    "index_error": None}
        rows = [{"key": k, "caption": None, "error": reason} for k in meta["keys"]]
        return {"chunk": call.chunk.name, "rows": rows, "fatal": meta["fatal"], "index_error": meta["index_error"]}

    def _accept(self, chunk: Chunk, result: dict) -> int:
        """Record one chunk's rows (once); write the shard's sidecar when its last chunk is in."""
        st = self.states.setdefault(chunk.shard_id, _ShardState(count=chunk.count))
        if chunk.index in st.rows:
            log.warning("chunk %s: duplicate result ignored", chunk.name)
            return 0
        st.rows[chunk.index] = result["rows"]
        if result.get("node"):
            self.summary.nodes[result["node"]] += len(result["rows"])
        st.fatal = st.fatal or result.get("fatal")
        st.index_error = st.index_error or result.get("index_error")
        if len(st.rows) == st.count:
            del self.states[chunk.shard_id]
            self._finish_shard(chunk, st)
        return len(result["rows"])

    def _finish_shard(self, chunk: Chunk, st: _ShardState) -> None:
        s = self.summary
        if st.fatal:
            s.shards_failed += 1
            s.failures[st.fatal.split(":")[0]] += 1
            log.error("shard %s: %s (no sidecar written; a re-run retries it)", chunk.shard, st.fatal)
            return
        rows = [r for i in range(st.count) for r in st.rows[i]]
        if st.index_error:
            s.failures["tar_truncated"] += 1
            log.warning("shard %s: %s (the %d clips before it are captioned)", chunk.shard, st.index_error, len(rows))
        prov = self.provenance
        write_sidecar(sidecar_path(self.out, chunk.shard), rows, prov["model"], prov["model_tag"], prov["generation"])
        s.shards_written += 1
        s.clips += len(rows)
        for r in rows:
            if r["caption"] is not None:
                s.captions += 1
            else:
                s.failures[r["error"].split(":")[0]] += 1
                log.warning("clip %s/%s: %s", chunk.shard, r["key"], r["error"])

    def _record(self) -> None:
        """Append this run's summary to <out>/caption_runs.jsonl (a log of what was run, with what)."""
        rec = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **self.summary.to_dict(),
               "config": dataclasses.asdict(self.cfg)}
        path = storage.join(self.out, "caption_runs.jsonl")
        if not storage.is_remote(path):
            Path(self.out).mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            return
        try:                                      # objects cannot be appended to: read, add, put
            old = storage.read_bytes(path)
        except FileNotFoundError:
            old = b""
        storage.write_bytes(path, old + (json.dumps(rec) + "\n").encode("utf-8"))


def run_caption_job(cfg: CaptionConfig, on_chunk_done: Callable[[CaptionJob], None] | None = None,
                    fault_exit_chunk: int | None = None) -> CaptionSummary:
    """Caption every shard of cfg.shards that has no sidecar yet; returns the run's summary.
    fault_exit_chunk: fault injection for tests and drills (actor 0 exits on its Nth chunk)."""
    return CaptionJob(cfg, fault_exit_chunk).run(on_chunk_done)


def run(cfg: CaptionConfig, fault_exit_chunk: int | None = None) -> int:
    """The job as a command: run it, print the summary table; exit status 0 when no shard failed
    (1 when some failed or the job could not run: the captioner cannot load, no shards, …)."""
    try:
        summary = run_caption_job(cfg, fault_exit_chunk=fault_exit_chunk)
    except Exception as e:
        log.error("caption job failed: %s: %s", type(e).__name__, e)
        return 1
    print(summary.table(), flush=True)
    return 0 if summary.shards_failed == 0 else 1
