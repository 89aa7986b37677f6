"""KV offload tiers: evicted prefix blocks go down, hits come back up at a cost."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from sim.cluster import Cluster
from sim.engines.vllm import VllmConfig, VllmEngine
from sim.kv import dense_hash_ids
from sim.metrics import build_records
from sim.offload import OffloadTiers, TierSpec
from sim.router import make_router
from tests.sim.factories import LinearTiming, make_trace
from tests.sim.test_properties import check_invariants, scenarios


def run(trace, tiers, ff=False, num_blocks=4):
    # 3 usable blocks of 4 tokens; each block is one 4-token trace block (one key)
    cfg = VllmConfig(max_num_seqs=4, max_num_batched_tokens=64, num_gpu_blocks=num_blocks,
                     block_size=4, max_model_len=16 if num_blocks == 4 else (num_blocks - 1) * 4)
    dense, n_ids = dense_hash_ids(trace.hash_ids)
    engine = VllmEngine(cfg, LinearTiming(base=1.0, per_prefill_token=0.1, per_decode_seq=0.5),
                        4, n_ids, fast_forward=ff)
    if tiers:
        engine.pool.lower = OffloadTiers(tiers, block_bytes=10.0, num_keys=engine.pool.num_keys)
    rt = make_router("round_robin", {}, 1, np.random.default_rng(0))
    outcome = Cluster([engine], rt, trace, dense).run()
    return engine, build_records(outcome)


# R1 (hash 1, 2) fills blocks 1, 2 and frees them: queue 3, 2, 1. R2 (hash 5, 6, 7)
# takes 3, 2, 1: block 2 (key of hash 2) and block 1 (hash 1) are evicted in that
# order. R3 (hash 1, 2, then 1 more token) finds nothing on the GPU.
TRACE = make_trace([0.0, 10.0, 20.0], [8, 12, 9], [1, 1, 1], [[1, 2], [5, 6, 7], [1, 2]],
                   hash_block_tokens=4)


@pytest.mark.parametrize("ff", [False, True])
def test_host_tier_hit_loads_blocks_back_at_its_bandwidth(ff: bool) -> None:
    host = TierSpec("host", capacity_blocks=2, bandwidth_bytes_per_s=40.0)
    engine, rec = run(TRACE, [host], ff)
    # both of R3's prompt blocks are in the host tier: 8 tokens count as computed,
    # 1 token left (a decode-shaped step: 1 + 0.5 = 1.5 s) plus loading 2 blocks
    # x 10 B at 40 B/s = 0.5 s -> first token at 20 + 2.0
    assert rec.columns["num_cached_tokens"].tolist() == [0, 0, 8]
    assert rec.columns["first_token_s"][2] == pytest.approx(22.0)
    assert engine.num_offload_hit_tokens == 8
    assert engine.pool.lower is not None
    assert engine.pool.lower.summary(4)[0]["hit_blocks"] == 2
    # without the tier R3 recomputes 9 tokens: 1 + 0.1 x 9 = 1.9 s
    _, plain = run(TRACE, [], ff)
    assert plain.columns["num_cached_tokens"].tolist() == [0, 0, 0]
    assert plain.columns["first_token_s"][2] == pytest.approx(21.9)


def test_full_host_tier_pushes_down_to_disk() -> None:
    host = TierSpec("host", capacity_blocks=1, bandwidth_bytes_per_s=40.0)
    disk = TierSpec("disk", capacity_blocks=4, bandwidth_bytes_per_s=10.0)
    engine, rec = run(TRACE, [host, disk])
    # evicted hash 2 then hash 1: the host keeps hash 1, hash 2 went to disk.
    # R3 loads hash 1 from host (10/40 = 0.25 s) and hash 2 from disk (10/10 = 1 s)
    assert engine.pool.lower is not None
    tiers = engine.pool.lower.summary(4)
    assert [t["hit_blocks"] for t in tiers] == [1, 1]
    assert rec.columns["first_token_s"][2] == pytest.approx(20.0 + 1.5 + 1.25)


def test_run_with_offload_matches_in_both_modes() -> None:
    rng = np.random.default_rng(3)
    n = 40
    arrival = np.cumsum(rng.choice([0.0, 0.3, 2.0], n))
    inputs = rng.integers(4, 24, n)
    outputs = rng.integers(1, 12, n)
    # one of three shared prefixes (ids 0.., 100.., 200..), one id per 4 tokens
    hashes = []
    for i in inputs:
        base = int(rng.integers(0, 3)) * 100
        hashes.append(list(range(base, base + -(-int(i) // 4))))
    trace = make_trace(arrival.tolist(), inputs.tolist(), outputs.tolist(), hashes,
                       hash_block_tokens=4)
    tiers = [TierSpec("host", 6, 100.0)]
    ea, ra = run(trace, tiers, False, num_blocks=12)
    _, rb = run(trace, tiers, True, num_blocks=12)
    assert ea.num_offload_hit_tokens > 0
    for name, col in ra.columns.items():
        if col.dtype.kind == "f":
            np.testing.assert_allclose(rb.columns[name], col, rtol=1e-9, err_msg=name)
        else:
            assert (rb.columns[name] == col).all(), name


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=scenarios())
def test_offload_fast_forward_equivalence(case) -> None:
    """Random small scenarios with a small host and disk tier below every worker."""
    trace, cfg, workers, closed, timing = case

    def run_tiers(ff: bool):
        dense, n_ids = dense_hash_ids(trace.hash_ids)
        engines = [VllmEngine(cfg, timing, trace.hash_block_tokens, n_ids, fast_forward=ff)
                   for _ in range(workers)]
        for e in engines:
            e.pool.lower = OffloadTiers([TierSpec("host", 5, 1e4), TierSpec("disk", 20, 1e3)],
                                        64.0, e.pool.num_keys)
        rt = make_router("round_robin", {}, workers, np.random.default_rng(0))
        out = Cluster(engines, rt, trace, dense, closed).run()
        return out, build_records(out)

    (oa, ra), (ob, rb) = run_tiers(False), run_tiers(True)
    check_invariants(trace, cfg, oa, ra)
    check_invariants(trace, cfg, ob, rb)
    for name, col in ra.columns.items():
        if col.dtype.kind == "f":
            np.testing.assert_allclose(rb.columns[name], col, rtol=1e-9, equal_nan=True,
                                       err_msg=name)
        else:
            assert (rb.columns[name] == col).all(), name
    for ea, eb in zip(oa.engines, ob.engines, strict=True):
        assert ea.num_offload_hit_tokens == eb.num_offload_hit_tokens
