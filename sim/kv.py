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

import heapq
from collections import deque
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from . import _native

if TYPE_CHECKING:
    from .offload import OffloadTiers

NO_KEY = -1

# The C loops of the compiled engine (sim/_kvcore.c), only when that build is used; each
# does per block what the numpy code below does per array, to the same result.
_K: Any = None
if _native.STATE["compiled"]:
    from . import _kvcore as _K  # type: ignore[attr-defined,no-redef]


# up to this many blocks an allocation walks the free queue in plain Python (numpy's
# per-call cost dwarfs the work); more go through numpy (``allocate_array``)
FEW_BLOCKS = 12
# a prefix lookup reads the keys in windows of this many, then 4x, 16x, ... (``lookup``)
LOOKUP_WINDOW = 64


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
        self._index: np.ndarray = np.full(size, -1, dtype=dtype)
        ids = np.arange(1, num_blocks, dtype=np.int64)
        self._queue: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self._head = 0
        self.num_free = 0
        self._append_free(ids)
        self.num_evicted = 0
        # offload tiers below this pool (sim.offload): evicted prefix blocks go down
        self.lower: OffloadTiers | None = None
        # a fleet's shared "which pool holds this key" bitmap (KeyPresence), and this
        # pool's bit in it; None unless a router asked for one
        self._pmask: np.ndarray | None = None
        self._pbit: Any = None  # a numpy unsigned scalar of the bitmap's width
        # a lagged router view fed by this pool's store/remove events (KeyEventView),
        # and the simulated time the engine's current block operations happen at
        self._plog: KeyEventView | None = None
        self.clock = 0.0

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
        if _K is not None and self.lower is None and self._pmask is None:
            out: list[int] = self._take(n).tolist()
            return out
        if n <= FEW_BLOCKS:
            return self._allocate_few(n)
        return self._allocate_many(n)

    def _allocate_many(self, n: int) -> list[int]:
        if n == 0:
            return []
        out: list[int] = self.allocate_array(n).tolist()
        return out

    def allocate_array(self, n: int) -> np.ndarray:
        """``allocate`` by numpy, the block ids as an int64 array (``n`` >= 1)."""
        if _K is not None and self.lower is None and self._pmask is None:
            return self._take(n)
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
            if self._pmask is not None:
                gone = old[evicted]
                gone = gone[self._index[gone] == ids[evicted]]  # the indexed copies only
                self._pmask[gone] &= ~self._pbit
                if self._plog is not None and gone.size:
                    self._plog.push(self.clock, gone, self._pbit, False)
        key[ids] = NO_KEY
        return ids

    def _take(self, n: int) -> np.ndarray:
        """``allocate_array`` through the C loop (``_K.take``, chunk by chunk), when no
        offload tier or key bitmap needs to hear of evictions."""
        if n > self.num_free:
            raise RuntimeError(f"pop {n} blocks with {self.num_free} free")  # engine bug
        out = np.empty(n, dtype=np.int64)
        got = 0
        q = self._queue
        while got < n:
            ids, stamps = q[0]
            head, taken, evicted = _K.take(ids, stamps, self._head, n - got, self.free_stamp,
                                           self.ref, self.blk_key, out, got)
            got += taken
            self.num_evicted += evicted
            if head >= ids.size:
                q.popleft()
                self._head = 0
            else:
                self._head = head
        self.num_free -= n
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
                if self._pmask is not None and self._index[key[b]] == b:
                    self._pmask[key[b]] &= ~self._pbit
                    if self._plog is not None:
                        self._plog.push(self.clock, key[b:b + 1].copy(), self._pbit, False)
                key[b] = NO_KEY
                self.num_evicted += 1
        return out

    def touch(self, ids: np.ndarray) -> None:
        """Take a reference on cached blocks found by a prefix hit."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return
        if _K is not None:
            self.num_free -= _K.touch(ids, self.ref, self.free_stamp)
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
        if _K is not None:
            n = int(ids.size)
            out_ids = np.empty(n, dtype=np.int64)
            out_stamps = np.empty(n, dtype=np.int64)
            freed = _K.free(ids, self.ref, self.free_stamp, self._stamp, out_ids, out_stamps)
            if freed:
                self._stamp += freed
                self._queue.append((out_ids[:freed], out_stamps[:freed]))
                self.num_free += freed
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
        if _K is not None and self._pmask is None:
            _K.cache(ids, np.asarray(keys, dtype=np.int64), self._index, self.blk_key)
            return
        # ids are blocks just filled by their owner: none holds a key yet
        cur = self._index[keys]
        held = (cur >= 0) & (self.blk_key[np.maximum(cur, 0)] == keys)
        self.blk_key[ids] = keys
        if held.any():
            ids, keys = ids[~held], keys[~held]
        self._index[keys] = ids
        if self._pmask is not None:
            self._pmask[keys] |= self._pbit
            if self._plog is not None and keys.size:
                self._plog.push(self.clock, np.array(keys, dtype=np.int64), self._pbit, True)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Block ids of the longest leading run of ``keys`` found in the cache.

        Read in windows growing fourfold from LOOKUP_WINDOW keys: a prompt's hit is
        mostly a short shared head of a long prompt, so the rest is never gathered."""
        if not self.enable_caching or keys.size == 0:
            return np.empty(0, dtype=np.int64)
        if _K is not None:
            out = np.empty(keys.size, dtype=np.int64)
            found: np.ndarray = out[:_K.lookup(keys, self._index, self.blk_key, out)]
            return found
        n = int(keys.size)
        lo = 0
        width = LOOKUP_WINDOW
        parts = []
        while True:
            hi = min(n, lo + width)
            seg = keys[lo:hi]
            cand = self._index[seg].astype(np.int64)
            ok = (cand >= 0) & (self.blk_key[np.maximum(cand, 0)] == seg)
            if not ok.all():
                parts.append(cand[: int(np.argmin(ok))])
                break
            parts.append(cand)
            if hi == n:
                break
            lo = hi
            width *= 4
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def num_cached_prefix(self, keys: np.ndarray) -> int:
        """Length of the longest leading run of ``keys`` found in the cache (``lookup``'s
        size), with a scalar check of the first key: a router asks every worker, and
        most hold none of a request's prefix."""
        if not self.enable_caching or keys.size == 0:
            return 0
        if _K is not None:
            run: int = _K.prefix_len(keys, self._index, self.blk_key)
            return run
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


class KeyPresence:
    """Which of a fleet's pools hold each prefix key: one bit per pool in one array,
    kept by the pools as they index and evict blocks. A router asking "how many
    leading blocks of this prompt does each worker hold" then gathers the prompt's
    keys once for the whole fleet instead of once per worker. The pools must share
    one key space (block size, hash block size, trace); at most 64 pools."""

    MAX_POOLS: ClassVar[int] = 64

    @classmethod
    def fits(cls, pools: list[BlockPool]) -> bool:
        """Whether one bitmap can stand for these pools (one key space, <= 64)."""
        return 0 < len(pools) <= cls.MAX_POOLS and len({p.num_keys for p in pools}) == 1

    def __init__(self, pools: list[BlockPool]) -> None:
        n = len(pools)
        if not 0 < n <= self.MAX_POOLS:
            raise ValueError(f"KeyPresence holds 1 to {self.MAX_POOLS} pools, not {n}")
        sizes = {p.num_keys for p in pools}
        if len(sizes) != 1:
            raise ValueError(f"pools with different key spaces: {sorted(sizes)}")
        dtype = next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64)
                     if n <= 8 * np.dtype(t).itemsize)
        self.num_pools = n
        self.mask = np.zeros(sizes.pop(), dtype=dtype)
        for i, p in enumerate(pools):
            bit = dtype(1 << i)
            if p.enable_caching and p.num_keys:
                k = np.flatnonzero(p._index >= 0)  # none at start
                k = k[p.blk_key[p._index[k]] == k]
                self.mask[k] |= bit
            p._pmask, p._pbit = self.mask, bit

    def leading_counts(self, keys: np.ndarray) -> np.ndarray:
        """For each pool, the length of the longest leading run of ``keys`` it holds
        (each pool's ``num_cached_prefix``), as one int64 array."""
        return _leading_counts(self.mask, keys, self.num_pools)


def _leading_counts(mask: np.ndarray, keys: np.ndarray, num_pools: int) -> np.ndarray:
    out = np.zeros(num_pools, dtype=np.int64)
    if keys.size == 0 or mask.size == 0:  # (no pool caches: an empty key space)
        return out
    m = mask[keys]
    if not m[0]:
        return out
    run = np.bitwise_and.accumulate(m)  # bit i stays set while pool i holds them all
    run = run.astype(run.dtype.newbyteorder("<"), copy=False)  # a no-op on x86/arm
    bits = np.unpackbits(run.view(np.uint8).reshape(run.size, run.itemsize), axis=1,
                         bitorder="little")  # column i = pool i (little-endian words)
    counts: np.ndarray = bits.sum(axis=0, dtype=np.int64)[:num_pools]
    return counts


class KeyEventView:
    """A router's own, lagging copy of a fleet's ``KeyPresence``: the pools publish
    each store (a block indexed under a key) and remove (an indexed block
    reallocated) with the simulated time it happened, and the view applies an
    event only ``lag_s`` after it. Dynamo's KV router works so: workers publish
    KV events (BlockStored / BlockRemoved) that reach the router's indexer over
    the event plane some time later (ai-dynamo/dynamo:lib/llm/src/kv_router/
    indexer.rs @ 2025; DynoSim replays them with a configurable event lag).
    With ``lag_s == 0`` it equals the exact view.

    The engines stamp events with the start of the step that did the block
    operation (``BlockPool.clock``), in step-by-step and fast-forward mode alike,
    and the cluster syncs every worker to "now" before a decision, so every event
    up to now has been published when the view reads it."""

    def __init__(self, presence: KeyPresence, pools: list[BlockPool], lag_s: float) -> None:
        self.mask = presence.mask.copy()
        self.num_pools = presence.num_pools
        self.lag_s = float(lag_s)
        self.num_events = 0
        self._heap: list[tuple[float, int, np.ndarray, Any, bool]] = []
        for p in pools:
            p._plog = self

    def adopt(self, old: KeyEventView) -> None:
        """Carry over what ``old`` (the view of a smaller fleet) has seen and has yet
        to see; a new worker's pool starts empty, so its bits are right as they are."""
        old_bits: Any = self.mask.dtype.type((1 << old.num_pools) - 1)
        self.mask[:] = (self.mask & ~old_bits) | old.mask
        cast = self.mask.dtype.type
        self._heap = [(t, seq, keys, cast(bit), stored) for t, seq, keys, bit, stored in old._heap]
        heapq.heapify(self._heap)
        self.num_events = old.num_events

    def push(self, t: float, keys: np.ndarray, bit: Any, stored: bool) -> None:
        heapq.heappush(self._heap, (t, self.num_events, keys, bit, stored))
        self.num_events += 1

    def apply_until(self, now: float) -> None:
        """Apply, in time order, the events that happened at or before ``now - lag_s``."""
        heap, mask = self._heap, self.mask
        cut = now - self.lag_s
        while heap and heap[0][0] <= cut:
            _, _, keys, bit, stored = heapq.heappop(heap)
            if stored:
                mask[keys] |= bit
            else:
                mask[keys] &= ~bit

    def leading_counts(self, keys: np.ndarray, now: float) -> np.ndarray:
        """``KeyPresence.leading_counts`` as the router sees the caches at ``now``."""
        self.apply_until(now)
        return _leading_counts(self.mask, keys, self.num_pools)


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
        if _K is not None:
            keys = np.empty(n, dtype=np.int64)
            _K.layout_keys(np.ascontiguousarray(dense_ids, dtype=np.int64), t, block_size, keys)
            self.keys = keys
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
