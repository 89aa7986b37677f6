"""OffloadTiers' one-key store path and head-offset queues against the plain numpy
implementation they replace (kept here as the reference): the same tier state after
every operation of random store/load sequences."""

from __future__ import annotations

from collections import deque

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.offload import OffloadTiers, TierSpec


class ReferenceTiers:
    """sim.offload.OffloadTiers as it was before the one-key path: every store through
    numpy, a popped chunk's remainder put back at the queue's head."""

    def __init__(self, tiers: list[TierSpec], num_keys: int) -> None:
        self.specs = tiers
        self.level = np.full(num_keys, -1, dtype=np.int8)
        self.stamp = np.zeros(num_keys, dtype=np.int64)
        self._next_stamp = 1
        self._queues: list[deque] = [deque() for _ in tiers]
        self.held = [0] * len(tiers)
        self.num_stored = [0] * len(tiers)
        self.num_dropped = 0
        self.hit_blocks = [0] * len(tiers)

    def store(self, keys) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        if keys.size > 1:
            last = keys.size - 1 - np.unique(keys[::-1], return_index=True)[1]
            if last.size < keys.size:
                keys = keys[np.sort(last)]
        if keys.size:
            self._put(0, keys)

    def _put(self, lv, keys) -> None:
        while keys.size:
            prev = self.level[keys]
            for p in np.unique(prev[prev >= 0]).tolist():
                self.held[p] -= int(np.count_nonzero(prev == p))
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
            keys = self._pop_lru(lv, over)
            self.level[keys] = -1
            self.held[lv] -= int(keys.size)
            lv += 1
            if lv == len(self.specs):
                self.num_dropped += int(keys.size)
                return

    def _pop_lru(self, lv, n):
        q = self._queues[lv]
        parts = []
        while n:
            ids, st_ = q.popleft()
            live = (self.level[ids] == lv) & (self.stamp[ids] == st_)
            idx = np.flatnonzero(live)
            if idx.size > n:
                cut = int(idx[n - 1]) + 1
                q.appendleft((ids[cut:], st_[cut:]))
                idx = idx[:n]
            parts.append(ids[idx])
            n -= int(idx.size)
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def match(self, keys):
        lv = self.level[keys]
        held = lv >= 0
        return lv if held.all() else lv[: int(np.argmin(held))]

    def load(self, keys, levels) -> None:
        for lv in np.unique(levels).tolist():
            mine = keys[levels == lv]
            self.hit_blocks[lv] += int(mine.size)
            stamps = np.arange(self._next_stamp, self._next_stamp + mine.size, dtype=np.int64)
            self._next_stamp += mine.size
            self.stamp[mine] = stamps
            self._queues[lv].append((mine, stamps))


def live_order(t, lv: int, heads: int = 0) -> list[int]:
    """The keys tier ``lv`` would pop, oldest first."""
    out = []
    for i, (ids, stamps) in enumerate(t._queues[lv]):
        if type(ids) is int:  # a one-key entry of the new queues
            ids, stamps = np.array([ids]), np.array([stamps])
        for j in range(heads if i == 0 else 0, ids.size):
            k = int(ids[j])
            if t.level[k] == lv and t.stamp[k] == stamps[j]:
                out.append(k)
    return out


NUM_KEYS = 24
ops = st.lists(st.one_of(
    st.tuples(st.just("store"), st.lists(st.integers(0, NUM_KEYS - 1), min_size=1,
                                         max_size=12), st.booleans()),
    st.tuples(st.just("load"), st.integers(0, NUM_KEYS - 1), st.integers(1, 8))),
    min_size=1, max_size=60)


@settings(max_examples=400, deadline=None)
@given(caps=st.lists(st.integers(1, 9), min_size=1, max_size=3), seq=ops)
def test_same_state_as_the_numpy_reference(caps: list[int], seq) -> None:
    specs = [TierSpec(f"t{i}", c, 1e9) for i, c in enumerate(caps)]
    new = OffloadTiers(specs, block_bytes=1.0, num_keys=NUM_KEYS)
    ref = ReferenceTiers(specs, NUM_KEYS)
    for op in seq:
        if op[0] == "store":
            keys = op[1]
            arg = keys if op[2] else np.asarray(keys, dtype=np.int64)  # list or array
            new.store(arg)
            ref.store(arg)
        else:
            lo, n = op[1], op[2]
            keys = np.arange(lo, min(lo + n, NUM_KEYS), dtype=np.int64)
            m_new, m_ref = new.match(keys), ref.match(keys)
            assert m_new.tolist() == m_ref.tolist()
            new.load(keys[:m_new.size], m_new)
            ref.load(keys[:m_ref.size], m_ref)
        assert new.level.tolist() == ref.level.tolist()
        assert new.stamp.tolist() == ref.stamp.tolist()
        assert (new.held, new.num_stored, new.num_dropped, new.hit_blocks) == (
            ref.held, ref.num_stored, ref.num_dropped, ref.hit_blocks)
        for lv in range(len(specs)):
            assert live_order(new, lv, new._heads[lv]) == live_order(ref, lv), lv
            assert len(live_order(new, lv, new._heads[lv])) == new.held[lv]


def test_one_key_stores_push_down_and_drop_in_lru_order() -> None:
    # two tiers of 2 blocks: keys 0..5 one at a time; 0 and 1 go down to tier 1, then
    # 2 and 3 push them out of the last tier (dropped) as they arrive there
    t = OffloadTiers([TierSpec("host", 2, 1e9), TierSpec("disk", 2, 1e9)], 1.0, 8)
    for k in range(6):
        t.store([k])
    assert t.level.tolist() == [-1, -1, 1, 1, 0, 0, -1, -1]
    assert (t.held, t.num_stored, t.num_dropped) == ([2, 2], [6, 4], 2)
    # a hit refreshes key 4 in its tier: 5 is now the older one and goes down first
    t.load(np.array([4]), np.array([0], dtype=np.int8))
    t.store([6])
    assert t.level.tolist() == [-1, -1, -1, 1, 0, 1, 0, -1]
