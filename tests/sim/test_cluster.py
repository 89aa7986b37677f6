"""The cluster's event order, computed by hand (dyadic step times: exact floats)."""

import numpy as np
import pytest

from sim.engines.vllm import VllmConfig
from sim.errors import CatalogError
from sim.timing import TimingProfile
from sim.workload import ClosedLoop
from tests.sim.factories import LinearTiming, make_trace, run_cluster

# step = 1 + 0.25 * prefill tokens + 0.5 * decoding sequences
TIMING = LinearTiming(base=1.0, per_prefill_token=0.25, per_decode_seq=0.5, per_context=0.0)
CFG = VllmConfig(max_num_seqs=8, max_num_batched_tokens=64, num_gpu_blocks=64, block_size=4,
                 max_model_len=200)


def token_times(records, i):
    off = records.token_offsets
    return records.token_times_s[off[i]:off[i + 1]].tolist()


@pytest.mark.parametrize("ff", [False, True])
@pytest.mark.parametrize("b_arrival", [4.0, 5.0])
def test_arrival_during_a_decode_run_joins_at_the_next_boundary(ff: bool,
                                                                b_arrival: float) -> None:
    # A (4-token prompt, 10 out) at 0; B (2-token prompt, 2 out) at 4.0 (mid-step) or
    # 5.0 (exactly on a step boundary): both times B is first scheduled at 5.0.
    trace = make_trace([0.0, b_arrival], [4, 2], [10, 2])
    outcome, rec = run_cluster(trace, CFG, 1, ff, TIMING)
    # A: prefill 0-2.0; decodes 1.5 each: 3.5, 5.0; at 5.0 B's prefill joins A's
    # decode (1 + 0.5 + 0.5 = 2.0) -> 7.0; both decode (2.0) -> 9.0, B done;
    # A alone: 10.5, 12.0, 13.5, 15.0, 16.5
    assert token_times(rec, 0) == [2.0, 3.5, 5.0, 7.0, 9.0, 10.5, 12.0, 13.5, 15.0, 16.5]
    assert token_times(rec, 1) == [7.0, 9.0]
    assert rec.columns["first_token_s"].tolist() == [2.0, 7.0]
    assert rec.columns["finish_s"].tolist() == [16.5, 9.0]
    steps = outcome.engines[0].steps
    assert steps.num_steps == 10  # forward passes, whichever the mode
    assert steps.column("num_prefill_tokens").tolist() == [4, 0, 0, 2, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("ff", [False, True])
def test_round_robin_alternates_workers(ff: bool) -> None:
    trace = make_trace([0.0, 0.0, 0.0], [4, 4, 4], [1, 1, 1])
    _, rec = run_cluster(trace, CFG, 2, ff, TIMING)
    assert rec.columns["worker_id"].tolist() == [0, 1, 0]
    # worker 0 runs requests 0 and 2 in one step (P=8: 3.0), worker 1 request 1 (2.0)
    assert rec.columns["finish_s"].tolist() == [3.0, 2.0, 3.0]


@pytest.mark.parametrize("ff", [False, True])
def test_closed_loop_replaces_a_finished_request_at_once(ff: bool) -> None:
    # concurrency 1: each request arrives when the previous one finishes
    trace = make_trace([0.0, 50.0, 99.0], [4, 4, 4], [2, 2, 2])
    _, rec = run_cluster(trace, CFG, 1, ff, TIMING, ClosedLoop(1))
    # each: prefill 2.0 + one decode 1.5 = 3.5
    assert rec.columns["arrival_s"].tolist() == [0.0, 3.5, 7.0]
    assert rec.columns["finish_s"].tolist() == [3.5, 7.0, 10.5]


def test_closed_loop_request_count_limit() -> None:
    trace = make_trace([0.0] * 5, [4] * 5, [2] * 5)
    _, rec = run_cluster(trace, CFG, 1, True, TIMING, ClosedLoop(2, num_requests=3))
    assert len(rec) == 3


def test_progress_reports_each_percent_and_the_end() -> None:
    from sim.cluster import Cluster
    from sim.engines.vllm import VllmEngine
    from sim.kv import dense_hash_ids
    from sim.router import make_router

    n = 250
    trace = make_trace([0.1 * i for i in range(n)], [4] * n, [2] * n)
    dense, ids = dense_hash_ids(trace.hash_ids)
    calls: list[tuple[int, int]] = []
    engine = VllmEngine(CFG, TIMING, 0, ids)
    router = make_router("round_robin", {}, 1, np.random.default_rng(0))
    Cluster([engine], router, trace, dense, progress=lambda d, t: calls.append((d, t))).run()
    done = [d for d, _ in calls]
    assert calls[-1] == (n, n) and all(t == n for _, t in calls)
    assert done == sorted(set(done)) and len(done) == 126  # every 2 requests, then the end


class _FrontendTiming(LinearTiming):
    """TIMING, with a profile whose API server takes 0.25 s per request."""

    def __init__(self, frontend_s: float) -> None:
        super().__init__(base=1.0, per_prefill_token=0.25, per_decode_seq=0.5, per_context=0.0)
        self.profile = TimingProfile(frontend_s=frontend_s)


@pytest.mark.parametrize("ff", [False, True])
def test_the_api_server_takes_a_burst_in_one_request_at_a_time(ff: bool) -> None:
    # three 4-token prompts (3 out) at 0. Without a front end one step prefills all three
    # (1 + 0.25 * 12 = 4.0). With 0.25 s a request, A reaches the engine at 0.25 and runs
    # alone (2.0) -> 2.25; B (0.5) and C (0.75) wait for that step, then prefill beside A's
    # decode: 1 + 0.25 * 8 + 0.5 = 3.5 -> 5.75. TTFT still counts from the arrival, 0.
    trace = make_trace([0.0, 0.0, 0.0], [4, 4, 4], [3, 3, 3])
    outcome, rec = run_cluster(trace, CFG, 1, ff, _FrontendTiming(0.0))
    assert rec.columns["first_token_s"].tolist() == [4.0, 4.0, 4.0]
    outcome, rec = run_cluster(trace, CFG, 1, ff, _FrontendTiming(0.25))
    assert rec.columns["arrival_s"].tolist() == [0.0, 0.0, 0.0]
    assert rec.columns["first_token_s"].tolist() == [2.25, 5.75, 5.75]
    assert token_times(rec, 0) == [2.25, 5.75, 8.25]  # then three decode: 1 + 1.5
    prefill = outcome.engines[0].steps.column("num_prefill_tokens").tolist()
    assert prefill[:2] == [4, 8] and not any(prefill[2:])


def test_a_profile_carries_its_front_end_time() -> None:
    p = TimingProfile.from_dict({"frontend_s": 0.0012})
    assert p.frontend_s == 0.0012 and p.to_dict()["frontend_s"] == 0.0012
    with pytest.raises(CatalogError, match="frontend_s"):
        TimingProfile.from_dict({"frontend_s": -1})
