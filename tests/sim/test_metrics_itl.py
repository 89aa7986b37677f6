"""ITL from the pooled token-time array equals the per-request definition."""

import numpy as np
import pytest

from sim.metrics import _itl


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
