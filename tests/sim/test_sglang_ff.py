"""SGLang fast-forward runs equal step-by-step mode: random scenarios (hypothesis)
and hand-made runs cut by an arrival, ended by the decayed ratio, ended before a
retraction."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.cluster import Cluster
from sim.engines.sglang import SglangConfig, SglangEngine
from sim.kv import dense_hash_ids
from sim.metrics import build_records
from sim.router import make_router
from sim.workload import ClosedLoop
from tests.sim.factories import LinearTiming, assert_same_records, make_trace


def run_sglang(trace, cfg: SglangConfig, num_workers: int, fast_forward: bool,
               timing=None, closed_loop=None, router_kind: str = "round_robin",
               router_params: dict | None = None):  # -> (SimOutcome, Records)
    """tests/sim/factories.py run_cluster, with SGLang engines."""
    dense, n_ids = dense_hash_ids(trace.hash_ids)
    engines = [SglangEngine(cfg, timing or LinearTiming(), trace.hash_block_tokens, n_ids,
                            fast_forward=fast_forward) for _ in range(num_workers)]
    router = make_router(router_kind, dict(router_params or {}), num_workers,
                         np.random.default_rng(0))
    outcome = Cluster(engines, router, trace, dense, closed_loop).run()  # type: ignore[arg-type]
    return outcome, build_records(outcome)


def assert_same(step, ff) -> None:
    (out_s, rec_s), (out_f, rec_f) = step, ff
    assert_same_records(rec_s, rec_f)
    for es, ef in zip(out_s.engines, out_f.engines, strict=True):
        a, b = es.steps.columns(), ef.steps.columns()
        for k in a:
            assert a[k].shape == b[k].shape, k
            np.testing.assert_allclose(b[k], a[k], rtol=1e-9, err_msg=k)
        assert es.summary() == ef.summary()
        assert es.num_prefix_hit_tokens == ef.num_prefix_hit_tokens
        assert es.pool.num_private_tokens == ef.pool.num_private_tokens == 0
        assert es.pool.num_tree_tokens == ef.pool.num_tree_tokens
        assert es.pool._clock == ef.pool._clock  # same number of matches
        for e in (es, ef):  # the leaves eviction keeps track of are the tree's leaves
            assert e.pool._leaf_set == set(e.pool._leaves())


def check_invariants(trace, outcome, records) -> None:
    c = records.columns
    n = len(trace)
    assert sorted(c["request_id"].tolist()) == list(range(n))
    ok = c["status"] == "ok"
    want = trace.output_tokens[c["request_id"]]
    assert (c["num_output_tokens"][ok] == want[ok]).all()
    for e in outcome.engines:
        assert not e.has_work
        assert e.pool.num_evictable_tokens == e.pool.num_tree_tokens  # nothing locked


@st.composite
def scenarios(draw: st.DrawFn):
    # page_size > 1: slots are taken, cached and released in whole pages
    page = draw(st.sampled_from([1, 1, 2, 4]))
    pool = draw(st.integers(24, 600))
    chunk = draw(st.sampled_from([-1, 8, 16, 64, 256]))
    decay = draw(st.sampled_from([0.0, 0.01, 0.05, 0.2]))
    init = draw(st.sampled_from([0.1, 0.4, 0.7, 1.0]))
    cfg = SglangConfig(
        max_running_requests=draw(st.integers(1, 10)),
        max_total_tokens=pool,
        chunked_prefill_size=chunk,
        max_prefill_tokens=draw(st.sampled_from([16, 64, 1024])),
        schedule_policy=draw(st.sampled_from(["fcfs", "lpm"])),
        enable_mixed_chunk=draw(st.booleans()),
        init_new_token_ratio=init,
        new_token_ratio_decay=decay,
        min_new_token_ratio=draw(st.sampled_from([0.0, init / 2, init])),
        enable_prefix_caching=draw(st.booleans()),
        radix_eviction_policy=draw(st.sampled_from(["lru", "lfu", "fifo"])),
        page_size=page,
        ignore_eos=draw(st.booleans()),
        clip_max_new_tokens=draw(st.sampled_from([4096, 20])),
        retract_decode_steps=draw(st.sampled_from([1, 5, 20])),
        # a request longer than the pool can livelock (admitted under a clipped
        # estimate, retracted, readmitted) in both modes: refuse those at intake
        max_model_len=pool - 2 * page,
    )
    n = draw(st.integers(1, 22))
    gaps = draw(st.lists(st.sampled_from([0.0, 0.0, 0.01, 0.3, 1.0, 5.0]), min_size=n,
                         max_size=n))
    arrival = np.cumsum(gaps).tolist()
    hb = draw(st.sampled_from([2, 4, 8]))
    inputs, outputs, hashes = [], [], []
    families = draw(st.integers(1, 3))
    for i in range(n):
        long_out = draw(st.booleans())
        inp = draw(st.integers(1, 90))
        out = draw(st.integers(1, 150 if long_out else 12))
        fam = draw(st.integers(0, families - 1))
        nblk = -(-inp // hb)
        shared = draw(st.integers(0, nblk))
        ids = [fam * 1000 + k for k in range(shared)] + [100_000 + i * 1000 + k
                                                         for k in range(shared, nblk)]
        inputs.append(inp)
        outputs.append(out)
        hashes.append(ids)
    trace = make_trace(arrival, inputs, outputs, hashes, hash_block_tokens=hb)
    workers = draw(st.integers(1, 3))
    closed = ClosedLoop(draw(st.integers(1, 4))) if draw(st.booleans()) else None
    timing = LinearTiming(base=draw(st.sampled_from([0.01, 0.25])), per_prefill_token=0.001,
                          per_decode_seq=0.002, per_context=draw(st.sampled_from([0.0, 1e-5])))
    return trace, cfg, workers, closed, timing


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios())
def test_fast_forward_equals_step_by_step(case) -> None:
    trace, cfg, workers, closed, timing = case
    step = run_sglang(trace, cfg, workers, False, timing, closed)
    ff = run_sglang(trace, cfg, workers, True, timing, closed)
    check_invariants(trace, *step)
    check_invariants(trace, *ff)
    assert_same(step, ff)


SGLANG_ROUTERS = [
    ("kv_aware", {"view": "exact", "block_size": 2}),
    ("kv_aware", {"view": "exact", "overlap_score_weight": 4.0, "temperature": 0.5}),
    ("least_outstanding_requests", {}),
    ("least_outstanding_tokens", {}),
    ("power_of_two", {}),
]


@pytest.mark.parametrize(("kind", "params"), SGLANG_ROUTERS,
                         ids=[f"{k}-{i}" for i, (k, _) in enumerate(SGLANG_ROUTERS)])
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(case=scenarios())
def test_routers_reading_sglang_workers_fast_forward_equals_step_by_step(kind, params,
                                                                        case) -> None:
    """Routers that read the workers mid-run (queues, the radix cache) see the same
    state in both modes: the cluster syncs an SGLang run's steps before they read."""
    trace, cfg, workers, closed, timing = case
    workers = max(workers, 2)
    step = run_sglang(trace, cfg, workers, False, timing, closed, kind, params)
    ff = run_sglang(trace, cfg, workers, True, timing, closed, kind, params)
    check_invariants(trace, *step)
    check_invariants(trace, *ff)
    assert_same(step, ff)


def test_kv_aware_reads_the_radix_cache_without_touching_it() -> None:
    """Worker 1 holds hash ids [1, 2] (8 tokens, one id per 4 tokens); a request on
    [1, 2, 3] (12 tokens) costs 3 blocks to prefill on worker 0 and 1 (the last id)
    on worker 1: worker 1. The router's reads leave the tree's access stamps and
    hit counts as they were."""
    from sim.router import KvAware

    cfg = _cfg(max_total_tokens=200)
    es = [SglangEngine(cfg, LinearTiming(), 4, 10, fast_forward=True) for _ in range(2)]
    warm = make_trace([0.0], [8], [1], [[1, 2]], hash_block_tokens=4)
    dense, _ = dense_hash_ids(warm.hash_ids)
    Cluster([es[1]], make_router("round_robin", {}, 1, np.random.default_rng(0)), warm,
            dense, None).run()  # type: ignore[arg-type]
    before = (es[1].pool._clock, es[1].pool.num_tree_tokens)
    router = make_router("kv_aware", {"tie_break": "first"}, 2, np.random.default_rng(0))
    assert isinstance(router, KvAware)
    from tests.sim.factories import make_request

    req = make_request(5, 12, 1, hash_ids=[0, 1, 7])  # dense ids: 1 -> 0, 2 -> 1; 7 new
    assert router.choose(req, es) == 1
    assert [(w, o, p) for w, o, p, _d, _c in router.last_costs] == [(0, 0, 3), (1, 2, 1)]
    assert (es[1].pool._clock, es[1].pool.num_tree_tokens) == before


# ------------------------------------------------------------------ hand-made runs
def _runs(outcome) -> list[int]:
    """Lengths of the engine's step-log segments (a run is one segment)."""
    return list(outcome.engines[0].steps._seg_len)


def _cfg(**knobs: object) -> SglangConfig:
    base: dict[str, object] = {"max_running_requests": 8, "max_total_tokens": 100,
                               "chunked_prefill_size": 64, "max_prefill_tokens": 64}
    base.update(knobs)
    return SglangConfig(**base)  # type: ignore[arg-type]


def test_run_cut_by_an_arrival() -> None:
    # A: 10 prompt + 30 out at t = 0; step 0 prefills (1 + 10 x 0.1 = 2 s), then
    # decode steps of 1.5 s: a run of 29 steps from t = 2. B arrives at t = 5,
    # inside run step 2 (3.5 .. 5.0 is step 1, 5.0 .. 6.5 step 2): B arrives exactly
    # at a step boundary, so the run stops after 2 steps and B is prefilled next.
    trace = make_trace([0.0, 5.0], [10, 6], [30, 3])
    step = run_sglang(trace, _cfg(), 1, False)
    ff = run_sglang(trace, _cfg(), 1, True)
    assert_same(step, ff)
    assert _runs(ff[0])[:3] == [1, 2, 1]
    # mid-step arrival (t = 4.2, inside step 1): step 1 completes, then B's prefill
    trace = make_trace([0.0, 4.2], [10, 6], [30, 3])
    step = run_sglang(trace, _cfg(), 1, False)
    ff = run_sglang(trace, _cfg(), 1, True)
    assert_same(step, ff)
    assert _runs(ff[0])[:3] == [1, 2, 1]


def test_run_ends_where_the_decayed_ratio_admits_the_waiting_head() -> None:
    # pool 110, A: 10 + 40, X: 30 + 40 (needs 30 + 40 + 1 page = 71). Step 0 is A's
    # prefill; at step j's decision A has j outputs, 110 - 10 - (j - 1) free slots
    # and an offset of (40 - j) x ratio, ratio decayed j - 1 times from 0.9 by 0.05:
    # j = 4: 97 - 36 x 0.75 = 70 < 71; j = 5: 96 - 35 x 0.7 = 71.5: X is admitted.
    # A's decodes, steps 1..4, are one run that ends before step 5's decision.
    cfg = _cfg(max_total_tokens=110, ignore_eos=False, init_new_token_ratio=0.9,
               min_new_token_ratio=0.0, new_token_ratio_decay=0.05)
    trace = make_trace([0.0, 0.0], [10, 30], [40, 40])
    step = run_sglang(trace, cfg, 1, False)
    ff = run_sglang(trace, cfg, 1, True)
    assert_same(step, ff)
    assert _runs(ff[0])[:3] == [1, 4, 1]
    assert ff[0].engines[0].steps.column("num_prefill_tokens")[5] == 30


def test_run_ends_before_a_retraction() -> None:
    # test_sglang.py's retraction case: pool 21, A: 4 + 10, B: 6 + 10, ratio 0.
    # Steps 2..6 decode both (2 slots a step: free 11 -> 1); step 7 cannot take 2
    # slots and retracts B. The run is steps 2..6 (5 steps, ended by the pool); step 7
    # is decided normally, then A decodes alone.
    cfg = _cfg(max_total_tokens=21, ignore_eos=False, init_new_token_ratio=0.0,
               min_new_token_ratio=0.0, new_token_ratio_decay=0.0, retract_decode_steps=1)
    trace = make_trace([0.0, 0.0], [4, 6], [10, 10])
    step = run_sglang(trace, cfg, 1, False)
    ff = run_sglang(trace, cfg, 1, True)
    assert_same(step, ff)
    assert _runs(ff[0])[:4] == [1, 1, 5, 1]
    assert ff[0].engines[0].num_preemptions == 1


def test_lpm_head_after_the_runs_first_step_evicted() -> None:
    """Found by the property test above (CI, 2026-11-27): worker 0's decode step at
    0.374 s evicts the tree to make room. Its lpm sort had come before that and left
    request 3 ahead of request 15; the next decision sorts again on the evicted tree,
    request 15 (22 of 23 tokens cached under a running request's lock) comes first and
    is admitted at 0.386 s. The run's admission horizon must test that request, not
    the queue's head, or fast-forward admits it 0.19 s late."""
    hash_ids = [[100000], list(range(12)), [0], [0, *range(103001, 103031)],
                [104000, 104001], [0], [0], [107000], [108000], [109000], [110000],
                [111000], [112000], [113000], [114000], list(range(12)), [0]]
    trace = make_trace([0.0] * 15 + [0.3, 0.3],
                       [1, 23, 1, 61, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 23, 1],
                       [1, 30, 12, 12, 3, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 2, 7], hash_ids,
                       hash_block_tokens=2)
    cfg = SglangConfig(max_running_requests=10, max_total_tokens=111,
                       chunked_prefill_size=-1, max_prefill_tokens=1024,
                       schedule_policy="lpm", enable_mixed_chunk=False,
                       init_new_token_ratio=0.4, new_token_ratio_decay=0.2,
                       min_new_token_ratio=0.4, enable_prefix_caching=True,
                       radix_eviction_policy="fifo", page_size=1, max_model_len=109,
                       ignore_eos=False, clip_max_new_tokens=4096, retract_decode_steps=1)
    timing = LinearTiming(base=0.01, per_prefill_token=0.001, per_decode_seq=0.002,
                          per_context=1e-5)
    params = {"view": "exact", "overlap_score_weight": 4.0, "temperature": 0.5}
    step = run_sglang(trace, cfg, 3, False, timing, None, "kv_aware", params)
    ff = run_sglang(trace, cfg, 3, True, timing, None, "kv_aware", params)
    assert step[1].columns["worker_id"][15] == 0
    assert step[1].columns["first_token_s"][15] < 0.42  # admitted at the next decision
    assert_same(step, ff)
