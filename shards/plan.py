"""The deterministic sample order: which sample each rank reads at each position.

Each epoch, the shard list is permuted (seed, epoch) and dealt round-robin to
ranks; a rank's shards are taken in groups of `shuffle_shards` whose samples
are interleaved in a random order (one permutation per group). The rank's
stream is the concatenation of its epochs; batch b is stream positions
[b·B, (b+1)·B), produced by DataLoader worker b mod W. Nothing here depends on
the number of workers, so a position (epoch, offset) fully describes where a
rank is, and restoring it is O(1) in the position.

Every shard of a planned set holds at least one sample (`ShardSet.without_empty`; the reader
drops 0-sample shards when it loads a set) and there are at least as many shards as ranks, so
every rank has at least one sample in every epoch: a rank's stream never runs dry.
"""
from __future__ import annotations

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


def too_few_shards(shards: ShardSet, world: int) -> str:
    """The error of a shard set with fewer (non-empty) shards than ranks: a config problem."""
    empty = f" (plus {len(shards.empty)} empty shards, dropped)" if shards.empty else ""
    return (f"{len(shards.names)} shards for {world} ranks in {shards.root}{empty}: every rank needs at least one "
            f"non-empty shard per epoch; build more, smaller shards (build.clips_per_shard) or run fewer ranks")


class RankPlan:
    """The sample order of one rank: epoch → arrays (shard id, sample index in shard)."""

    def __init__(self, shards: ShardSet, rank: int, world: int, seed: int, shuffle: bool, shuffle_shards: int):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} not in [0, {world})")
        self.shards, self.rank, self.world = shards, rank, world
        self.seed, self.shuffle, self.group = seed, shuffle, max(1, shuffle_shards)
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

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, sample indices) of this rank's whole epoch, in read order."""
        mine = self.rank_shards(epoch)
        sid_parts, idx_parts = [], []
        for g in range(0, len(mine), self.group):
            group = mine[g:g + self.group]
            sids = np.repeat(group, self._counts[group])
            idxs = np.concatenate([np.arange(self._counts[s]) for s in group]) if len(group) else np.zeros(0, np.int64)
            if self.shuffle:
                perm = self._rng(epoch, 1, self.rank, g).permutation(len(sids))
                sids, idxs = sids[perm], idxs[perm]
            sid_parts.append(sids)
            idx_parts.append(idxs)
        if not sid_parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(sid_parts), np.concatenate(idx_parts)

    def epoch_length(self, epoch: int) -> int:
        return int(self._counts[self.rank_shards(epoch)].sum())

    def advance(self, pos: Position, n: int) -> Position:
        """The position n samples after `pos` (crossing epochs)."""
        e, o = pos.epoch, pos.offset + n
        while True:
            L = self.epoch_length(e)
            if L == 0:
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
            sids, idxs = self.epoch_cached(e)
            if o >= len(sids):
                if single_epoch:
                    break
                e, o = e + 1, 0
                continue
            k = min(n - len(out), len(sids) - o)
            out.extend((e, int(s), int(i)) for s, i in zip(sids[o:o + k], idxs[o:o + k]))
            o += k
        return out
