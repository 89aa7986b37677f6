"""The planner inside a run: a scaled-up worker serves after its start-up delay,
drained workers stop, GPU-seconds add up, and both engine modes decide the same."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.autoscale import Autoscaler
from sim.cluster import Cluster
from sim.engines.vllm import VllmConfig, VllmEngine
from sim.kv import dense_hash_ids
from sim.metrics import build_records
from sim.planner import FixedDelay, LoadPolicy, Planner, PlannerLimits, UniformDelay
from sim.router import make_router
from tests.sim.factories import LinearTiming, assert_same_records, make_trace
from tests.sim.test_properties import check_invariants

CFG = VllmConfig(max_num_seqs=1, max_num_batched_tokens=64, num_gpu_blocks=41, block_size=4,
                 max_model_len=1000)


def run_scaled(trace, cfg=CFG, initial=1, delay=None, interval=10.0, max_workers=2,
               router="round_robin", ff=False, timing=None, policy=None, seed=0):
    timing = timing or LinearTiming(base=1.0, per_prefill_token=0.1, per_decode_seq=0.5)
    dense, n_ids = dense_hash_ids(trace.hash_ids)

    def engine():
        return VllmEngine(cfg, timing, trace.hash_block_tokens, n_ids, fast_forward=ff)

    planner = Planner(policy or LoadPolicy(), PlannerLimits(1, max_workers), interval)
    scaler = Autoscaler(planner, delay or FixedDelay(30.0), engine,
                        np.random.default_rng(seed))
    kind, params = (("kv_aware", {"view": "events", "event_lag_ms": 3000})
                    if router == "kv_aware_events" else (router, {}))
    rt = make_router(kind, params, 64, np.random.default_rng(seed))
    cluster = Cluster([engine() for _ in range(initial)], rt, trace, dense, autoscaler=scaler)
    outcome = cluster.run()
    return cluster, scaler, outcome, build_records(outcome)


@pytest.mark.parametrize("ff", [False, True])
def test_scale_up_worker_serves_first_request_after_the_startup_delay(ff: bool) -> None:
    # One worker, one sequence at a time: three requests at 0 s queue up (2 waiting
    # at the 10 s tick: 2 per ready worker > 0.5 -> scale up to 2). Worker 1 starts
    # at 10 s and is ready after the fixed 30 s delay: at 40 s. A request at 39.9 s
    # still goes to worker 0 (the only ready one); one at 40.0 s goes to worker 1
    # (round robin's pointer is at 1) and its first step runs 40.0 -> 41.4
    # (1 + 0.1 x 4 prompt tokens).
    trace = make_trace([0.0, 0.0, 0.0, 39.9, 40.0], [4] * 5, [20, 20, 20, 2, 2])
    _, scaler, outcome, rec = run_scaled(trace, ff=ff)
    w = rec.columns["worker_id"].tolist()
    assert w == [0, 0, 0, 0, 1]
    assert rec.columns["first_token_s"][4] == pytest.approx(41.4)
    starts = outcome.engines[1].steps.column("start_s")
    assert starts[0] == 40.0
    fw = scaler.fleet.workers[1]
    assert (fw.start_s, fw.ready_s) == (10.0, 40.0)
    first = scaler.planner.decisions[0]
    assert first.time_s == 10.0 and first.num_workers == 2
    assert first.inputs["queue_per_worker"] == 2.0


def test_idle_worker_drains_and_stops_and_gpu_seconds_add_up() -> None:
    trace = make_trace([0.0, 0.0, 0.0, 40.0], [4] * 4, [20, 20, 20, 2])
    _, scaler, outcome, rec = run_scaled(trace)
    kinds = [(e.time_s, e.worker_id, e.kind) for e in scaler.fleet.events]
    # the tick after worker 1's request ends finds it idle (KV 0 < 0.5, queue 0 <
    # 0.2): one worker down, the one with the fewest active requests (ties: newest)
    drains = [k for k in kinds if k[2] == "drain"]
    stops = [k for k in kinds if k[2] == "stop"]
    assert drains and stops and drains[0][1] == stops[0][1]
    d = scaler.fleet.workers[drains[0][1]]
    assert d.stop_s >= d.drain_s
    end = float(rec.columns["finish_s"].max())
    want = sum(min(w.stop_s if np.isfinite(w.stop_s) else end, end) - w.start_s
               for w in scaler.fleet.workers.values())
    assert scaler.fleet.gpu_seconds(end) == pytest.approx(want)
    assert scaler.summary(end)["gpu_seconds"] == pytest.approx(want)
    for e in outcome.engines:
        assert e.pool.num_free == e.pool.num_usable


@st.composite
def bursts(draw: st.DrawFn):
    n = draw(st.integers(1, 30))
    gaps = draw(st.lists(st.sampled_from([0.0, 0.0, 0.2, 1.0, 8.0, 25.0]), min_size=n,
                         max_size=n))
    inputs = draw(st.lists(st.integers(1, 40), min_size=n, max_size=n))
    outputs = draw(st.lists(st.integers(1, 30), min_size=n, max_size=n))
    hashes = [list(range(-(-i // 4))) for i in inputs]
    trace = make_trace(np.cumsum(gaps).tolist(), inputs, outputs, hashes, hash_block_tokens=4)
    return dict(trace=trace, initial=draw(st.integers(1, 2)),
                delay=UniformDelay(0.0, draw(st.sampled_from([0.0, 5.0, 40.0]))),
                interval=draw(st.sampled_from([2.0, 5.0, 10.0])),
                max_workers=draw(st.integers(2, 4)),
                router=draw(st.sampled_from(["round_robin", "least_outstanding_requests",
                                             "kv_aware", "kv_aware_events",
                                             "power_of_two"])),
                policy=LoadPolicy(kv_scale_up=0.6, kv_scale_down=0.2,
                                  queue_scale_up=0.5, queue_scale_down=0.2),
                cfg=VllmConfig(max_num_seqs=draw(st.integers(1, 4)), max_num_batched_tokens=32,
                               num_gpu_blocks=draw(st.integers(12, 40)), block_size=4,
                               max_model_len=44),
                timing=LinearTiming(base=0.3, per_prefill_token=0.01, per_decode_seq=0.05,
                                    per_context=1e-4),
                seed=draw(st.integers(0, 3)))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bursts())
def test_planner_runs_match_in_both_modes(case) -> None:
    _, sc_s, out_s, rec_s = run_scaled(**case, ff=False)
    _, sc_f, out_f, rec_f = run_scaled(**case, ff=True)
    check_invariants(case["trace"], case["cfg"], out_s, rec_s)
    check_invariants(case["trace"], case["cfg"], out_f, rec_f)
    assert [(e.time_s, e.worker_id, e.kind) for e in sc_s.fleet.events] == \
        [(e.time_s, e.worker_id, e.kind) for e in sc_f.fleet.events]
    assert_same_records(rec_s, rec_f)
