"""The deterministic sample order: which sample each rank reads at each position.

Each epoch, the shard list is permuted (seed, epoch) and dealt round-robin to
ranks; a rank's shards are taken in groups of `shuffle_shards` whose samples
are interleaved in a random order (one permutation per group). The rank's
stream is the concatenation of its epochs; batch b is stream positions
[b·B, (b+1)·B), produced by DataLoader worker b mod W. Nothing here depends on
the number of workers, so a position (epoch, offset) fully describes where a
rank is, and restoring it is O(1) in the position.

Elastic resume (docs/training.md): a stream checkpointed on N ranks continues on M. The samples
the N ranks had not consumed yet, up to the end of the newest epoch any of them had started, are
concatenated (old rank order) and cut into M contiguous `Lead`s; new rank j reads its lead first,
in place of epoch `Lead.epoch`, then the plan for M ranks from the next epoch on. A lead is a list
of `Piece`s (runs of some base plan's epoch order), so it stays small however often the world
changes, and each run is computed group by group (memory ~ the lead, not the epoch).

Every shard of a planned set holds at least one sample (`ShardSet.without_empty`; the reader
drops 0-sample shards when it loads a set) and there are at least as many shards as ranks, so
every rank has at least one sample in every epoch: a rank's stream never runs dry.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class ShardSet:
    """Shard names and sample counts (from shards.json)."""

    root: str
    names: tuple
    counts: tuple
    empty: tuple = ()       # names of 0-sample shards dropped from the set (never planned nor read)

    @property
    def num_samples(self) -> int:
        return int(sum(self.counts))

    def fingerprint(self) -> int:
        """CRC32 of the shard names and sample counts: a different set gives a different order."""
        return zlib.crc32("\n".join(f"{n}\t{int(c)}" for n, c in zip(self.names, self.counts)).encode())

    def without_empty(self) -> "ShardSet":
        """This set without its 0-sample shards (a shard whose every clip was skipped at build
        time); their names go to `empty`. The set itself when no shard is empty."""
        keep = [i for i, c in enumerate(self.counts) if int(c) > 0]
        if len(keep) == len(self.names):
            return self
        dropped = tuple(n for n, c in zip(self.names, self.counts) if int(c) <= 0)
        return ShardSet(root=self.root, names=tuple(self.names[i] for i in keep),
                        counts=tuple(self.counts[i] for i in keep), empty=self.empty + dropped)


@dataclass(frozen=True)
class Position:
    """Where a rank's stream is: the next sample is `offset` in epoch `epoch`."""

    epoch: int = 0
    offset: int = 0


@dataclass(frozen=True)
class Piece:
    """`count` consecutive samples of epoch `epoch` of the base plan of (rank, world), from `start`."""

    rank: int
    world: int
    epoch: int
    start: int
    count: int

    def cut(self, skip: int, n: int) -> "Piece":
        return Piece(self.rank, self.world, self.epoch, self.start + skip, n)


@dataclass(frozen=True)
class Lead:
    """What an elastically resumed rank reads in place of epoch `epoch` (re-dealt remainder)."""

    epoch: int
    pieces: tuple = ()

    @property
    def length(self) -> int:
        return sum(p.count for p in self.pieces)

    def slice(self, start: int, stop: int) -> list[Piece]:
        """The pieces covering lead positions [start, stop)."""
        out, pos = [], 0
        for p in self.pieces:
            a, b = max(start, pos), min(stop, pos + p.count)
            if a < b:
                out.append(p.cut(a - pos, b - a))
            pos += p.count
        return out

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "pieces": [[p.rank, p.world, p.epoch, p.start, p.count] for p in self.pieces]}

    @staticmethod
    def from_dict(d: dict | None) -> "Lead | None":
        if not d:
            return None
        return Lead(int(d["epoch"]), tuple(Piece(*map(int, p)) for p in d["pieces"]))


def too_few_shards(shards: ShardSet, world: int) -> str:
    """The error of a shard set with fewer (non-empty) shards than ranks: a config problem."""
    empty = f" (plus {len(shards.empty)} empty shards, dropped)" if shards.empty else ""
    return (f"{len(shards.names)} shards for {world} ranks in {shards.root}{empty}: every rank needs at least one "
            f"non-empty shard per epoch; build more, smaller shards (build.clips_per_shard) or run fewer ranks")


class RankPlan:
    """The sample order of one rank: epoch → arrays (shard id, sample index in shard)."""

    def __init__(self, shards: ShardSet, rank: int, world: int, seed: int, shuffle: bool, shuffle_shards: int,
                 lead: Lead | None = None):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} not in [0, {world})")
        self.shards, self.rank, self.world = shards, rank, world
        self.seed, self.shuffle, self.group = seed, shuffle, max(1, shuffle_shards)
        self.lead = lead
        self._counts = np.asarray(shards.counts, dtype=np.int64)
        if (self._counts <= 0).any():
            # a rank dealt only empty shards would have an empty epoch: its stream would stop
            raise ValueError(f"{int((self._counts <= 0).sum())} of {len(self._counts)} shards in {shards.root} "
                             "have no samples: plan ShardSet.without_empty() (the reader does)")
        if len(self._counts) < world:
            # fewer shards than ranks: some rank would have no data at all
            raise ValueError(too_few_shards(shards, world))
        self.epoch_cached = lru_cache(maxsize=3)(self._epoch)

    def _rng(self, *salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *salt])

    def shard_order(self, epoch: int) -> np.ndarray:
        n = len(self._counts)
        return self._rng(epoch, 0).permutation(n) if self.shuffle else np.arange(n)

    def rank_shards(self, epoch: int) -> np.ndarray:
        return self.shard_order(epoch)[self.rank::self.world]

    def _groups(self, epoch: int) -> list[np.ndarray]:
        mine = self.rank_shards(epoch)
        return [mine[g:g + self.group] for g in range(0, len(mine), self.group)]

    def _group_order(self, epoch: int, gi: int, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, sample indices) of group `gi` of this rank's epoch, in read order."""
        sids = np.repeat(group, self._counts[group])
        idxs = np.concatenate([np.arange(self._counts[s]) for s in group]) if len(group) else np.zeros(0, np.int64)
        if self.shuffle:
            perm = self._rng(epoch, 1, self.rank, gi * self.group).permutation(len(sids))
            sids, idxs = sids[perm], idxs[perm]
        return sids, idxs

    def base_slice(self, epoch: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Samples [start, start + count) of this rank's base-plan epoch (groups outside are not drawn)."""
        sid_parts, idx_parts, pos = [], [], 0
        for gi, group in enumerate(self._groups(epoch)):
            n = int(self._counts[group].sum())
            a, b = max(start, pos), min(start + count, pos + n)
            if a < b:
                sids, idxs = self._group_order(epoch, gi, group)
                sid_parts.append(sids[a - pos:b - pos])
                idx_parts.append(idxs[a - pos:b - pos])
            pos += n
            if pos >= start + count:
                break
        if not sid_parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(sid_parts), np.concatenate(idx_parts)

    def _is_lead(self, epoch: int) -> bool:
        return self.lead is not None and epoch == self.lead.epoch

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard ids, sample indices, epoch of each sample) of this rank's whole epoch, in read
        order; the lead's samples keep the epoch they were planned in (it seeds their frames)."""
        if self._is_lead(epoch):
            parts = [(*_base(self, p).base_slice(p.epoch, p.start, p.count), p.epoch) for p in self.lead.pieces]
            if not parts:
                return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
            return (np.concatenate([s for s, _, _ in parts]), np.concatenate([i for _, i, _ in parts]),
                    np.concatenate([np.full(len(s), e, np.int64) for s, _, e in parts]))
        sids, idxs = self.base_slice(epoch, 0, self.epoch_length(epoch))
        return sids, idxs, np.full(len(sids), epoch, np.int64)

    def epoch_length(self, epoch: int) -> int:
        if self._is_lead(epoch):
            return self.lead.length
        return int(self._counts[self.rank_shards(epoch)].sum())

    def advance(self, pos: Position, n: int) -> Position:
        """The position n samples after `pos` (crossing epochs; an empty lead is passed over)."""
        e, o = pos.epoch, pos.offset + n
        while True:
            L = self.epoch_length(e)
            if L == 0 and not self._is_lead(e):
                raise ValueError(f"rank {self.rank} has no samples in epoch {e}")
            if o < L:
                return Position(e, o)
            o -= L
            e += 1

    def take(self, pos: Position, n: int, single_epoch: bool = False) -> list[tuple[int, int, int]]:
        """The next n (epoch, shard id, sample index) from `pos`; fewer at the end in single-epoch mode."""
        out = []
        e, o = pos.epoch, pos.offset
        while len(out) < n:
            sids, idxs, epochs = self.epoch_cached(e)
            if o >= len(sids):
                if single_epoch:
                    break
                e, o = e + 1, 0
                continue
            k = min(n - len(out), len(sids) - o)
            out.extend((int(ep), int(s), int(i)) for ep, s, i in zip(epochs[o:o + k], sids[o:o + k], idxs[o:o + k]))
            o += k
        return out

    def remainder(self, pos: Position, until: int) -> list[Piece]:
        """The samples of this rank's stream from `pos` up to the start of epoch `until`, as pieces."""
        out = []
        for e in range(pos.epoch, until):
            skip = pos.offset if e == pos.epoch else 0
            if self._is_lead(e):
                out += self.lead.slice(skip, self.lead.length)
            elif (n := self.epoch_length(e) - skip) > 0:
                out.append(Piece(self.rank, self.world, e, skip, n))
        return out


def _base(plan: RankPlan, piece: Piece) -> RankPlan:
    """The base plan (no lead) that `piece` is a run of."""
    if piece.rank == plan.rank and piece.world == plan.world and plan.lead is None:
        return plan
    return _base_plan(plan.shards, piece.rank, piece.world, plan.seed, plan.shuffle, plan.group)


@lru_cache(maxsize=64)
def _base_plan(shards: ShardSet, rank: int, world: int, seed: int, shuffle: bool, group: int) -> RankPlan:
    return RankPlan(shards, rank, world, seed, shuffle, group)


def redeal(plans: list[RankPlan], positions: list[Position], world: int) -> tuple[list[Lead | None], Position]:
    """Re-deal the unconsumed rest of N ranks' streams (`plans` at `positions`) to `world` ranks.

    Every sample of the epochs any old rank had started and not every rank had finished is either
    consumed (before its rank's position) or in exactly one new lead: the rests are concatenated
    in old rank order and cut into `world` contiguous runs whose lengths differ by at most 1. The
    new ranks start at the returned position (the lead's epoch, offset 0; the next epoch when
    nothing was left) and follow the plan for `world` ranks after their lead."""
    # an old rank inside its lead has not finished what the lead holds, even at offset 0
    until = max(p.epoch + (p.offset > 0 or plan._is_lead(p.epoch)) for plan, p in zip(plans, positions))
    rest = [piece for plan, pos in zip(plans, positions) for piece in plan.remainder(pos, until)]
    total = Lead(until - 1, tuple(rest))
    if total.length == 0:
        return [None] * world, Position(until, 0)
    cuts = [total.length * j // world for j in range(world + 1)]
    return [Lead(until - 1, tuple(total.slice(cuts[j], cuts[j + 1]))) for j in range(world)], Position(until - 1, 0)
