"""DeepSpeed checkpoint shards with client state, committed atomically.

Layout under `<out>/checkpoints/`: one folder per tag (`step00001000/`) holding
DeepSpeed's per-rank shards, `config.yaml` and, written last by rank 0 after
every rank has finished, `COMPLETE`. Only tags with `COMPLETE` are ever
resumed from, so a checkpoint interrupted while writing (kill -9, node loss,
full disk) is never taken as the latest and the previous one stays usable.
"""
from __future__ import annotations

import logging
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from shards.atomic import write_json, write_text
from vip.config import save_config

log = logging.getLogger(__name__)
MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class CheckpointManager:
    def __init__(self, out: str | Path, keep_last: int, rank: int, world: int):
        self.dir = Path(out) / "checkpoints"
        self.keep_last, self.rank, self.world = keep_last, rank, world

    def complete_tags(self) -> list[str]:
        if not self.dir.exists():
            return []
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir() and (p / MARKER).exists())

    def latest(self) -> str | None:
        tags = self.complete_tags()
        return tags[-1] if tags else None

    def save(self, engine, loader, config) -> str:
        """Checkpoint a vip.train.engine.Engine and the data position of `loader` (every rank calls
        this); returns the tag."""
        import dataclasses
        client = {"step": engine.global_steps, "counters": engine.counters, "config": dataclasses.asdict(config),
                  "rank_state": {"data": loader.state_dict()}}
        return self.save_state(engine.ds, engine.global_steps, client, config)

    def resume(self, engine, loader, resume: str) -> str | None:
        """train.resume: auto (latest complete checkpoint, if any) | none | a tag folder. Restores
        weights, optimiser, schedule, counters, this rank's RNG and data position; returns the tag."""
        tag = self.latest() if resume == "auto" else (None if resume == "none" else Path(resume).name)
        if tag is None:
            return None
        client = self.load(engine.ds, tag)
        loader.load_state_dict(client["rank_state"]["data"])
        engine.counters.update(client.get("counters", {}))
        log.info("rank %d resumed from %s at step %d (data position %s)", self.rank, tag, engine.global_steps,
                 loader.position)
        return tag

    def save_state(self, engine, step: int, client_state: dict, config) -> str:
        """Every rank calls this with a DeepSpeed engine; returns the tag. Per-rank state is
        gathered into the client state."""
        tag = tag_for(step)
        per_rank = [None] * self.world
        local = {"rng": rng_state(), **client_state.pop("rank_state", {})}
        if self.world > 1:
            dist.all_gather_object(per_rank, local)
        else:
            per_rank = [local]
        client_state = {**client_state, "ranks": per_rank, "world": self.world}
        t0 = time.perf_counter()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        if self.world > 1:
            dist.barrier()
        if self.rank == 0:
            save_config(config, self.dir / tag / "config.yaml")
            write_json(self.dir / tag / MARKER, {"step": step, "time": time.time(), "world": self.world})
            write_text(self.dir / "latest", tag)
            self._prune()
            log.info("checkpoint %s saved in %.1fs", tag, time.perf_counter() - t0)
        if self.world > 1:
            dist.barrier()
        return tag

    def _prune(self) -> None:
        tags = self.complete_tags()
        for old in tags[:-self.keep_last] if self.keep_last > 0 else []:
            shutil.rmtree(self.dir / old, ignore_errors=True)
        newest = tags[-1] if tags else None
        for p in self.dir.iterdir():  # leftovers of interrupted saves older than the newest good one
            if p.is_dir() and not (p / MARKER).exists() and newest and p.name < newest:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, engine, tag: str) -> dict:
        """Load weights, optimizer, scheduler; restore this rank's RNG; return the client state."""
        path, client = engine.load_checkpoint(str(self.dir), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"could not load checkpoint {self.dir / tag}")
        if client.get("world") != self.world:
            raise ValueError(f"checkpoint {tag} was written by {client.get('world')} ranks, this run has "
                             f"{self.world}: exact resume needs the same world size")
        mine = client["ranks"][self.rank]
        set_rng_state(mine["rng"])
        return {**client, "rank_state": mine}
