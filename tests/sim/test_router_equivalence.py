"""Every router gives the same per-request records in step-by-step and fast-forward
mode, including routers that read engine state mid-run (a fast-forward run then
hands out the in-flight step's blocks before the router reads the pool)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from sim.cluster import Cluster
from sim.engines.vllm import VllmEngine
from sim.kv import dense_hash_ids
from sim.metrics import build_records
from sim.router import make_router
from tests.sim.factories import assert_same_records
from tests.sim.test_properties import check_invariants, scenarios

ROUTER_CASES = [
    ("random", {}),
    ("least_outstanding_requests", {}),
    ("least_outstanding_tokens", {}),
    ("power_of_two", {}),
    ("session_affinity", {}),
    ("kv_aware", {"view": "exact", "block_size": 2}),
    ("kv_aware", {"view": "exact", "overlap_score_weight": 4.0, "block_size": 4}),
    ("kv_aware", {"view": "approx", "ttl_s": 3.0, "block_size": 4}),
    ("kv_aware", {"view": "exact", "temperature": 0.5, "block_size": 2}),
    ("kv_aware", {"view": "events", "event_lag_ms": 0, "block_size": 2}),
    ("kv_aware", {"view": "events", "event_lag_ms": 1500, "block_size": 2}),
]


def run(trace, cfg, workers, ff, timing, closed, kind, params):
    dense, n_ids = dense_hash_ids(trace.hash_ids)
    engines = [VllmEngine(cfg, timing, trace.hash_block_tokens, n_ids, fast_forward=ff)
               for _ in range(workers)]
    router = make_router(kind, dict(params), workers, np.random.default_rng(7))
    outcome = Cluster(engines, router, trace, dense, closed).run()
    return outcome, build_records(outcome)


@pytest.mark.parametrize(("kind", "params"), ROUTER_CASES,
                         ids=[f"{k}-{i}" for i, (k, _) in enumerate(ROUTER_CASES)])
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(case=scenarios())
def test_router_fast_forward_equivalence(kind, params, case) -> None:
    trace, cfg, workers, closed, timing = case
    workers = max(workers, 2)
    out_s, rec_s = run(trace, cfg, workers, False, timing, closed, kind, params)
    out_f, rec_f = run(trace, cfg, workers, True, timing, closed, kind, params)
    check_invariants(trace, cfg, out_s, rec_s)
    check_invariants(trace, cfg, out_f, rec_f)
    assert_same_records(rec_s, rec_f)


def _eviction_case():  # -> (trace, VllmConfig, timing)
    from sim.engines.vllm import VllmConfig
    from tests.sim.factories import LinearTiming, make_trace

    trace = make_trace([0.0, 10.0, 19.5], [4, 1, 4], [1, 12, 2], [[1, 2], [], [1, 2]],
                       hash_block_tokens=2)
    cfg = VllmConfig(max_num_seqs=4, max_num_batched_tokens=16, num_gpu_blocks=5,
                     block_size=2, max_model_len=64)
    return trace, cfg, LinearTiming(base=1.0, per_prefill_token=0.1, per_decode_seq=0.5)


@pytest.mark.parametrize("ff", [False, True])
def test_mid_run_eviction_is_seen_by_a_kv_aware_router(ff: bool) -> None:
    """Worker 0 (4 usable blocks of 2 tokens) first serves R1 (prompt hash 1, 2; one
    output token): its blocks are cached and freed, queue 3, 4, 2, 1. R2 (1-token
    prompt, 12 outputs, at 10 s) then decodes alone, 1.5 s a step: its run takes
    block 4 at step 2 (13 s), block 2 at step 4 (16 s: hash 2 evicted), block 1 at
    step 6 (19 s: hash 1 evicted). R3 (hash 1, 2) arrives at 19.5 s, mid step 6.
    Worker 0 caches nothing of it any more: cost 2 prefill + 1 active block = 3
    against worker 1's 2 + 0, so worker 1. Had the run not taken step 6's block yet
    (hash 1 still cached) the costs would tie at 2 and worker 0 would win."""
    trace, cfg, timing = _eviction_case()
    _, rec = run(trace, cfg, 2, ff, timing, None, "kv_aware",
                 {"view": "exact", "tie_break": "first"})
    assert rec.columns["worker_id"].tolist() == [0, 0, 1]


@pytest.mark.parametrize("ff", [False, True])
@pytest.mark.parametrize(("lag_ms", "third"), [(0, 1), (400, 1), (600, 0), (1000, 0)])
def test_kv_event_lag_hides_an_eviction_until_it_arrives(ff: bool, lag_ms: int,
                                                         third: int) -> None:
    """The case above through the router's event view: worker 0 evicts hash 2 at
    16 s and hash 1 at 19 s (BlockRemoved events stamped with those step starts);
    R3 arrives at 19.5 s. With a lag of 400 ms the view holds events up to 19.1 s:
    both evictions seen, worker 1 as with the exact view. With 600 ms (events up to
    18.9 s) or 1 s, hash 1's eviction is still on its way: worker 0 seems to hold
    R3's first block, cost 1 prefill + 1 active = 2 against worker 1's 2 + 0, a tie
    that goes to worker 0, which then recomputes the whole prompt."""
    trace, cfg, timing = _eviction_case()
    _, rec = run(trace, cfg, 2, ff, timing, None, "kv_aware",
                 {"view": "events", "event_lag_ms": lag_ms, "tie_break": "first"})
    assert rec.columns["worker_id"].tolist() == [0, 0, third]
    assert rec.columns["num_cached_tokens"].tolist()[2] == 0  # nothing left to hit
