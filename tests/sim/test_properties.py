"""Invariants over random small scenarios (hypothesis), in both engine modes.

Every request finishes exactly once, no KV block leaks, tokens are conserved,
times are ordered, and fast-forward gives the same per-request records as the
step-by-step mode.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.engines.vllm import VllmConfig
from sim.workload import ClosedLoop
from tests.sim.factories import (
    LinearTiming,
    assert_itl_counts_match_gaps,
    assert_same_records,
    make_trace,
    run_cluster,
)


@st.composite
def scenarios(draw: st.DrawFn):
    bs = draw(st.sampled_from([2, 4, 8, 16]))
    num_blocks = draw(st.integers(6, 80))
    max_len = (num_blocks - 1) * bs
    chunked = draw(st.booleans())
    budget = draw(st.integers(4, 256))
    if not chunked:
        budget = max(budget, max_len)
    cfg = VllmConfig(
        max_num_seqs=draw(st.integers(1, 12)),
        max_num_batched_tokens=budget,
        num_gpu_blocks=num_blocks,
        block_size=bs,
        enable_chunked_prefill=chunked,
        enable_prefix_caching=draw(st.booleans()),
        long_prefill_token_threshold=draw(st.sampled_from([0, 0, 3, 17])),
        scheduler_reserve_full_isl=draw(st.booleans()),
        watermark=draw(st.sampled_from([0.0, 0.0, 0.1])),
        max_model_len=max_len,
    )
    n = draw(st.integers(1, 25))
    gaps = draw(st.lists(st.sampled_from([0.0, 0.0, 0.01, 0.3, 1.0, 5.0]), min_size=n,
                         max_size=n))
    arrival = np.cumsum(gaps).tolist()
    hb = draw(st.sampled_from([2, 4, 8]))
    inputs, outputs, hashes = [], [], []
    families = draw(st.integers(1, 3))
    for i in range(n):
        long_out = draw(st.booleans())
        inp = draw(st.integers(1, 120))
        out = draw(st.integers(1, 150 if long_out else 12))
        fam = draw(st.integers(0, families - 1))
        nblk = -(-inp // hb)
        shared = draw(st.integers(0, nblk))
        # family prefix ids are shared; the rest unique to this request
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


def check_invariants(trace, cfg, outcome, records) -> None:
    c = records.columns
    n = len(trace)
    assert len(records) == n
    assert sorted(c["request_id"].tolist()) == list(range(n))  # each request exactly once
    ok = c["status"] == "ok"
    for e in outcome.engines:
        assert not e.running and not e.waiting
        assert int(e.pool.ref.sum()) == 0, "a KV block leaked"
        assert e.pool.num_free == e.pool.num_usable
    want = trace.output_tokens[c["request_id"]]
    assert (c["num_output_tokens"][ok] == want[ok]).all()  # tokens conserved
    counts = np.diff(records.token_offsets)
    assert (counts == c["num_output_tokens"]).all()
    arrival, first, finish = c["arrival_s"][ok], c["first_token_s"][ok], c["finish_s"][ok]
    assert (first >= arrival).all() and (finish >= first).all()  # TTFT <= E2E
    off = records.token_offsets
    for i in np.flatnonzero(ok):
        t = records.token_times_s[off[i]:off[i + 1]]
        assert (np.diff(t) > 0).all()  # strictly later: one token per step
        assert t[0] == c["first_token_s"][i] and t[-1] == c["finish_s"][i]
    too_long = trace.input_tokens + trace.output_tokens > cfg.max_model_len
    assert not ok[too_long[c["request_id"]]].any()
    assert_itl_counts_match_gaps(outcome, records)


SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(scenarios())
def test_invariants_and_fast_forward_equivalence(case) -> None:
    """Three ways give the same records and step logs: vLLM's loop visiting every
    running request each step (the reference), step by step with the decode cohort,
    and fast-forward."""
    trace, cfg, workers, closed, timing = case
    out_ref, rec_ref = run_cluster(trace, cfg, workers, False, timing, closed, cohort=False)
    out_step, rec_step = run_cluster(trace, cfg, workers, False, timing, closed)
    out_ff, rec_ff = run_cluster(trace, cfg, workers, True, timing, closed)
    check_invariants(trace, cfg, out_ref, rec_ref)
    check_invariants(trace, cfg, out_step, rec_step)
    check_invariants(trace, cfg, out_ff, rec_ff)
    assert_same_records(rec_ref, rec_step)
    assert_same_records(rec_step, rec_ff)
    for er, es, ef in zip(out_ref.engines, out_step.engines, out_ff.engines, strict=True):
        r, a, b = er.steps.columns(), es.steps.columns(), ef.steps.columns()
        for k in a:
            np.testing.assert_array_equal(a[k], r[k], err_msg=k)
            np.testing.assert_allclose(b[k], a[k], rtol=1e-9, err_msg=k)
