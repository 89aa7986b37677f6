"""calibrate.fit.finish_cost: the steps after a request's last token, beyond the model;
the mean level less it; the profiling's events file beside its rows; fit_in_place."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from calibrate.fit import finish_cost, finish_lags, fit, predict
from calibrate.profiling import EVENT_COLUMNS, events_path, read_events
from sim.errors import InputError
from tests.calibrate.test_fit import GPU, MODEL, TRUE, make_samples


def test_lags_stay_within_a_phase() -> None:
    phase = np.array([0, 0, 0, 1, 1, 1])
    finished = np.array([2, 0, 1, 3, 0, 0])
    x = finish_lags(phase, finished, 2)
    # row 3 opens phase 1: row 2's finish does not reach it
    assert x[:, 0].tolist() == [0, 2, 0, 0, 3, 0]
    assert x[:, 1].tolist() == [0, 0, 2, 0, 0, 3]
    assert finish_lags(phase[:1], finished[:1], 3).tolist() == [[0, 0, 0]]


def _steps(n: int = 3000, seed: int = 0):
    """Decode steps of 5 ms in phases of 300; a request finishes every ~7 steps; the two
    steps after each finish run 1.2 and 0.5 ms long; 3 % of steps 40 % slow."""
    rng = np.random.default_rng(seed)
    phase = np.arange(n) // 300
    finished = (rng.random(n) < 0.15).astype(int) * rng.integers(1, 3, n)
    base = np.full(n, 5e-3)
    x = finish_lags(phase, finished, 3)
    measured = base + 1.2e-3 * x[:, 0] + 0.5e-3 * x[:, 1]
    slow = rng.random(n) < 0.03
    measured[slow] *= 1.4
    measured *= np.exp(rng.normal(0, 0.01, n))
    return measured, base, phase, finished


def test_finish_cost_recovers_a_known_excess() -> None:
    measured, base, phase, finished = _steps()
    got = finish_cost(measured, base, phase, finished)
    assert got is not None
    assert got.finish_s == pytest.approx(1.7e-3, abs=0.15e-3)
    assert got.lag_s[0] == pytest.approx(1.2e-3, abs=0.15e-3)
    assert got.lag_s[2] == pytest.approx(0.0, abs=0.15e-3)
    assert got.num_events == int(finish_lags(phase, finished, 1).sum())
    # none where nothing follows a finish: the cost is 0, not made up
    none = finish_cost(base * 1.01, base, phase, finished)
    assert none is not None and none.finish_s == pytest.approx(0.0, abs=2e-5)


def test_too_few_finishes_measure_nothing() -> None:
    measured, base, phase, _ = _steps(n=200)
    finished = np.zeros(200, int)
    finished[[10, 50, 90]] = 1
    assert finish_cost(measured, base, phase, finished) is None


def test_the_mean_level_leaves_out_the_finish_charges() -> None:
    df = make_samples(TRUE)
    extra = np.zeros(len(df))
    extra[::5] = 0.1 * df["measured_s"].to_numpy()[::5]
    df["measured_s"] += extra
    got = fit(df, MODEL, GPU, 1, level="mean", extra_s=extra)
    # every measured step is the profile's own plus its charge: nothing left to scale
    assert got.level_factor == pytest.approx(1.0, abs=1e-6)
    total = predict(df, MODEL, GPU, 1, "bf16", got.profile).sum() + extra.sum()
    assert total == pytest.approx(df["measured_s"].sum(), rel=1e-9)
    assert np.max(np.abs(got.log_residuals)) < 1e-6
    plain = fit(df, MODEL, GPU, 1, level="mean")
    assert plain.level_factor > 1.01
    with pytest.raises(InputError, match="extra_s"):
        fit(df, MODEL, GPU, 1, extra_s=np.zeros(3))
    with pytest.raises(InputError, match="extra_s"):
        fit(df, MODEL, GPU, 1, extra_s=-np.ones(len(df)))


def test_events_file_beside_the_rows(tmp_path) -> None:
    csv = tmp_path / "steps.csv"
    assert events_path(csv) == tmp_path / "steps.events.csv"
    assert read_events(csv, 3) is None  # rows from elsewhere: no events
    pd.DataFrame([(0, 0), (0, 1), (1, 0)], columns=list(EVENT_COLUMNS)).to_csv(
        events_path(csv), index=False)
    ev = read_events(csv, 3)
    assert ev is not None and ev["finished"].tolist() == [0, 1, 0]
    with pytest.warns(UserWarning, match="not 4 rows"):
        assert read_events(csv, 4) is None
