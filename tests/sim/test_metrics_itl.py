"""ITL from the pooled token-time array equals the per-request definition."""

import numpy as np
import pytest

from sim.metrics import PERCENTILES, _itl, _stats, _weighted_stats, summarize


def _itl_by_request(off: np.ndarray, times: np.ndarray, ok: np.ndarray) -> np.ndarray:
    pieces = [np.diff(times[off[i]:off[i + 1]]) for i in range(ok.size)
              if ok[i] and off[i + 1] - off[i] > 1]
    return np.concatenate(pieces) if pieces else np.empty(0)


@pytest.mark.parametrize("seed", range(20))
def test_itl_matches_the_per_request_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30))
    counts = rng.integers(0, 6, n)  # empty requests (rejected, or no tokens) included
    off = np.concatenate(([0], np.cumsum(counts)))
    times = np.cumsum(rng.random(int(off[-1])))
    ok = rng.random(n) < 0.8
    got = _itl(off, times, ok)
    want = _itl_by_request(off, times, ok)
    assert np.array_equal(got, want)


def test_gaps_across_requests_are_left_out() -> None:
    off = np.array([0, 3, 3, 5])
    times = np.array([1.0, 2.0, 4.0, 10.0, 10.5])
    ok = np.array([True, True, True])
    # request 0: 1->2->4 (gaps 1, 2); request 1 empty; request 2: 10->10.5 (0.5);
    # the 4->10 gap joins two requests and is not an ITL
    assert _itl(off, times, ok).tolist() == [1.0, 2.0, 0.5]
    assert _itl(off, times, np.array([False, True, True])).tolist() == [0.5]


@pytest.mark.parametrize("seed", range(20))
def test_counted_gaps_give_numpys_statistics(seed: int) -> None:
    """(values, counts) stand for each value repeated count times: the same percentiles
    as numpy's on the repeated array (linear method, bit for bit) and the same mean."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 40))
    values = np.round(rng.random(k), int(rng.integers(1, 4)))  # ties across entries too
    counts = rng.integers(1, 50, k)
    want = _stats(np.repeat(values, counts))
    got = _weighted_stats(values, counts)
    assert [got[f"p{p}"] for p in PERCENTILES] == [want[f"p{p}"] for p in PERCENTILES]
    assert got["mean"] == pytest.approx(want["mean"], rel=1e-12)
    one = _weighted_stats(np.array([0.25]), np.array([1]))
    assert one == {"mean": 0.25, "p50": 0.25, "p90": 0.25, "p99": 0.25}
    assert np.isnan(_weighted_stats(np.empty(0), np.empty(0, dtype=np.int64))["p50"])


def test_summary_counts_gaps_by_step_when_tokens_outnumber_steps() -> None:
    """Two requests decoding together for 20 steps: 40 tokens in 20 steps; with the ratio
    at 1 the records carry the counted gaps, and the summary's ITL equals the gaps'."""
    import sim.metrics as metrics
    from sim.engines.vllm import VllmConfig
    from tests.sim.factories import make_trace, run_cluster

    trace = make_trace([0.0, 0.0], [4, 4], [20, 20], [[], []])
    cfg = VllmConfig(num_gpu_blocks=64, block_size=4, max_num_seqs=4,
                     max_num_batched_tokens=16, max_model_len=64)
    old = metrics.ITL_COUNT_RATIO
    try:
        metrics.ITL_COUNT_RATIO = 1
        _, rec = run_cluster(trace, cfg, 1, True)
    finally:
        metrics.ITL_COUNT_RATIO = old
    assert rec.itl_counts is not None
    ok = rec.columns["status"] == "ok"
    assert summarize(rec)["itl_s"]["p50"] == _stats(_itl(rec.token_offsets, rec.token_times_s,
                                                         ok))["p50"]
    _, rec_default = run_cluster(trace, cfg, 1, True)
    assert rec_default.itl_counts is None  # 40 tokens, 20 steps: below the default ratio
