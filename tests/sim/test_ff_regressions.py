"""Fast-forward cases the property tests found, kept as fixed examples."""

from __future__ import annotations

import numpy as np

from sim.engines.vllm import VllmConfig
from sim.workload import ClosedLoop
from tests.sim.factories import LinearTiming, make_trace, run_cluster


def same_in_both_modes(trace, cfg, workers, timing, closed=None) -> None:
    a, ra = run_cluster(trace, cfg, workers, False, timing, closed)
    b, rb = run_cluster(trace, cfg, workers, True, timing, closed)
    for name, col in ra.columns.items():
        if col.dtype.kind == "f":
            np.testing.assert_allclose(rb.columns[name], col, rtol=1e-9, err_msg=name)
        else:
            assert (rb.columns[name] == col).all(), name
    for ea, eb in zip(a.engines, b.engines, strict=True):
        ca, cb = ea.steps.columns(), eb.steps.columns()
        for k in ca:
            np.testing.assert_allclose(cb[k], ca[k], rtol=1e-9, err_msg=k)


def test_arrival_exactly_at_the_start_of_a_runs_last_step() -> None:
    # request 3 (closed loop) arrives at 1.188 s, when worker 0's run is about to
    # start its last step: step-by-step mode decides that step after the arrival
    # (waiting = 1), so the run must be cut there too, not left to run its last step
    hash_ids = [[100000], [101000 + k for k in range(18)], [102000], [103000]]
    trace = make_trace([0.0] * 4, [1, 36, 1, 1], [100, 12, 75, 1], hash_ids,
                       hash_block_tokens=2)
    cfg = VllmConfig(max_num_seqs=1, max_num_batched_tokens=102, num_gpu_blocks=52,
                     block_size=2, enable_chunked_prefill=False, enable_prefix_caching=False,
                     long_prefill_token_threshold=3, scheduler_reserve_full_isl=False,
                     max_model_len=102)
    timing = LinearTiming(base=0.01, per_prefill_token=0.001, per_decode_seq=0.002)
    same_in_both_modes(trace, cfg, 3, timing, ClosedLoop(2))


def test_a_run_evicting_the_waiting_requests_free_cached_blocks() -> None:
    # the waiting request is refused while its prefix hit includes free cached blocks
    # that it would take back; the decode run's new blocks evict them, its need
    # falls, and step-by-step mode admits it at the next step: the run must stop
    # at its first block allocation to decide again
    h0 = [0] + [100001 + k for k in range(21)]
    h1 = list(range(10)) + [101010 + k for k in range(27)]
    h3 = list(range(10))
    trace = make_trace([0.0] * 3, [43, 73, 20], [7, 1, 1], [h0, h1, h3], hash_block_tokens=2)
    cfg = VllmConfig(max_num_seqs=3, max_num_batched_tokens=120, num_gpu_blocks=31,
                     block_size=4, enable_chunked_prefill=False,
                     long_prefill_token_threshold=17, scheduler_reserve_full_isl=False,
                     max_model_len=120)
    timing = LinearTiming(base=0.01, per_prefill_token=0.001, per_decode_seq=0.002)
    same_in_both_modes(trace, cfg, 1, timing)
