"""KV offload tiers below the GPU block pool: host memory, optionally disk.

A full prompt block that the GPU pool evicts (its block is reallocated) is
written down to the first tier; a tier that is full pushes its least recently
used blocks to the next tier (or drops them from the last). At admission, after
the GPU prefix hit, the request's next blocks are looked up in the tiers (each
block in whichever tier holds it; the run stops at the first block no tier
holds): those blocks are loaded back into fresh GPU blocks and count as
computed. A hit refreshes the block's place in its tier (LRU); the copy stays.

Cost. Loading ``n`` blocks from a tier takes ``n x block_bytes / bandwidth``
and is added to the duration of the step that admits the request: vLLM's KV
connector API loads inside the forward pass (``start_load_kv`` before it,
``wait_for_layer_load`` per layer; vllm-project/vllm:
vllm/distributed/kv_transfer/kv_connector/v1/base.py @ v0.33.0, as LMCache's
connector uses it). Layer-wise overlap with compute is not modelled (the cost
is added, an upper bound). Writes down are asynchronous there and free here.

Keys are the block pool's prefix keys (``sim.kv``), so a tier's content is
exact, block for block. Like the pool, everything is numpy over a request's
blocks: ``level[key]`` says which tier holds a key (-1: none) and each tier
keeps an LRU queue of (key, stamp) chunks; an entry is live while the key is
still in that tier with that stamp, so a refresh or a move leaves a tombstone
that popping skips.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

# _pop_lru walks a chunk entry by entry when it has at most this many entries left, or
# when at most this many keys are wanted
_SCALAR_CHUNK = 8


@dataclass(frozen=True)
class TierSpec:
    name: str
    capacity_blocks: int
    bandwidth_bytes_per_s: float

    def __post_init__(self) -> None:
        if self.capacity_blocks < 1:
            raise ValueError(f"offload tier {self.name}: capacity_blocks = "
                             f"{self.capacity_blocks}: must be >= 1")
        if not self.bandwidth_bytes_per_s > 0:
            raise ValueError(f"offload tier {self.name}: bandwidth = "
                             f"{self.bandwidth_bytes_per_s}: must be > 0")


class OffloadTiers:
    def __init__(self, tiers: list[TierSpec], block_bytes: float, num_keys: int) -> None:
        if len(tiers) > 100:
            raise ValueError("at most 100 offload tiers")
        self.specs = list(tiers)
        self.block_bytes = float(block_bytes)
        self.level = np.full(num_keys, -1, dtype=np.int8)
        self.stamp = np.zeros(num_keys, dtype=np.int64)
        self._next_stamp = 1
        # per tier, its LRU queue: (keys, stamps) arrays, or (key, stamp) ints for one key
        self._queues: list[deque[tuple[Any, Any]]] = [deque() for _ in tiers]
        self._heads = [0] * len(tiers)  # entries of each queue's head chunk already used
        self.held = [0] * len(tiers)
        self.num_stored = [0] * len(tiers)
        self.num_dropped = 0
        self.hit_blocks = [0] * len(tiers)
        self.load_s = 0.0
        self._seconds = np.array([self.block_bytes / t.bandwidth_bytes_per_s for t in tiers])

    # ------------------------------------------------------------- storing
    def store(self, keys: np.ndarray | list[int]) -> None:
        """Blocks the GPU pool evicted, in eviction order, go to the first tier."""
        if len(keys) == 1:
            # the usual call: one block evicted by a decode step's allocation; plain
            # Python, since numpy's per-call cost dwarfs one key's work
            self._put_one(int(keys[0]))
            return
        keys = np.asarray(keys, dtype=np.int64)
        if keys.size > 1:
            # two blocks may carry one key (a prefix computed twice): one copy goes down,
            # at its last place in the order (as storing them one by one would leave it)
            last = keys.size - 1 - np.unique(keys[::-1], return_index=True)[1]
            if last.size < keys.size:
                keys = keys[np.sort(last)]
        if keys.size:
            self._put(0, keys)

    def _put(self, lv: int, keys: np.ndarray) -> None:
        while keys.size:
            prev = self.level[keys]
            for p in np.unique(prev[prev >= 0]).tolist():
                self.held[p] -= int(np.count_nonzero(prev == p))  # moved or refreshed
            stamps = np.arange(self._next_stamp, self._next_stamp + keys.size, dtype=np.int64)
            self._next_stamp += keys.size
            self.level[keys] = lv
            self.stamp[keys] = stamps
            self._queues[lv].append((keys, stamps))
            self.held[lv] += int(keys.size)
            self.num_stored[lv] += int(keys.size)
            over = self.held[lv] - self.specs[lv].capacity_blocks
            if over <= 0:
                return
            keys = self._pop_lru(lv, over)  # pushed down a tier (or dropped)
            self.level[keys] = -1
            self.held[lv] -= int(keys.size)
            lv += 1
            if lv == len(self.specs):
                self.num_dropped += int(keys.size)
                return

    def _put_one(self, key: int) -> None:
        """``_put(0, [key])`` key by key: the same stamps and pushes down; its queue
        entry is a pair of ints, not of arrays."""
        level, stamp, held = self.level, self.stamp, self.held
        lv = 0
        while True:
            p = int(level[key])
            if p >= 0:
                held[p] -= 1  # moved or refreshed
            s = self._next_stamp
            self._next_stamp = s + 1
            level[key] = lv
            stamp[key] = s
            self._queues[lv].append((key, s))
            held[lv] += 1
            self.num_stored[lv] += 1
            over = held[lv] - self.specs[lv].capacity_blocks
            if over <= 0:
                return
            if over > 1:  # a tier over by more than one block: the general path
                out = self._pop_lru(lv, over)
                level[out] = -1
                held[lv] -= int(out.size)
                if lv + 1 == len(self.specs):
                    self.num_dropped += int(out.size)
                else:
                    self._put(lv + 1, out)
                return
            key = self._pop_one(lv)
            level[key] = -1
            held[lv] -= 1
            lv += 1
            if lv == len(self.specs):
                self.num_dropped += 1
                return

    def _pop_one(self, lv: int) -> int:
        """``_pop_lru(lv, 1)`` as an int."""
        q = self._queues[lv]
        level, stamp = self.level, self.stamp
        while True:
            ids, st = q[0]
            if type(ids) is int:
                q.popleft()
                if level[ids] == lv and stamp[ids] == st:
                    return ids
                continue
            h = self._heads[lv]
            size = ids.size
            while h < size:
                k = int(ids[h])
                live = level[k] == lv and stamp[k] == st[h]
                h += 1
                if live:
                    if h >= size:
                        q.popleft()
                        h = 0
                    self._heads[lv] = h
                    return k
            q.popleft()
            self._heads[lv] = 0

    def _pop_lru(self, lv: int, n: int) -> np.ndarray:
        """The ``n`` least recently used live keys of tier ``lv`` (left in place). The
        queue's head chunk is read from ``_heads[lv]`` on: entries before it are used.
        A one-key entry is a pair of ints (``_put_one``), any other a pair of arrays."""
        q = self._queues[lv]
        level, stamp = self.level, self.stamp
        parts: list[np.ndarray] = []
        few: list[int] = []
        while n:
            ids, st = q[0]
            h = self._heads[lv]
            if type(ids) is int or ids.size - h <= _SCALAR_CHUNK or n <= _SCALAR_CHUNK:
                # key by key: a one-key entry, a short chunk, or few keys wanted from a
                # long one (a vector test of the whole chunk would cost its length)
                few.append(self._pop_one(lv))
                n -= 1
                continue
            ids_v = ids[h:]
            live_v = (level[ids_v] == lv) & (stamp[ids_v] == st[h:])
            idx = np.flatnonzero(live_v)
            if idx.size > n:
                idx = idx[:n]
                self._heads[lv] = h + int(idx[-1]) + 1
            else:
                q.popleft()
                self._heads[lv] = 0
            if few:
                parts.append(np.array(few, dtype=np.int64))
                few = []
            parts.append(ids_v[idx])
            n -= int(idx.size)
        if few:
            parts.append(np.array(few, dtype=np.int64))
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    # ------------------------------------------------------------- loading
    def match(self, keys: np.ndarray) -> np.ndarray:
        """The tier of each block in the leading run of ``keys`` that some tier holds
        (no side effects: admission may still be refused)."""
        if keys.size == 0:
            return np.empty(0, dtype=np.int8)
        lv = self.level[keys]
        held = lv >= 0
        return lv if held.all() else lv[: int(np.argmin(held))]

    def load(self, keys: np.ndarray, levels: np.ndarray) -> float:
        """Load matched blocks back up: refresh them in their tiers, count the hits,
        return the seconds the loads take."""
        if keys.size == 0:
            return 0.0
        seconds = float(self._seconds[levels].sum())
        for lv in np.unique(levels).tolist():
            mine = keys[levels == lv]
            self.hit_blocks[lv] += int(mine.size)
            stamps = np.arange(self._next_stamp, self._next_stamp + mine.size, dtype=np.int64)
            self._next_stamp += mine.size
            self.stamp[mine] = stamps  # the old queue entries become tombstones
            self._queues[lv].append((mine, stamps))
        self.load_s += seconds
        return seconds

    # -------------------------------------------------------------- report
    def held_blocks(self, level: int) -> int:
        return self.held[level]

    def summary(self, block_size: int) -> list[dict[str, float | int | str]]:
        return [{"tier": s.name, "capacity_blocks": s.capacity_blocks,
                 "blocks_held": h, "blocks_stored": st, "hit_blocks": hb,
                 "hit_tokens": hb * block_size}
                for s, h, st, hb in zip(self.specs, self.held, self.num_stored,
                                        self.hit_blocks, strict=True)]
