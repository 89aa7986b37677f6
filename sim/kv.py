"""KV-cache block pool with vLLM V1 prefix caching.

Modelled on vllm-project/vllm:vllm/v1/core/block_pool.py and
vllm/v1/core/kv_cache_utils.py (FreeKVCacheBlockQueue) @ v0.33.0:

* ``num_blocks`` physical blocks of ``block_size`` tokens; block 0 is the null
  block vLLM keeps aside, so ``num_blocks - 1`` are usable.
* A block with ``ref == 0`` sits in the free queue. The queue is LRU: new
  allocations pop from the head, freed blocks are appended at the tail. A
  request frees its blocks in reverse order, so the tail of a prefix chain is
  evicted before its head::

      free queue   head -> [b7 b6 b5 | b3 b2] <- tail
                            ^ request A freed (A held b5 b6 b7)
* A full block that carries a prefix hash stays findable while it is free;
  reallocating it evicts the hash. A prefix hit on a free block "touches" it:
  the block leaves the free queue and its ``ref`` rises.

Everything here is vectorised per request (numpy over the request's blocks),
never a Python loop per block: a long trace allocates millions of blocks.
The free queue is a deque of id chunks; an entry stays valid only while the
block's free stamp matches, so a touched block is removed in O(1) by bumping its
stamp (the old entry becomes a tombstone, skipped when popped).

Prefix keys. A trace gives one id per ``hash_block_tokens`` tokens (T = 512 for
Mooncake), chained so that id k names the whole prefix up to the end of trace
block k. Ids are renumbered densely (0..H-1) once per trace. Engine block j
(tokens [j*B, (j+1)*B)) ends inside trace block k = ((j+1)*B - 1) // T, at
offset r; its key is ``dense_id[k] * S + (r - 1) // B`` with S = ceil(T / B)
slots per trace block. The cache index is then one flat array (key -> block),
so lookups and inserts are numpy gathers and scatters, never a Python loop.

Eviction is lazy: a block remembers its key (``blk_key``); an index entry is
valid only while its block still holds that key, so reallocating a block
evicts it by clearing one array element. (vLLM also indexes a second block
with identical content; here only the first copy is indexed, so after it is
evicted the second copy is not found. Such copies arise only when a request
computes a block it could not hit, e.g. past a missing earlier block.)

Blocks beyond the hashed prompt (generated tokens, or prompts without hashes)
are unique to their request; a request re-admitted after preemption finds its
own such blocks again if they were not reallocated (checked by their
free-queue stamp: still the one they got when freed).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .offload import OffloadTiers

NO_KEY = -1


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, hash_block_tokens: int,
                 num_hash_ids: int = 0, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("a block pool needs at least 2 blocks (one is the null block)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        t = hash_block_tokens if hash_block_tokens > 0 else block_size
        self.hash_block_tokens = t
        self.slots_per_hash = (t - 1) // block_size + 1
        self.ref = np.zeros(num_blocks, dtype=np.int32)
        # stamp of the block's current stay in the free queue (0: not free)
        self.free_stamp = np.zeros(num_blocks, dtype=np.int64)
        self._stamp = 0
        self.blk_key = np.full(num_blocks, NO_KEY, dtype=np.int64)
        size = num_hash_ids * self.slots_per_hash if enable_caching else 0
        # key -> block id; the smallest integer type that holds a block id, since
        # the index has one entry per (trace block, slot) of the whole trace
        dtype = np.int16 if num_blocks <= 2**15 else np.int32 if num_blocks <= 2**31 else np.int64
        self._index = np.full(size, -1, dtype=dtype)
        ids = np.arange(1, num_blocks, dtype=np.int64)
        self._queue: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self._head = 0
        self.num_free = 0
        self._append_free(ids)
        self.num_evicted = 0
        # offload tiers below this pool (sim.offload): evicted prefix blocks go down
        self.lower: OffloadTiers | None = None

    # ------------------------------------------------------------------ queue
    def _append_free(self, ids: np.ndarray) -> None:
        if ids.size == 0:
            return
        stamps = np.arange(self._stamp + 1, self._stamp + 1 + ids.size, dtype=np.int64)
        self._stamp += ids.size
        self.free_stamp[ids] = stamps
        self._queue.append((ids, stamps))
        self.num_free += ids.size

    def _pop_free(self, n: int) -> np.ndarray:
        """The ``n`` blocks at the head of the free queue, in LRU order."""
        if n > self.num_free:
            raise RuntimeError(f"pop {n} blocks with {self.num_free} free")  # engine bug
        parts = []
        need = n
        fs = self.free_stamp
        while need:
            ids, stamps = self._queue[0]
            h = self._head
            # look at a window just past what is needed, not the whole chunk:
            # the first chunk is the entire pool; tombstones are few
            width = need
            while True:
                win_ids, win_st = ids[h:h + width], stamps[h:h + width]
                valid = fs[win_ids] == win_st
                got = int(np.count_nonzero(valid))
                if got >= need or h + width >= ids.size:
                    break
                width = 2 * width + (need - got)
            if got < need:  # the chunk is used up
                parts.append(win_ids[valid])
                need -= got
                self._queue.popleft()
                self._head = 0
                continue
            if got == need and valid.size == width and valid[-1]:
                taken = win_ids[valid] if got < valid.size else win_ids
                self._head = h + width
            else:
                idx = np.flatnonzero(valid)[:need]
                taken = win_ids[idx]
                self._head = h + int(idx[-1]) + 1  # past the entry of the last block taken
            parts.append(taken)
            need = 0
            if self._head >= ids.size:
                self._queue.popleft()
                self._head = 0
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        fs[out] = 0
        self.num_free -= n
        return out

    # ------------------------------------------------------------- allocation
    def allocate(self, n: int) -> list[int]:
        """Pop ``n`` blocks for a request; evicts any prefix keys they held."""
        if n <= 12:
            return self._allocate_few(n)
        return self._allocate_many(n)

    def _allocate_many(self, n: int) -> list[int]:
        if n == 0:
            return []
        ids = self._pop_free(n)
        self.ref[ids] = 1
        key = self.blk_key
        old = key[ids]
        evicted = old != NO_KEY
        n_ev = int(np.count_nonzero(evicted))
        if n_ev:
            self.num_evicted += n_ev
            if self.lower is not None:
                self.lower.store(old[evicted])
        key[ids] = NO_KEY
        out: list[int] = ids.tolist()
        return out

    def _pop_free_checked(self, n: int) -> list[int]:
        """The numpy path of ``allocate`` whatever ``n`` (for tests)."""
        return self._allocate_many(n)

    def _allocate_few(self, n: int) -> list[int]:
        """``allocate`` for a handful of blocks (decode steps): the same queue walk
        element by element, since numpy's per-call cost dwarfs the work here."""
        if n > self.num_free:
            raise RuntimeError(f"pop {n} blocks with {self.num_free} free")  # engine bug
        out: list[int] = []
        fs = self.free_stamp
        q = self._queue
        while len(out) < n:
            ids, stamps = q[0]
            h = self._head
            size = ids.size
            while h < size:
                b = int(ids[h])
                ok = fs[b] == stamps[h]
                h += 1
                if ok:
                    out.append(b)
                    if len(out) == n:
                        break
            if h >= size:
                q.popleft()
                self._head = 0
            else:
                self._head = h
        self.num_free -= n
        ref, key = self.ref, self.blk_key
        for b in out:
            fs[b] = 0
            ref[b] = 1
            if key[b] != NO_KEY:
                if self.lower is not None:
                    self.lower.store([int(key[b])])
                key[b] = NO_KEY
                self.num_evicted += 1
        return out

    def touch(self, ids: np.ndarray) -> None:
        """Take a reference on cached blocks found by a prefix hit."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return
        was_free = ids[self.ref[ids] == 0]
        self.ref[ids] += 1
        if was_free.size:
            self.free_stamp[was_free] = 0  # their queue entries become tombstones
            self.num_free -= int(was_free.size)

    def free(self, ids: np.ndarray | list[int]) -> None:
        """Drop one reference on each block, ``ids`` in the request's order;
        blocks reaching zero join the free queue tail-first (vLLM frees in reverse)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return
        rev = ids[::-1]
        self.ref[rev] -= 1
        self._append_free(rev[self.ref[rev] == 0])

    # ------------------------------------------------------------ prefix cache
    def cache(self, ids: np.ndarray | list[int], keys: np.ndarray) -> None:
        """Index full blocks under their prefix keys; a key already held by a
        live block keeps that block."""
        ids = np.asarray(ids, dtype=np.int64)
        if not self.enable_caching or ids.size == 0:
            return
        # ids are blocks just filled by their owner: none holds a key yet
        cur = self._index[keys]
        held = (cur >= 0) & (self.blk_key[np.maximum(cur, 0)] == keys)
        self.blk_key[ids] = keys
        if held.any():
            ids, keys = ids[~held], keys[~held]
        self._index[keys] = ids

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Block ids of the longest leading run of ``keys`` found in the cache."""
        if not self.enable_caching or keys.size == 0:
            return np.empty(0, dtype=np.int64)
        cand = self._index[keys].astype(np.int64)
        ok = (cand >= 0) & (self.blk_key[np.maximum(cand, 0)] == keys)
        if ok.all():
            return cand
        return cand[: int(np.argmin(ok))]

    def num_cached_prefix(self, keys: np.ndarray) -> int:
        """Length of the longest leading run of ``keys`` found in the cache (``lookup``'s
        size), with a scalar check of the first key: a router asks every worker, and
        most hold none of a request's prefix."""
        if not self.enable_caching or keys.size == 0:
            return 0
        k0 = int(keys[0])
        b0 = int(self._index[k0])
        if b0 < 0 or self.blk_key[b0] != k0:
            return 0
        # block 0 (the null block) never holds a key, so a missing entry (-1 -> 0) fails
        ok = self.blk_key[np.maximum(self._index[keys], 0)] == keys
        first_miss = int(ok.argmin())  # 0 also when nothing misses: ok[0] tells
        return first_miss if not ok[first_miss] else int(keys.size)

    # ------------------------------------------------------------------ views
    @property
    def num_keys(self) -> int:
        """Size of the prefix-key space (trace blocks x slots per trace block)."""
        return int(self._index.size)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    def free_queue_order(self) -> list[int]:
        """Block ids in the free queue, head (next evicted) first. For tests."""
        out: list[int] = []
        for i, (ids, stamps) in enumerate(self._queue):
            sl = slice(self._head, None) if i == 0 else slice(None)
            live = ids[sl][self.free_stamp[ids[sl]] == stamps[sl]]
            out.extend(live.tolist())
        return out

    def cached_block(self, key: int) -> int:
        """The live block indexed under ``key``, or -1."""
        b = int(self._index[key])
        return b if b >= 0 and self.blk_key[b] == key else -1


class PrefixLayout:
    """Prefix keys of a request's engine blocks.

    For a prompt of ``input_tokens`` with dense trace ids ``dense_ids`` (one per
    ``T`` tokens), the first ``num_hashed`` engine blocks are the full blocks
    lying inside the hashed prompt; ``keys[j]`` is block j's cache key.
    """

    __slots__ = ("keys", "num_hashed")

    def __init__(self, dense_ids: np.ndarray, input_tokens: int, block_size: int,
                 hash_block_tokens: int) -> None:
        t = hash_block_tokens
        covered = min(input_tokens, len(dense_ids) * t) if t > 0 else 0
        n = covered // block_size
        self.num_hashed = n
        if n == 0:
            self.keys = np.empty(0, dtype=np.int64)
            return
        slots = (t - 1) // block_size + 1
        if t % block_size == 0:
            # engine blocks tile each trace block: keys id*S + 0..S-1, in order
            per = dense_ids[: -(-n // slots)].astype(np.int64) * slots
            self.keys = (per[:, None] + np.arange(slots)).ravel()[:n]
            return
        end = np.arange(1, n + 1, dtype=np.int64) * block_size
        k = (end - 1) // t
        self.keys = dense_ids[k].astype(np.int64) * slots + (end - k * t - 1) // block_size


def dense_hash_ids(hash_ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Renumber a trace's hash ids to 0..H-1 (identity is all the cache needs)."""
    if hash_ids.size == 0:
        return hash_ids.astype(np.int64), 0
    uniq, dense = np.unique(hash_ids, return_inverse=True)
    return dense.astype(np.int64), int(uniq.size)
