"""Disaggregated prefill/decode: hand-computed handoffs, link sharing, and the
same records in step-by-step and fast-forward mode."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.disagg import DisaggCluster, LinkSpec
from sim.engines.vllm import VllmConfig, VllmEngine
from sim.kv import dense_hash_ids
from sim.metrics import build_records
from sim.router import make_router
from sim.workload import ClosedLoop
from tests.sim.factories import LinearTiming, assert_same_records, make_trace
from tests.sim.test_properties import check_invariants


def run_pd(trace, num_prefill=1, num_decode=1, bandwidth=100.0, latency=0.0,
           topology="per_prefill", kv_bytes=10.0, fast_forward=False, cfg=None, timing=None,
           closed_loop=None, decode_router="round_robin"):
    cfg = cfg or VllmConfig(max_num_seqs=8, max_num_batched_tokens=64, num_gpu_blocks=41,
                            block_size=4, max_model_len=1000)
    timing = timing or LinearTiming(base=1.0, per_prefill_token=0.1, per_decode_seq=0.5)
    dense, n_ids = dense_hash_ids(trace.hash_ids)

    def engines(n):
        return [VllmEngine(cfg, timing, trace.hash_block_tokens, n_ids,
                           fast_forward=fast_forward) for _ in range(n)]

    rng = np.random.default_rng(0)
    cluster = DisaggCluster(engines(num_prefill), engines(num_decode),
                            make_router("round_robin", {}, num_prefill, rng),
                            make_router(decode_router, {}, num_decode, rng), trace, dense,
                            LinkSpec(bandwidth, latency, topology), kv_bytes, closed_loop)
    outcome = cluster.run()
    return cluster, outcome, build_records(outcome)


def times_of(records, i):
    off = records.token_offsets
    return records.token_times_s[off[i]:off[i + 1]].tolist()


@pytest.mark.parametrize("ff", [False, True])
def test_one_request_prefill_handoff_decode(ff: bool) -> None:
    # prefill: 8 prompt tokens, step = 1 + 0.1 x 8 = 1.8 -> first token at 1.8
    # handoff: the decode worker has nothing cached: 8 tokens x 10 B = 80 B at 100 B/s
    #          = 0.8 s -> delivered at 2.6
    # decode: 1 + 0.5 x 1 = 1.5 a step -> tokens at 4.1 and 5.6
    trace = make_trace([0.0], [8], [3])
    cluster, outcome, rec = run_pd(trace, fast_forward=ff)
    assert times_of(rec, 0) == pytest.approx([1.8, 4.1, 5.6], rel=1e-12)
    c = rec.columns
    assert c["first_token_s"][0] == pytest.approx(1.8)
    assert c["finish_s"][0] == pytest.approx(5.6)
    assert c["worker_id"][0] == 1  # the decode worker (prefill workers come first)
    (h,) = cluster.handoffs
    assert (h.prefill_worker, h.decode_worker, h.nbytes) == (0, 1, 80.0)
    assert (h.start_s, h.end_s) == pytest.approx((1.8, 2.6))
    for e in outcome.engines:  # the prefill side freed its held blocks after the handoff
        assert e.num_held_blocks == 0 and e.pool.num_free == e.pool.num_usable
    prefill, decode = outcome.engines
    assert prefill.steps.num_steps == 1 and decode.steps.num_steps == 2


def test_prefill_holds_its_blocks_until_the_transfer_ends() -> None:
    # 80 B transfers on a 1 B/s link. Request 0 sends alone 1.8 -> 11.8 (10 B), then
    # shares with request 1 (prefilled 10 -> 11.8): 0.5 B/s each, request 0's last
    # 70 B take 140 s -> 151.8; request 1 has 10 B left then, alone: 161.8.
    # Request 1's step shows request 0's 2 held blocks + its own 2; request 2 at
    # 300 s, after both handoffs, only its own 2.
    trace = make_trace([0.0, 10.0, 300.0], [8, 8, 8], [3, 3, 3])
    cluster, outcome, _ = run_pd(trace, bandwidth=1.0)
    prefill = outcome.engines[0]
    assert prefill.steps.column("kv_used_blocks").tolist() == [2, 4, 2]
    assert [h.end_s for h in cluster.handoffs] == pytest.approx([151.8, 161.8, 381.8])


def test_two_transfers_share_one_link() -> None:
    # both prompts prefill in one step: 1 + 0.1 x 16 = 2.6; both transfers of 80 B
    # start at 2.6 on the prefill worker's link and share it: 50 B/s each -> 4.2.
    # Per pair (two decode workers, one link each) they do not share: 3.4.
    trace = make_trace([0.0, 0.0], [8, 8], [2, 2])
    shared, _, _ = run_pd(trace, num_decode=2, topology="per_prefill")
    assert [h.end_s for h in shared.handoffs] == pytest.approx([4.2, 4.2])
    pair, _, _ = run_pd(trace, num_decode=2, topology="per_pair")
    assert [h.end_s for h in pair.handoffs] == pytest.approx([3.4, 3.4])
    summary = shared.link_summary(0.0, 4.2)
    assert summary["prefill0"]["num_transfers"] == 2
    assert summary["prefill0"]["bytes"] == 160.0
    # busy from 2.6 to 4.2 of [0, 4.2]
    assert summary["prefill0"]["busy_fraction"] == pytest.approx(1.6 / 4.2)


def test_only_blocks_the_decode_side_lacks_are_sent() -> None:
    # A (hash blocks 1, 2) is decoded on the single decode worker, which caches its
    # 2 prompt blocks at admission. C (hash 1, 2, 3) arrives later: the decode
    # worker lacks 12 - 8 = 4 tokens -> 40 B.
    trace = make_trace([0.0, 20.0], [8, 12], [2, 2], [[1, 2], [1, 2, 3]],
                       hash_block_tokens=4)
    cluster, _, rec = run_pd(trace)
    assert [h.nbytes for h in cluster.handoffs] == [80.0, 40.0]
    # C's prefill hit A's 2 blocks on the prefill worker too (8 of 12 prompt tokens)
    assert rec.columns["num_cached_tokens"].tolist() == [0, 8]


def test_latency_and_one_token_requests() -> None:
    trace = make_trace([0.0, 0.0], [8, 8], [1, 2])
    cluster, outcome, rec = run_pd(trace, latency=0.25)
    # one output token: done on the prefill worker, no handoff
    assert [h.request_id for h in cluster.handoffs] == [1]
    assert rec.columns["finish_s"][0] == pytest.approx(2.6)
    assert rec.columns["worker_id"][0] == 0
    # request 1: sent 2.6 -> 3.4 (alone on the link), delivered 0.25 s later
    assert cluster.handoffs[0].end_s == pytest.approx(3.65)
    assert times_of(rec, 1) == pytest.approx([2.6, 5.15])
    for e in outcome.engines:
        assert e.pool.num_free == e.pool.num_usable


@st.composite
def pd_cases(draw: st.DrawFn):
    bs = draw(st.sampled_from([2, 4, 8]))
    num_blocks = draw(st.integers(20, 80))
    cfg = VllmConfig(max_num_seqs=draw(st.integers(1, 8)),
                     max_num_batched_tokens=draw(st.integers(8, 128)),
                     num_gpu_blocks=num_blocks, block_size=bs,
                     enable_prefix_caching=draw(st.booleans()),
                     max_model_len=(num_blocks - 1) * bs)
    n = draw(st.integers(1, 20))
    gaps = draw(st.lists(st.sampled_from([0.0, 0.0, 0.05, 0.5, 3.0]), min_size=n, max_size=n))
    hb = 4
    inputs, outputs, hashes = [], [], []
    for i in range(n):
        inp = draw(st.integers(1, 60))
        out = draw(st.integers(1, 40))
        nblk = -(-inp // hb)
        shared = draw(st.integers(0, nblk))
        hashes.append(list(range(shared)) + [10_000 + 100 * i + k for k in range(shared, nblk)])
        inputs.append(inp)
        outputs.append(out)
    trace = make_trace(np.cumsum(gaps).tolist(), inputs, outputs, hashes, hash_block_tokens=hb)
    closed = ClosedLoop(draw(st.integers(1, 3))) if draw(st.booleans()) else None
    return dict(trace=trace, cfg=cfg, closed_loop=closed,
                num_prefill=draw(st.integers(1, 2)), num_decode=draw(st.integers(1, 3)),
                bandwidth=draw(st.sampled_from([50.0, 1e3, 1e6])),
                latency=draw(st.sampled_from([0.0, 0.01])),
                topology=draw(st.sampled_from(["per_prefill", "per_decode", "per_pair",
                                               "shared"])),
                timing=LinearTiming(base=0.05, per_prefill_token=0.001, per_decode_seq=0.002,
                                    per_context=1e-5))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pd_cases())
def test_pd_invariants_and_fast_forward_equivalence(case) -> None:
    _, out_step, rec_step = run_pd(**case, fast_forward=False)
    _, out_ff, rec_ff = run_pd(**case, fast_forward=True)
    for out, rec in ((out_step, rec_step), (out_ff, rec_ff)):
        check_invariants(case["trace"], case["cfg"], out, rec)
        assert all(e.num_held_blocks == 0 for e in out.engines)
    assert_same_records(rec_step, rec_ff)


def test_handoff_bytes_read_the_decode_cache_as_of_now() -> None:
    """Found by the property test: the decode worker was mid-run in fast-forward mode and
    had not yet taken (evicting) the blocks its started steps take, so it seemed to hold
    more of the prompt and the transfer was shorter than in step-by-step mode."""
    ids = [10000, 10100, 0, 10300, 10400, 10401, 10402, 10403, 0, 10501, 10600, 10700, 10800]
    off = [0, 1, 2, 3, 4, 8, 10, 11, 12, 13]
    trace = make_trace([0.0] * 9, [1, 1, 2, 1, 13, 6, 1, 1, 1], [1, 1, 11, 23, 9, 2, 1, 1, 1],
                       [ids[off[i]:off[i + 1]] for i in range(9)], hash_block_tokens=4)
    cfg = VllmConfig(max_num_seqs=2, max_num_batched_tokens=8, num_gpu_blocks=24, block_size=2,
                     max_model_len=46)
    kw = dict(trace=trace, cfg=cfg, closed_loop=ClosedLoop(2), bandwidth=1000.0,
              timing=LinearTiming(base=0.05, per_prefill_token=0.001, per_decode_seq=0.002,
                                  per_context=1e-5))
    step, _, rec_step = run_pd(**kw, fast_forward=False)
    ff, _, rec_ff = run_pd(**kw, fast_forward=True)
    assert [h.nbytes for h in ff.handoffs] == [h.nbytes for h in step.handoffs]
    np.testing.assert_allclose(rec_ff.columns["finish_s"], rec_step.columns["finish_s"],
                               rtol=1e-9)
