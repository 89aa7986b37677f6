"""The compiled engine's C block-pool loops (sim/_kvcore.c) against the numpy code they
stand in for (sim/kv.py): the same random operations on two pools, one through each,
leave the same pools and return the same blocks."""

from __future__ import annotations

import importlib
from functools import partial
from typing import Any

import numpy as np
import pytest

from sim import kv

try:
    _kvcore: Any = importlib.import_module("sim._kvcore")
except ImportError:  # not built: `servetwin native build` (CI builds it)
    _kvcore = None

pytestmark = pytest.mark.skipif(_kvcore is None, reason="compiled engine not built")


class Counting:
    """The C module, counting the calls that reach it."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        fn = getattr(_kvcore, name)

        def call(*args: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args)
        return call


def state(pool: kv.BlockPool) -> tuple[Any, ...]:
    return (pool.ref.tolist(), pool.free_stamp.tolist(), pool.blk_key.tolist(),
            pool._index.tolist(), pool.free_queue_order(), pool.num_free, pool.num_evicted,
            pool._stamp, pool._head, len(pool._queue))


def with_kernel(kernel: Any, fn: Any) -> Any:
    old = kv._K
    kv._K = kernel
    try:
        return fn()
    finally:
        kv._K = old


def apply(op: str, pool: kv.BlockPool, held: list[np.ndarray], keys: np.ndarray, n: int,
          k: int) -> Any:
    """One operation on a pool; ``held`` are its live requests' blocks."""
    if op in ("alloc", "alloc_few"):
        n = n if op == "alloc" else n % kv.FEW_BLOCKS + 1
        if n > pool.num_free:
            return None
        got = (np.asarray(pool.allocate(n), dtype=np.int64) if op == "alloc_few"
               else pool.allocate_array(n))
        held.append(got)
        return got.tolist()
    if op == "free" and held:
        return pool.free(held.pop(k % len(held)))
    if op == "cache" and held:
        blocks = held[k % len(held)]
        m = min(len(blocks), len(keys))
        return pool.cache(blocks[:m], keys[:m])
    if op == "lookup":
        return (pool.lookup(keys).tolist(), pool.num_cached_prefix(keys))
    if op == "touch":
        hit = pool.lookup(keys)
        pool.touch(hit)
        held.append(hit)
        return hit.tolist()
    return None


@pytest.mark.parametrize("seed", range(12))
def test_random_operations_leave_both_pools_equal(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_blocks = int(rng.integers(40, 400))
    num_keys = int(rng.integers(50, 600))
    counting = Counting()
    pools = [kv.BlockPool(num_blocks, 16, 64, num_keys // 4 + 1) for _ in range(2)]
    kernels = [None, counting]
    held: list[list[np.ndarray]] = [[], []]  # each pool's live "requests" (their blocks)
    for _ in range(300):
        op = rng.choice(["alloc", "alloc_few", "free", "cache", "lookup", "touch"],
                        p=[0.25, 0.15, 0.2, 0.15, 0.15, 0.1])
        keys = rng.permutation(pools[0].num_keys)[: int(rng.integers(1, 40))]
        if rng.random() < 0.5:  # a chain of keys some earlier request may have cached
            keys = np.arange(int(rng.integers(0, 8)), pools[0].num_keys)[: len(keys)]
        keys = keys.astype(np.int64)
        n, k = int(rng.integers(1, 60)), int(rng.integers(0, 1 << 30))
        out = [with_kernel(kernel, partial(apply, str(op), pool, mine, keys, n, k))
               for pool, kernel, mine in zip(pools, kernels, held, strict=True)]
        assert out[0] == out[1], op
        assert state(pools[0]) == state(pools[1]), op
    assert {"take", "free", "cache", "lookup", "prefix_len", "touch"} <= set(counting.calls)


def test_the_c_loops_refuse_what_numpy_would_refuse() -> None:
    pool = kv.BlockPool(8, 16, 16, 4)
    ids = np.array([3, 99], dtype=np.int64)
    with pytest.raises(IndexError, match="block id 99 out of range"):
        _kvcore.free(ids, pool.ref, pool.free_stamp, 0, np.empty(2, np.int64),
                     np.empty(2, np.int64))
    with pytest.raises(IndexError, match="prefix key 7 out of range"):
        _kvcore.lookup(np.array([7], dtype=np.int64), pool._index, pool.blk_key,
                       np.empty(1, np.int64))
    with pytest.raises(TypeError, match="4-byte items"):  # int32 ids
        _kvcore.touch(np.array([1], dtype=np.int32), pool.ref, pool.free_stamp)
    assert pool.ref.tolist() == [0] * 8  # nothing half done


@pytest.mark.parametrize("block_size, hash_block_tokens", [(16, 512), (64, 512), (16, 16),
                                                           (48, 512), (512, 64), (7, 100)])
def test_prefix_layout_keys_are_the_same(block_size: int, hash_block_tokens: int) -> None:
    rng = np.random.default_rng(block_size * 1000 + hash_block_tokens)
    counting = Counting()
    for _ in range(50):
        dense = rng.integers(0, 10_000, int(rng.integers(0, 40))).astype(np.int64)
        tokens = int(rng.integers(1, 40 * hash_block_tokens))
        keys = [with_kernel(kernel, partial(kv.PrefixLayout, dense, tokens, block_size,
                                            hash_block_tokens))
                for kernel in (None, counting)]
        assert keys[0].num_hashed == keys[1].num_hashed
        assert keys[0].keys.tolist() == keys[1].keys.tolist()
    assert counting.calls.get("layout_keys", 0) > 0
