"""SGLang engine model and radix cache: hand-computed sequences."""

from __future__ import annotations

import numpy as np

from sim.cluster import Cluster
from sim.engines.sglang import SglangConfig, SglangEngine
from sim.kv import dense_hash_ids
from sim.radix import RadixCache, request_segments
from sim.router import make_router
from tests.sim.factories import LinearTiming, drive, make_request, make_trace


def make_sglang(max_total_tokens: int = 100, hash_block_tokens: int = 4, **knobs: object
                ) -> SglangEngine:
    base: dict[str, object] = {"max_running_requests": 8, "chunked_prefill_size": 64,
                               "max_prefill_tokens": 64}
    base.update(knobs)
    cfg = SglangConfig(max_total_tokens=max_total_tokens, **base)  # type: ignore[arg-type]
    return SglangEngine(cfg, LinearTiming(), hash_block_tokens, 1000)


def scheduled(log):
    return [[(r.rid, n) for r, n in plan.scheduled] for _, plan in log]


# ------------------------------------------------------------------ radix cache
def test_radix_insert_split_lock_and_lru_eviction() -> None:
    t = 4  # tokens per hash block
    a = request_segments([1, 2], 8, t, rid=0)  # tokens 0..4 label 1, 4..8 label 2
    b = request_segments([1, 3], 6, t, rid=1)  # tokens 0..4 label 1, 4..6 label 3
    c = request_segments([5], 4, t, rid=2)
    cache = RadixCache(100)
    assert cache.insert(a, 8)[0] == 0  # nothing was cached: one leaf [0, 8)
    assert (cache.num_nodes, cache.num_tree_tokens, cache.num_evictable_tokens) == (1, 8, 8)
    # B shares A's first block: A's node splits at 4 into [0, 4) + [4, 8), B adds [4, 6)
    cached, leaf_b = cache.insert(b, 6)
    assert cached == 4 and (leaf_b.start, leaf_b.end) == (4, 6)
    assert (cache.num_nodes, cache.num_tree_tokens, cache.num_evictable_tokens) == (3, 10, 10)
    # a running B locks its path: [4, 6) and [0, 4); only A's tail [4, 8) is evictable
    cache.lock(leaf_b)
    assert cache.num_evictable_tokens == 4
    assert cache.match(a, 8)[0] == 8
    assert cache.match(b, 5)[0] == 5  # at most 5 tokens: B's own node [4, 6) splits at 5
    assert cache.num_nodes == 4 and cache.num_tree_tokens == 10
    # evicting 3 tokens takes the only unlocked leaf, A's tail (4 tokens)
    assert cache.evict(3) == 4
    assert (cache.num_nodes, cache.num_tree_tokens, cache.num_evictable_tokens) == (3, 6, 0)
    assert cache.match(a, 8)[0] == 4
    cache.unlock(leaf_b)
    assert cache.num_evictable_tokens == 6
    cache.insert(c, 4)  # C: a new leaf [0, 4)
    cache.match(b, 6)  # B's path [0, 4) [4, 5) [5, 6) is touched after C was inserted
    # unlocked leaves: C (4 tokens) and B's [5, 6) (1 token); LRU: C is older, so
    # C goes first although one token from B's leaf would have been enough
    assert cache.evict(1) == 4
    assert cache.match(c, 4)[0] == 0
    assert cache.match(b, 6)[0] == 6
    # LFU on the same shape would evict by hit count instead
    lfu = RadixCache(100, policy="lfu")
    lfu.insert(a, 8)
    lfu.insert(c, 4)
    for _ in range(3):
        lfu.match(c, 4)  # C hit 3 times, A never
    assert lfu.evict(1) == 8
    assert lfu.match(c, 4)[0] == 4


# ------------------------------------------------------------------- admission
def test_new_token_ratio_refuses_admission() -> None:
    # pool 100 tokens; A: 10 prompt + 40 out, X: 30 prompt + 40 out, both at t = 0.
    # Step 0: A admitted (10 + 40 + 1 page = 51 <= 100). X: A's promise is now
    # 10 + 40 = 50, free 90: 90 - 50 = 40 < 30 + 40 + 1 = 71, refused.
    # Step 1: A runs with 39 outputs to go. At ratio 0.5 the estimate is
    # 39 x 0.5 = 19.5: 90 - 19.5 = 70.5 < 71: refused again, A decodes.
    # At ratio 0.4: 39 x 0.4 = 15.6, 90 - 15.6 = 74.4 >= 71: X is admitted.
    logs = {}
    for ratio in (0.5, 0.4):
        eng = make_sglang(100, ignore_eos=False, init_new_token_ratio=ratio,
                          min_new_token_ratio=ratio, new_token_ratio_decay=0.0)
        a, x = make_request(0, 10, 40), make_request(1, 30, 40)
        logs[ratio] = scheduled(drive(eng, [a, x]))
        assert a.num_output == 40 and x.num_output == 40
    assert logs[0.5][:2] == [[(0, 10)], [(0, 1)]]
    # every later step is worse for X (free -1 token, estimate -0.5): it waits for A's
    # 40 tokens (steps 0..39) and is admitted in step 40
    assert logs[0.5][40] == [(1, 30)]
    assert logs[0.4][:2] == [[(0, 10)], [(1, 30)]]


def test_ignore_eos_requests_are_counted_at_ratio_one() -> None:
    # as above at ratio 0.4, but ignore_eos: the estimate is 39 x 1.0 = 39,
    # 90 - 39 = 51 < 71: X is refused in step 1
    eng = make_sglang(100, ignore_eos=True, init_new_token_ratio=0.4,
                      min_new_token_ratio=0.4, new_token_ratio_decay=0.0)
    log = scheduled(drive(eng, [make_request(0, 10, 40), make_request(1, 30, 40)]))
    assert log[1] == [(0, 1)]


# ------------------------------------------------------------------ retraction
def test_retraction_of_fewest_outputs_then_longest_input() -> None:
    # pool 21 tokens, ratio 0 (admission counts running requests as needing nothing),
    # retract_decode_steps 1. A: 4 prompt + 10 out, B: 6 prompt + 10 out.
    # step 0: A (4 + 10 + 1 = 15 <= 21); B refused (17 > 21 - 4 - 14 = 3)
    # step 1: B (17 <= 21 - 4 = 17) prefills; A waits (prefill first, no mixing)
    # steps 2..6: both decode, 2 tokens a step: free 21 - 10 = 11 -> 1
    # step 7: 2 tokens needed, 1 free, nothing evictable: retract. Both have 6
    # outputs; B has the longer input, so B goes. Its 5 decoded tokens are freed,
    # its 6 prompt tokens stay in the radix tree (evictable).
    eng = make_sglang(21, ignore_eos=False, init_new_token_ratio=0.0, min_new_token_ratio=0.0,
                      new_token_ratio_decay=0.0, retract_decode_steps=1)
    a, b = make_request(0, 4, 10), make_request(1, 6, 10)
    log = drive(eng, [a, b])
    steps = scheduled(log)
    assert steps[:2] == [[(0, 4)], [(1, 6)]]
    assert steps[2:7] == [[(0, 1), (1, 1)]] * 5
    assert steps[7] == [(0, 1)]
    assert [r.rid for r in log[7][1].preempted] == [1]
    # the ratio is re-estimated from A: (6 decoded + 1 x 1) / (10 + 1)
    # steps 8..10: B needs (12 - 6 cached) + 4 outputs to go + 1 page = 11 tokens;
    # step 8 has free 5 + evictable 6 - A's estimate 3 x 7/11 = 9.1 < 11, and later
    # steps less: refused until A finishes (step 10). Step 11: B recomputes its 6
    # decoded tokens over its cached prompt, then decodes 3 more.
    assert steps[8:11] == [[(0, 1)]] * 3
    assert steps[11] == [(1, 6)]
    assert len(steps) == 15
    assert b.num_preemptions == 1 and a.num_preemptions == 0
    assert eng.num_preemptions == 1
    assert a.num_output == 10 and b.num_output == 10
    assert b.num_cached_tokens == 0  # set at first admission
    assert eng.pool.num_private_tokens == 0


def test_retraction_resets_the_ratio() -> None:
    eng = make_sglang(21, ignore_eos=False, init_new_token_ratio=0.0, min_new_token_ratio=0.0,
                      new_token_ratio_decay=0.0, retract_decode_steps=1)
    a, b = make_request(0, 4, 10), make_request(1, 6, 10)
    eng.add_request(a)
    eng.add_request(b)
    for _ in range(8):
        plan = eng.schedule(0.0)
        assert plan is not None
        eng.commit(plan, 1)
    assert eng.num_preemptions == 1
    assert eng.new_token_ratio == (6 + 1) / (10 + 1)


# ---------------------------------------------------------------- queue policy
def _cached_engine(policy: str) -> SglangEngine:
    eng = make_sglang(1000, schedule_policy=policy, max_prefill_tokens=1000,
                      chunked_prefill_size=1000, max_running_requests=200)
    drive(eng, [make_request(0, 8, 1, hash_ids=[1, 2])])  # caches blocks 1, 2
    return eng


def test_lpm_orders_by_cached_prefix_and_fcfs_keeps_arrival_order() -> None:
    for policy, order in (("fcfs", [(1, 8), (2, 4)]), ("lpm", [(2, 4), (1, 8)])):
        eng = _cached_engine(policy)
        eng.add_request(make_request(1, 8, 1, hash_ids=[7, 8]))  # nothing cached
        eng.add_request(make_request(2, 12, 1, hash_ids=[1, 2, 3]))  # 8 tokens cached
        plan = eng.schedule(10.0)
        assert plan is not None
        assert [(r.rid, n) for r, n in plan.scheduled] == order
        assert eng.num_lpm_fallbacks == 0


def test_lpm_falls_back_to_fcfs_above_128_waiting_and_counts_it() -> None:
    eng = _cached_engine("lpm")
    eng.add_request(make_request(1, 8, 1, hash_ids=[7, 8]))
    eng.add_request(make_request(2, 12, 1, hash_ids=[1, 2, 3]))
    for i in range(127):  # 129 waiting
        eng.add_request(make_request(3 + i, 4, 1, hash_ids=[100 + i]))
    plan = eng.schedule(10.0)
    assert plan is not None
    assert [r.rid for r, _ in plan.scheduled][:2] == [1, 2]  # arrival order
    assert eng.num_lpm_fallbacks == 1
    assert eng.summary()["num_lpm_fallbacks"] == 1


def test_chunked_prefill_one_request_at_a_time_and_mixed_chunk() -> None:
    # chunk 8: A (20 tokens) is cut 8 + 8 + 4; B waits behind the chunked request
    eng = make_sglang(200, chunked_prefill_size=8, max_prefill_tokens=8)
    a, b = make_request(0, 20, 2), make_request(1, 6, 2)
    steps = scheduled(drive(eng, [a, b]))
    assert steps[:4] == [[(0, 8)], [(0, 8)], [(0, 4), (1, 4)], [(1, 2)]]
    # mixed chunk: the running decode rides in the extend batch and costs a chunk token
    eng = make_sglang(200, chunked_prefill_size=8, max_prefill_tokens=8,
                      enable_mixed_chunk=True)
    a, b = make_request(0, 4, 3), make_request(1, 10, 1, arrival_s=1.0)
    steps = scheduled(drive(eng, [a, b]))
    # step 0 (t = 0): A's prefill (1.4 s); step 1: B arrived: 8 - 1 decode = 7 tokens
    assert steps[:3] == [[(0, 4)], [(1, 7), (0, 1)], [(1, 3), (0, 1)]]


def test_too_long_requests_are_rejected() -> None:
    eng = make_sglang(100, max_model_len=50)
    req = make_request(0, 40, 20)
    assert not eng.add_request(req)
    assert "max_model_len 50" in req.reject_reason


# ---------------------------------------------------------------------- cluster
def test_cluster_run_completes_every_request() -> None:
    rng = np.random.default_rng(3)
    n = 40
    arrivals = np.sort(rng.uniform(0, 30, n))
    prompts = rng.integers(5, 60, n)
    outputs = rng.integers(1, 20, n)
    hashes = [[int(h) for h in rng.integers(0, 4, 1)] + [1000 + i] for i in range(n)]
    prompts = np.maximum(prompts, 5)
    trace = make_trace(arrivals, prompts, outputs, hash_ids=hashes, hash_block_tokens=4)
    dense, n_ids = dense_hash_ids(trace.hash_ids)
    cfg = SglangConfig(max_running_requests=6, max_total_tokens=300, chunked_prefill_size=32,
                       max_prefill_tokens=48, schedule_policy="lpm")
    engines = [SglangEngine(cfg, LinearTiming(), 4, n_ids) for _ in range(2)]
    router = make_router("round_robin", {}, 2, np.random.default_rng(0))
    outcome = Cluster(engines, router, trace, dense, None).run()  # type: ignore[arg-type]
    reqs = outcome.requests
    assert len(reqs) == n
    for r in reqs:
        assert r.num_output == r.max_output_tokens
        assert r.arrival_s <= r.first_token_s <= r.finish_s
        assert sum(b - a for a, b in zip(r.token_steps[::2], r.token_steps[1::2],
                                         strict=True)) == r.max_output_tokens
    for e in engines:
        ends = e.steps.column("end_s")
        assert np.all(np.diff(ends) > 0)
        assert e.pool.num_private_tokens == 0 and not e.has_work
        assert e.pool.num_evictable_tokens == e.pool.num_tree_tokens  # nothing locked


def test_pages_that_differ_inside_the_first_page_are_siblings() -> None:
    """page_size 4: A = [h1 x4 | h2 x4], B = [h1 x2 | h3 x6] share two tokens, less than
    a page, so B matches nothing and becomes a second child of the root (keyed by its
    first page, as SGLang does), not a replacement of A's entry. Both stay reachable:
    evicting 16 tokens frees both (before this, B overwrote A's key and A's 8 tokens
    leaked: counted evictable, never found)."""
    c = RadixCache(32, page_size=4)
    a, b = [(1, 4), (2, 8)], [(1, 2), (3, 8)]
    assert c.insert(a, 8)[0] == 0
    assert c.match(b, 8)[0] == 0
    assert c.insert(b, 8)[0] == 0
    assert len(c.root.children) == 2 and c.num_tree_tokens == 16
    assert c.match(a, 8)[0] == 8 and c.match(b, 8)[0] == 8
    assert c.evict(16) == 16 and c.num_tree_tokens == 0 and c.num_evictable_tokens == 0
