"""A timing profile's prediction intervals carried into a run's latencies."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from servetwin.cli import main
from sim.errors import InputError, ScenarioError
from sim.profiles import bundled_profiles
from sim.scenario import load_scenario
from sim.simulate import resolve, simulate
from sim.uncertainty import ScaledTiming, interval_factors
from tests.sim.factories import LinearTiming

NAME = "h100_sxm-vllm-qwen--qwen3-32b-tp1"


def test_scaled_timing_scales_each_regime_by_its_factor() -> None:
    base = LinearTiming(base=1.0, per_prefill_token=0.1, per_decode_seq=0.5)
    t = ScaledTiming(base, {"prefill": 2.0, "decode": 3.0, "mixed": 5.0})
    assert t.step_time(10, 0.0, 1, 0, 0) == pytest.approx(2.0 * (1.0 + 1.0))  # prefill
    assert t.step_time(0, 0.0, 0, 2, 20) == pytest.approx(3.0 * (1.0 + 1.0))  # decode
    assert t.step_time(10, 0.0, 1, 2, 20) == pytest.approx(5.0 * (1.0 + 1.0 + 1.0))
    np.testing.assert_allclose(t.decode_run_times(2, 20, 3), 3.0 * base.decode_run_times(2, 20, 3))


def test_interval_factors_from_log_residual_quantiles() -> None:
    """r = log(predicted / measured) in [q05, q95] -> measured in
    [predicted / exp(q95), predicted / exp(q05)]; a regime without its own interval
    takes 'all'."""
    fit = {"intervals": {"all": {"log_q05": -0.1, "log_q95": 0.2},
                         "decode": {"log_q05": -0.05, "log_q95": 0.05}}}
    fast, slow = interval_factors(fit, "p.yaml")
    assert fast["decode"] == pytest.approx(math.exp(-0.05))
    assert slow["decode"] == pytest.approx(math.exp(0.05))
    assert fast["prefill"] == fast["mixed"] == pytest.approx(math.exp(-0.2))
    assert slow["prefill"] == pytest.approx(math.exp(0.1))
    with pytest.raises(InputError, match="no fit intervals"):
        interval_factors({}, "p.yaml")
    with pytest.raises(InputError, match="not an interval"):
        interval_factors({"intervals": {"all": {"log_q05": 0.3, "log_q95": 0.1}}}, "p.yaml")


def scenario(tmp_path: Path, profile_name: str | None, intervals: bool = True) -> Path:
    p = tmp_path / "s.yaml"
    timing = {"profile_name": profile_name} if profile_name else {}
    p.write_text(yaml.safe_dump({
        "workload": {"synthetic": {"num_requests": 60, "rate_per_s": 4.0,
                                   "input_tokens": 2000, "output_tokens": 100}},
        "model": "Qwen/Qwen3-32B", "gpu": "H100-SXM", "timing": timing,
        "simulation": {"intervals": intervals}}))
    return p


def profile_with(tmp_path: Path, lo: float, hi: float) -> str:
    doc = yaml.safe_load(bundled_profiles()[NAME].read_text())
    doc["fit"]["intervals"] = {"all": {"log_q05": lo, "log_q95": hi}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_band_brackets_the_run_and_a_zero_interval_collapses_it(tmp_path: Path) -> None:
    res = simulate(resolve(load_scenario(scenario(tmp_path, profile_with(tmp_path, -0.1,
                                                                            0.1)))))
    unc = res.summary["uncertainty"]
    for lat in ("ttft_s", "tpot_s", "e2e_s"):
        for p, b in unc[lat].items():
            assert b["low"] < b["mid"] < b["high"], (lat, p)
            assert b["mid"] == res.summary[lat][p]
    # the median inter-token gap is a decode pass: it scales with the pass's factor
    itl = unc["itl_s"]["p50"]
    assert itl["high"] / itl["mid"] == pytest.approx(math.exp(0.1), rel=0.02)
    assert itl["low"] / itl["mid"] == pytest.approx(math.exp(-0.1), rel=0.02)
    zero = simulate(resolve(load_scenario(scenario(tmp_path, profile_with(tmp_path, 0, 0)))))
    b = zero.summary["uncertainty"]["ttft_s"]["p90"]
    assert b["low"] == b["mid"] == b["high"]


def test_intervals_need_a_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ScenarioError, match=r"simulation\.intervals"):
        resolve(load_scenario(scenario(tmp_path, None)))
    # the command line: --intervals with the bundled profile prints the band
    path = scenario(tmp_path, NAME, intervals=False)
    assert main(["simulate", str(path), "--intervals", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "90 % band from" in out and "TTFT" in out
    summary = yaml.safe_load((tmp_path / "run" / "summary.json").read_text())
    assert summary["uncertainty"]["source"] == NAME
