"""DeepSpeed checkpoint shards with client state, committed atomically and verified.

Layout under `<out>/checkpoints/`: one folder per tag (`step00001000/`) holding
DeepSpeed's per-rank shards, `config.yaml` and, written last by rank 0 after
every rank has finished, `COMPLETE`. Only tags with `COMPLETE` are ever
resumed from, so a checkpoint interrupted while writing (kill -9, node loss,
full disk) is never taken as the latest and the previous one stays usable.

`COMPLETE` lists every file of the tag with its size and CRC32 (vip.train.verify). A resume
verifies the newest complete tag first (each rank checks the files it wrote, all ranks agree on
the verdict) and falls back to the next newest that verifies; a damaged tag is named in an
error log with the file and what is wrong. Before a save, every rank checks that the folder is
writable and has room for the last checkpoint's size + 10%; a write that fails says why (no
space left / permission denied / folder does not exist) and where.

A checkpoint written by another number of ranks resumes elastically (`restore`): ZeRO 1-3 states
through DeepSpeed's universal checkpoint (vip.train.universal, converted once into
`<tag>/universal`), the data rest re-dealt to the new ranks (docs/training.md, "Resuming on a
different number of GPUs").
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from shards.atomic import write_json, write_text
from vip.config import save_config
from vip.train.runtime import seed_everything
from vip.train.universal import UNIVERSAL, to_universal
from vip.train.verify import CHECKSUM, MARKER, check_files, file_record, human_bytes, read_marker
from vip.train.write_errors import CheckpointWriteError, os_reason

log = logging.getLogger(__name__)
SPACE_MARGIN = 1.1        # free space needed before a save: the last checkpoint's size × this


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged, or failing to load (names the tag and folder)."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():   # not initialised: its RNG never ran
        state["cuda"] = torch.cuda.get_rng_state_all()     # every visible device's generator
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")                               # absent in older checkpoints and CPU runs
    if cuda is not None and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if len(cuda) != n:
            log.warning("checkpoint holds CUDA RNG states of %d devices, this process sees %d: restoring the "
                        "first %d", len(cuda), n, min(len(cuda), n))
        torch.cuda.set_rng_state_all(cuda[:n])


@contextlib.contextmanager
def _recording_saves(engine, written: list):
    """Record the path of every file DeepSpeed's checkpoint engine writes in this process
    (its `checkpoint_engine.save(state, path)`); without one, nothing is recorded and rank 0
    checksums the tag's unclaimed files itself."""
    ce = getattr(engine, "checkpoint_engine", None)
    orig = getattr(ce, "save", None)
    if ce is None or not callable(orig):
        yield
        return
    own = "save" in vars(ce)

    def save(state_dict, path, *args, **kwargs):
        out = orig(state_dict, path, *args, **kwargs)
        written.append(str(path))
        return out

    ce.save = save
    try:
        yield
    finally:
        if own:
            ce.save = orig
        else:
            del ce.save


class CheckpointManager:
    def __init__(self, out: str | Path, keep_last: int, rank: int, world: int):
        self.dir = Path(out) / "checkpoints"
        self.keep_last, self.rank, self.world = keep_last, rank, world
        self._last_bytes: int | None = None        # size of the last checkpoint (rank 0; free-space check)

    # ------------------------------------------------------------------------------ collectives
    def _gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def _from_rank0(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------------------------ listing
    def complete_tags(self) -> list[str]:
        if not self.dir.exists():
            return []
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir() and (p / MARKER).exists())

    def latest(self) -> str | None:
        tags = self.complete_tags()
        return tags[-1] if tags else None

    # ------------------------------------------------------------------------------ writability
    def _writable_error(self) -> str | None:
        """Why this process cannot write into the checkpoint folder (creating it), or None."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"cannot create the checkpoint folder {self.dir}: {os_reason(e, self.dir) or e}"
        if not os.access(self.dir, os.W_OK | os.X_OK):
            return f"cannot write into the checkpoint folder {self.dir}: permission denied"
        probe = self.dir / f".write-test.{self.rank}.{os.getpid()}"
        try:                                   # os.access says yes to root even on a read-only mount
            probe.write_bytes(b"")
            probe.unlink(missing_ok=True)
        except OSError as e:
            return f"cannot write into the checkpoint folder {self.dir}: {os_reason(e, self.dir) or e}"
        return None

    def check_writable(self) -> None:
        """Create `<out>/checkpoints` and check this process can write there; raises
        CheckpointWriteError naming the folder. Every rank calls it (the ranks agree, so all raise
        together). `resume` calls it before anything else, and every save checks again."""
        try:
            local = self._writable_error()
        except Exception as e:               # never skip the gather: the other ranks wait in it
            local = f"cannot check the checkpoint folder {self.dir}: {type(e).__name__}: {e}"
        errors = [(r, e) for r, e in enumerate(self._gather(local)) if e]
        if errors:
            r, e = errors[0]
            raise CheckpointWriteError(e if self.world == 1 else f"rank {r}: {e}")

    # ------------------------------------------------------------------------------ save
    def save(self, engine, loader, config) -> str:
        """Checkpoint a vip.train.engine.Engine and the data position of `loader` (every rank calls
        this); returns the tag."""
        import dataclasses
        client = {"step": engine.global_steps, "counters": engine.counters, "config": dataclasses.asdict(config),
                  "rank_state": {"data": loader.state_dict()}}
        return self.save_state(engine.ds, engine.global_steps, client, config)

    def _last_checkpoint_bytes(self) -> int | None:
        """Total size of the newest complete checkpoint with a file list (None: not known)."""
        if self._last_bytes is None:
            for tag in reversed(self.complete_tags()):
                try:
                    marker = read_marker(self.dir / tag)
                except ValueError:
                    continue
                if marker and "files" in marker:
                    self._last_bytes = sum(int(r.get("bytes", 0)) for r in marker["files"])
                    break
        return self._last_bytes

    def _preflight(self) -> dict:
        """This rank's view before a save; never raises (the ranks must all reach the gather)."""
        err = free = need = None
        try:
            err = self._writable_error()
            free = None if err else shutil.disk_usage(self.dir).free
            need = self._last_checkpoint_bytes() if self.rank == 0 else None
        except Exception as e:
            err = f"cannot check the checkpoint folder {self.dir}: {type(e).__name__}: {e}"
        return {"error": err, "free": free, "need": need}

    def _check_preflight(self, tag: str, pre: list[dict]) -> None:
        """Raise on every rank (they all see the same gathered list) before anything is written."""
        who = (lambda r: "") if self.world == 1 else (lambda r: f"rank {r}: ")
        for r, p in enumerate(pre):
            if p["error"]:
                raise CheckpointWriteError(f"{who(r)}cannot write checkpoint {tag}: {p['error']}")
        need = pre[0]["need"]
        if not need:                        # the first checkpoint (or only old markers): size unknown
            return
        for r, p in enumerate(pre):
            if p["free"] < need * SPACE_MARGIN:
                raise CheckpointWriteError(
                    f"{who(r)}not enough space for checkpoint {tag} in {self.dir}: {human_bytes(p['free'])} free, "
                    f"the last checkpoint took {human_bytes(need)} (needs {human_bytes(need * SPACE_MARGIN)} "
                    f"with a {SPACE_MARGIN - 1:.0%} margin); free space there (train.keep_last sets how many are "
                    "kept)", errno.ENOSPC)

    def _write_error(self, tag: str, e: BaseException) -> CheckpointWriteError:
        where = self.dir / tag
        reason = os_reason(e, where)
        code = getattr(e, "errno", None)
        if reason:
            return CheckpointWriteError(f"could not write checkpoint {tag} to {where}: {reason} "
                                        f"({type(e).__name__}: {e})", code)
        return CheckpointWriteError(f"could not write checkpoint {tag} to {where}: {type(e).__name__}: {e}", code)

    def save_state(self, engine, step: int, client_state: dict, config) -> str:
        """Every rank calls this with a DeepSpeed engine; returns the tag. Per-rank state is
        gathered into the client state. Raises CheckpointWriteError (before anything is written)
        when the folder is not writable or short of space on any rank, and when a write fails."""
        tag = tag_for(step)
        tag_dir = self.dir / tag
        local = {"rng": rng_state(), **client_state.pop("rank_state", {})}
        gathered = self._gather({"state": local, "pre": self._preflight()})
        self._check_preflight(tag, [g["pre"] for g in gathered])
        client_state = {**client_state, "ranks": [g["state"] for g in gathered], "world": self.world}
        t0 = time.perf_counter()
        written: list[str] = []
        try:
            if self.rank == 0:     # a marker left by an earlier run at this step: gone before any rank writes
                (tag_dir / MARKER).unlink(missing_ok=True)
            with _recording_saves(engine, written):
                engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
            # DeepSpeed writes the files itself, so they cannot be checksummed while being written
            # without patching it: each rank reads the files it wrote back once, right after the save,
            # while they are still in the page cache.
            rels = [os.path.relpath(p, tag_dir) for p in dict.fromkeys(written)]
            mine = [file_record(tag_dir, tag_dir / rel, self.rank) for rel in rels
                    if not rel.startswith("..") and (tag_dir / rel).is_file()]
        except (OSError, RuntimeError) as e:
            raise self._write_error(tag, e) from e
        per_rank = self._gather(mine)        # also the barrier: every rank has finished writing
        if self.rank == 0:
            try:
                save_config(config, tag_dir / "config.yaml")
                records = {r["path"]: r for rs in per_rank for r in rs}
                for p in sorted(tag_dir.rglob("*")):       # what no rank claimed (zero_to_fp32.py, config.yaml)
                    rel = p.relative_to(tag_dir).as_posix()
                    if p.is_file() and rel not in records and p.name != MARKER and not p.name.endswith(".tmp"):
                        records[rel] = file_record(tag_dir, p, 0)
                files = [records[k] for k in sorted(records)]
                write_json(tag_dir / MARKER, {"step": step, "time": time.time(), "world": self.world,
                                              "checksum": CHECKSUM, "files": files})
                write_text(self.dir / "latest", tag)
            except (OSError, RuntimeError) as e:
                raise self._write_error(tag, e) from e
            self._last_bytes = sum(r["bytes"] for r in files)
            self._prune(tag)
            log.info("checkpoint %s saved in %.1fs (%d files, %s)", tag, time.perf_counter() - t0, len(files),
                     human_bytes(self._last_bytes))
        if self.world > 1:
            dist.barrier()
        return tag

    def _prune(self, current: str | None = None) -> None:
        """Keep the last `keep_last` complete tags up to `current` (the tag just saved; default:
        the newest complete one) and remove interrupted saves older than it. Runs only after
        `current` is complete, so the previous checkpoint is never removed first; tags newer
        than `current` (e.g. a damaged one resume fell back from) are left alone."""
        tags = self.complete_tags()
        current = current or (tags[-1] if tags else None)
        if current is None:
            return
        upto = [t for t in tags if t <= current]
        for old in upto[:-self.keep_last] if self.keep_last > 0 else []:
            shutil.rmtree(self.dir / old, ignore_errors=True)
        for p in self.dir.iterdir():  # leftovers of interrupted saves older than the newest good one
            if p.is_dir() and not (p / MARKER).exists() and p.name < current:
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------------------ verify + resume
    def _problems(self, tag: str, marker: dict) -> list[tuple[str, str]]:
        """Every rank checks the files its rank wrote (by the marker's `rank`); the union, the same on
        every rank."""
        files = marker["files"]
        mine = [r for i, r in enumerate(files) if int(r.get("rank", i)) % self.world == self.rank]
        return [p for ps in self._gather(check_files(self.dir / tag, mine)) for p in ps]

    def verify(self, tag: str) -> list[tuple[str, str]] | None:
        """Collective: [(file, problem)] of a tag ([] = verified), None when its marker has no file
        list (written before checkpoints were verified) or it has no marker."""
        try:
            marker = read_marker(self.dir / tag) if self.rank == 0 else None
            err = None
        except ValueError as e:
            marker, err = None, str(e)
        marker, err = self._from_rank0((marker, err))
        if err:
            return [(MARKER, err)]
        if marker is None or "files" not in marker:
            return None
        return self._problems(tag, marker)

    def _log_damaged(self, tag: str, problems: list[tuple[str, str]]) -> None:
        if self.rank != 0:
            return
        for path, why in problems[:10]:
            log.error("checkpoint %s is damaged: %s: %s (%s)", tag, path, why, self.dir / tag / path)
        if len(problems) > 10:
            log.error("checkpoint %s: %d more damaged files", tag, len(problems) - 10)

    def newest_verified(self) -> str | None:
        """Collective: the newest complete tag that verifies (an old marker without a file list is
        taken with a warning); damaged ones are logged as errors and skipped."""
        tags = self._from_rank0(list(reversed(self.complete_tags())) if self.rank == 0 else None)
        damaged = []
        for tag in tags:
            problems = self.verify(tag)
            if problems is None:
                if self.rank == 0:
                    log.warning("checkpoint %s has no file list in %s (written by an older vip): resuming from "
                                "it unverified", tag, MARKER)
            elif problems:
                self._log_damaged(tag, problems)
                damaged.append(tag)
                continue
            if damaged and self.rank == 0:
                log.error("not resuming from damaged checkpoint(s) %s: falling back to %s", ", ".join(damaged), tag)
            return tag
        if damaged and self.rank == 0:
            log.error("no complete checkpoint under %s verifies (damaged: %s): STARTING FROM SCRATCH; set "
                      "train.resume=none to do so on purpose, or restore the files", self.dir, ", ".join(damaged))
        return None

    def select(self, resume: str) -> str | None:
        """Collective: the tag train.resume names — auto (newest complete checkpoint that
        verifies, if any) | none | a tag folder (must verify). Checks the checkpoint folder is
        writable first."""
        self.check_writable()
        if resume == "auto":
            return self.newest_verified()
        if resume == "none":
            return None
        tag = Path(resume).name
        problems = self.verify(tag)
        if problems:
            self._log_damaged(tag, problems)
            path, why = problems[0]
            raise CheckpointError(f"checkpoint {tag} in {self.dir} is damaged: {path}: {why}"
                                  + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
        return tag

    def saved_world(self, tag: str) -> int | None:
        """Collective: the number of ranks that wrote `tag` (its COMPLETE marker; None: not recorded)."""
        world = None
        if self.rank == 0:
            try:
                world = (read_marker(self.dir / tag) or {}).get("world")
            except ValueError:
                world = None
        return self._from_rank0(world)

    def resume(self, engine, loader, resume: str) -> str | None:
        """`select` then `restore`: returns the tag resumed from (None: a fresh start)."""
        return self.restore(engine, loader, self.select(resume))

    def restore(self, engine, loader, tag: str | None) -> str | None:
        """Restore weights, optimiser, schedule, counters, RNG and data position from `tag`.

        Written by the same number of ranks: exact (each rank its own RNG and data position).
        By another number (elastic resume): ZeRO 1-3 states go through DeepSpeed's universal
        checkpoint (converted once, by rank 0, into `<tag>/universal`; the engine must be built
        with `load_universal`, as `vip pretrain` does), ZeRO 0 states load as they are; the data
        rest of the interrupted epoch is re-dealt to this world (StreamLoader.load_redealt) and
        each rank's RNG is seeded afresh from (train.seed, step, rank)."""
        if tag is None:
            return None
        saved = self.saved_world(tag)
        elastic = saved is not None and saved != self.world
        client = self.load(engine.ds, tag, elastic)
        if client.get("world") != len(client.get("ranks", [])):
            raise CheckpointError(f"checkpoint {tag}: client state holds {len(client.get('ranks', []))} rank states "
                                  f"for world {client.get('world')}")
        if client["world"] != self.world:
            loader.load_redealt([r["data"] for r in client["ranks"]])
        else:
            loader.load_state_dict(client["ranks"][self.rank]["data"])
        counters = client.get("counters", {})
        if "micro_batches" not in counters:        # written before the count was kept: estimate it
            counters = {**counters, "micro_batches": engine.global_steps * engine.ds.gradient_accumulation_steps()}
        engine.counters.update(counters)
        if client["world"] != self.world:
            seed = int(client.get("config", {}).get("train", {}).get("seed", 0))
            seed_everything(int(np.random.SeedSequence([seed, engine.global_steps, self.rank]).generate_state(1)[0]))
            if self.rank == 0:
                log.warning("elastic resume: checkpoint %s was written by %d ranks, this run has %d: the rest of the "
                            "interrupted epoch is re-dealt to %d ranks, RNG states seeded afresh", tag,
                            client["world"], self.world, self.world)
        else:
            set_rng_state(client["ranks"][self.rank]["rng"])
        log.info("rank %d resumed from %s at step %d (data position %s)", self.rank, tag, engine.global_steps,
                 loader.position)
        return tag

    # ------------------------------------------------------------------------------ load
    def universal(self, tag: str) -> Path:
        """Collective: `<tag>/universal`, DeepSpeed's universal checkpoint of `tag`, converted by
        rank 0 if not there yet (into a temporary folder renamed when done, so a kill mid-way
        leaves nothing that looks converted). The checkpoint folder must be shared by all nodes."""
        out = self.dir / tag / UNIVERSAL
        err = None
        if self.rank == 0 and not out.is_dir():
            try:
                to_universal(self.dir / tag, out)
            except Exception as e:           # never skip the broadcast: the other ranks wait in it
                err = f"could not convert checkpoint {tag} ({self.dir / tag}) to a universal checkpoint: {e}"
        err = self._from_rank0(err)
        if err:
            raise CheckpointError(err)
        return out

    def load(self, engine, tag: str, elastic: bool = False) -> dict:
        """Load weights, optimizer, scheduler into a DeepSpeed engine; return the client state.
        `elastic`: written by another number of ranks (ZeRO 1-3 load the universal checkpoint)."""
        load_dir, load_tag = str(self.dir), tag
        universal = elastic and engine.zero_optimization_stage() > 0
        if universal:
            if not engine.load_universal_checkpoint():
                raise CheckpointError(f"checkpoint {tag} was written by another number of ranks: a ZeRO "
                                      f"{engine.zero_optimization_stage()} engine loads it only when built with "
                                      "load_universal=True (vip.train.engine.build_engine)")
            load_dir, load_tag = str(self.dir / tag), self.universal(tag).name
        base = getattr(engine.optimizer, "optimizer", None)
        groups = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                  for g in getattr(base, "param_groups", [])]
        try:
            path, client = engine.load_checkpoint(load_dir, tag=load_tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        except Exception as e:
            raise CheckpointError(f"could not load checkpoint {tag} from {self.dir / tag}: "
                                  f"{type(e).__name__}: {e}") from e
        if path is None:
            raise CheckpointError(f"could not load checkpoint {self.dir / tag}")
        if universal and groups:
            # DeepSpeed's ZeRO-3 universal load gives every group the first group's settings: the
            # no-decay group would decay. The groups' settings are the config's: put them back.
            for g, hp in zip(base.param_groups, groups):
                g.update(hp)
        return client
