"""Block pool: exact block ids, LRU order, prefix keys (hand-computed)."""

import numpy as np

from sim.kv import BlockPool, PrefixLayout, dense_hash_ids


def ids(*xs: int) -> np.ndarray:
    return np.asarray(xs, dtype=np.int64)


def test_null_block_and_initial_order() -> None:
    pool = BlockPool(num_blocks=6, block_size=4, hash_block_tokens=4)
    assert pool.num_usable == 5
    assert pool.free_queue_order() == [1, 2, 3, 4, 5]  # block 0 is vLLM's null block
    assert pool.allocate(2) == [1, 2]
    assert pool.num_free == 3 and pool.num_used == 2


def test_free_appends_in_reverse_so_the_chain_tail_is_evicted_first() -> None:
    pool = BlockPool(num_blocks=6, block_size=4, hash_block_tokens=4)
    a = pool.allocate(3)  # 1 2 3
    pool.free(a)
    assert pool.free_queue_order() == [4, 5, 3, 2, 1]
    assert pool.allocate(3) == [4, 5, 3]


def test_touch_removes_from_free_queue_and_refcounts() -> None:
    pool = BlockPool(num_blocks=6, block_size=4, hash_block_tokens=4, num_hash_ids=20)
    a = pool.allocate(2)  # 1 2
    pool.cache(a, ids(10, 11))
    pool.free(a)  # queue 3 4 5 2 1
    assert pool.free_queue_order() == [3, 4, 5, 2, 1]
    hit = pool.lookup(ids(10, 11))
    assert hit.tolist() == [1, 2]
    pool.touch(hit)
    assert pool.free_queue_order() == [3, 4, 5]
    assert pool.num_free == 3
    pool.touch(hit)  # a second request on the same prefix
    assert pool.ref[[1, 2]].tolist() == [2, 2]
    pool.free(hit)
    assert pool.free_queue_order() == [3, 4, 5]  # still held once
    pool.free(hit)
    assert pool.free_queue_order() == [3, 4, 5, 2, 1]


def test_reallocating_a_cached_block_evicts_its_key() -> None:
    pool = BlockPool(num_blocks=4, block_size=4, hash_block_tokens=4, num_hash_ids=20)
    a = pool.allocate(2)
    pool.cache(a, ids(7, 8))
    pool.free(a)  # queue 3 2 1
    got = pool.allocate(2)  # 3, then 2 (which held key 8)
    assert got == [3, 2]
    assert pool.cached_block(8) == -1
    assert pool.cached_block(7) == 1
    assert pool.lookup(ids(7, 8)).tolist() == [1]
    assert pool.lookup(ids(8, 7)).tolist() == []  # a run must start at the first block
    assert pool.num_evicted == 1


def test_a_key_held_by_a_live_block_keeps_that_block() -> None:
    pool = BlockPool(num_blocks=5, block_size=4, hash_block_tokens=4, num_hash_ids=20)
    a = pool.allocate(1)  # 1
    b = pool.allocate(1)  # 2
    pool.cache(a, ids(7))
    pool.cache(b, ids(7))  # same content computed twice: the index keeps block 1
    assert pool.cached_block(7) == 1
    pool.free(a)  # queue 3 4 1
    pool.allocate(3)  # takes 3 4 1: evicts the indexed copy
    assert pool.cached_block(7) == -1
    pool.cache(pool.allocate(0), ids())  # no-op on empty input
    assert pool.lookup(ids(7)).tolist() == []


def test_prefix_layout_maps_engine_blocks_to_trace_blocks() -> None:
    # trace blocks of 8 tokens, engine blocks of 4: two slots per trace id
    lay = PrefixLayout(ids(0, 1, 2), input_tokens=22, block_size=4, hash_block_tokens=8)
    assert lay.num_hashed == 5  # 22 // 4 full engine blocks, all inside hashed tokens
    assert lay.keys.tolist() == [0, 1, 2, 3, 4]  # id * 2 + slot


def test_prefix_layout_with_engine_blocks_larger_than_trace_blocks() -> None:
    # an engine block of 8 tokens spans two trace blocks of 4: keyed by the last one
    lay = PrefixLayout(ids(0, 1, 2, 3), input_tokens=16, block_size=8, hash_block_tokens=4)
    assert lay.keys.tolist() == [1, 3]


def test_prefix_layout_covers_only_hashed_full_blocks() -> None:
    # 2 trace ids of 8 tokens cover 16 tokens of a 30-token prompt: 4 engine blocks
    lay = PrefixLayout(ids(5, 9), input_tokens=30, block_size=4, hash_block_tokens=8)
    assert lay.num_hashed == 4
    assert lay.keys.tolist() == [10, 11, 18, 19]


def test_dense_hash_ids() -> None:
    dense, n = dense_hash_ids(ids(900, 5, 900, 77))
    assert dense.tolist() == [2, 0, 2, 1] and n == 3


def test_small_and_bulk_allocation_walk_the_queue_identically() -> None:
    """The element-wise path (<= 4 blocks) and the numpy path agree, tombstones included."""
    rng = np.random.default_rng(7)
    for _ in range(50):
        a = BlockPool(num_blocks=40, block_size=4, hash_block_tokens=4, num_hash_ids=50)
        b = BlockPool(num_blocks=40, block_size=4, hash_block_tokens=4, num_hash_ids=50)
        held: list[list[int]] = []
        for _ in range(30):
            op = rng.integers(3)
            if op == 0 and a.num_free >= 4:
                n = int(rng.integers(1, 5))
                x = a.allocate(n)
                y = [blk for _ in range(n) for blk in b._pop_free_checked(1)]
                assert x == y
                held.append(x)
            elif op == 1 and held:
                blocks = held.pop(int(rng.integers(len(held))))
                keys = rng.integers(0, 50, size=len(blocks))
                a.cache(blocks, keys)
                b.cache(blocks, keys)
                a.free(blocks)
                b.free(blocks)
            elif op == 2 and a.num_free > 10:
                key = rng.integers(0, 50, size=2)
                ha, hb = a.lookup(key), b.lookup(key)
                assert ha.tolist() == hb.tolist()
                a.touch(ha)
                b.touch(hb)
                if ha.size:
                    held.append(ha.tolist())
            assert a.free_queue_order() == b.free_queue_order()
            assert (a.blk_key == b.blk_key).all() and (a.ref == b.ref).all()


def test_prefix_layout_fast_tiling_matches_the_general_formula() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        bs = int(rng.choice([1, 2, 4, 8, 16, 64]))
        t = bs * int(rng.choice([1, 2, 4, 8]))
        inp = int(rng.integers(1, 3000))
        dense = rng.integers(0, 1000, size=int(rng.integers(0, -(-inp // t) + 1)))
        lay = PrefixLayout(dense, inp, bs, t)
        end = np.arange(1, lay.num_hashed + 1) * bs
        k = (end - 1) // t
        want = dense[k] * ((t - 1) // bs + 1) + (end - k * t - 1) // bs
        assert lay.keys.tolist() == want.tolist()


def test_num_cached_prefix_equals_the_lookup_length() -> None:
    """The router's count of a request's cached leading blocks against the engine's
    lookup, over random fills, frees and evictions."""
    rng = np.random.default_rng(5)
    pool = BlockPool(12, 4, 4, num_hash_ids=40)
    held: list[list[int]] = []
    for _ in range(300):
        if held and rng.random() < 0.4:
            pool.free(held.pop(int(rng.integers(len(held)))))
        elif pool.num_free >= 3:
            ids = pool.allocate(3)
            start = int(rng.integers(0, 37))
            pool.cache(np.asarray(ids), np.arange(start, start + 3))
            held.append(ids)
        keys = np.arange(int(rng.integers(0, 30)), 40)[: int(rng.integers(0, 8))]
        assert pool.num_cached_prefix(keys) == pool.lookup(keys).size


def test_lookup_reads_windows_and_finds_runs_ending_anywhere() -> None:
    """Hits ending before, at and after each window edge (64, 64 + 256, ...) give the
    same run as one gather of every key; the whole prompt cached gives all of it."""
    import sim.kv

    n = 1000
    pool = BlockPool(n + 1, 4, 4, num_hash_ids=n + 5)
    blocks = np.asarray(pool.allocate(n), dtype=np.int64)
    pool.cache(blocks, np.arange(n))
    for run in (0, 1, 63, 64, 65, 319, 320, 321, 999, 1000):
        keys = np.arange(n + 5)
        if run < n:
            keys[run] = n + 3  # a key nobody holds ends the run there
        got = pool.lookup(keys[:n] if run == n else keys)
        assert got.tolist() == blocks[:run].tolist(), run
    assert sim.kv.LOOKUP_WINDOW == 64


# ------------------------------------------------------- fleet key presence
def test_key_presence_matches_every_pool_under_random_operations() -> None:
    """The shared bitmap a KV-aware router reads must say, for any prompt, exactly
    what each pool's own index says (num_cached_prefix), through allocations that
    evict indexed and duplicate copies, in both allocation paths (few and many)."""
    from sim.kv import KeyPresence

    r = np.random.default_rng(3)
    pools = [BlockPool(num_blocks=int(r.integers(6, 24)), block_size=2, hash_block_tokens=2,
                       num_hash_ids=12) for _ in range(3)]
    pools[1].cache(pools[1].allocate(2), ids(4, 5))  # state before the bitmap exists
    presence = KeyPresence(pools)
    held: list[list[list[int]]] = [[] for _ in pools]
    for _ in range(600):
        i = int(r.integers(len(pools)))
        p = pools[i]
        if held[i] and (r.random() < 0.4 or p.num_free < 4):
            p.free(held[i].pop(int(r.integers(len(held[i])))))
            continue
        n = int(r.integers(1, min(p.num_free, 16) + 1))
        blocks = p.allocate(n)
        start = int(r.integers(0, 12))
        keys = (start + np.arange(n)) % 12  # prefixes overlap: duplicate copies arise
        k = int(r.integers(0, n + 1))
        p.cache(blocks[:k], keys[:k])
        held[i].append(blocks)
        for _probe in range(3):
            a = int(r.integers(0, 12))
            probe = (a + np.arange(int(r.integers(0, 8)))) % 12
            assert presence.leading_counts(probe).tolist() == [
                q.num_cached_prefix(probe) for q in pools]
    assert presence.mask.dtype == np.uint8
    assert all(p.num_evicted > 20 for p in pools)  # the bitmap saw evictions


def test_key_presence_word_size_follows_the_fleet() -> None:
    from sim.kv import KeyPresence

    pools = [BlockPool(num_blocks=4, block_size=2, hash_block_tokens=2, num_hash_ids=4)
             for _ in range(20)]
    pools[17].cache(pools[17].allocate(2), ids(0, 1))
    presence = KeyPresence(pools)
    assert presence.mask.dtype == np.uint32
    assert presence.leading_counts(ids(0, 1, 2)).tolist() == [0] * 17 + [2] + [0, 0]
