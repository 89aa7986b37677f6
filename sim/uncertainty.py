"""Prediction intervals of a fitted timing profile carried into a run's latencies.

A profile written by `servetwin calibrate` keeps, per batch regime (prefill, decode,
mixed, all), the 5 % and 95 % quantiles of its held-out log residuals
r = log(predicted / measured) (calibrate/fit.py). For one forward pass predicted at t, the
measured time then lies in [t / exp(q95), t / exp(q05)] nine times in ten.

How that reaches TTFT and TPOT: the run is simulated twice more, once with every pass
at its interval's fast end and once at its slow end (each pass scaled by its own
regime's factor), and the latency percentiles of those two runs are the band. Scaling
every pass the same way treats the profile's error as systematic, the same for all
passes of a run: that is what a calibration error is (a kernel the profile misjudges
is misjudged every time), and it is the wide, safe reading. Independent per-pass errors
would largely cancel over the thousands of passes behind one request, leaving a much
narrower band; the run does not pretend to know which holds. Queueing is not linear in
the step time, so the band of a loaded run is wider than the per-pass interval, and the
simulation, not a formula, says by how much.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import InputError
from .timing import TimingModel

REGIMES = ("prefill", "decode", "mixed")
LATENCIES = ("ttft_s", "tpot_s", "itl_s", "e2e_s")


def regime_of(num_prefill_tokens: int, num_decode_seqs: int) -> str:
    """calibrate.measurements.regime for one pass."""
    if num_prefill_tokens > 0:
        return "mixed" if num_decode_seqs > 0 else "prefill"
    return "decode"


class ScaledTiming:
    """A timing model whose passes take ``factors[regime]`` times as long."""

    def __init__(self, base: TimingModel, factors: Mapping[str, float]) -> None:
        self.base = base
        self.factors = dict(factors)
        self._decode = self.factors["decode"]

    def step_time(self, num_prefill_tokens: int, prefill_attn_work: float,
                  num_prefill_seqs: int, num_decode_seqs: int,
                  decode_context_tokens: int) -> float:
        t = self.base.step_time(num_prefill_tokens, prefill_attn_work, num_prefill_seqs,
                                num_decode_seqs, decode_context_tokens)
        return t * self.factors[regime_of(num_prefill_tokens, num_decode_seqs)]

    def decode_run_times(self, num_decode_seqs: int, decode_context_tokens0: int,
                         num_steps: int) -> np.ndarray:
        t: np.ndarray = self.base.decode_run_times(num_decode_seqs, decode_context_tokens0,
                                                   num_steps)
        return t * self._decode

    def __getattr__(self, name: str) -> Any:  # anything else the engines read (e.g. bytes)
        return getattr(self.base, name)


def interval_factors(fit: Mapping[str, Any], where: str) -> tuple[dict[str, float],
                                                                   dict[str, float]]:
    """(fast, slow) step-time factors per regime from a profile's ``fit.intervals``; a
    regime the profile has no interval for takes the ``all`` one."""
    intervals = fit.get("intervals")
    if not isinstance(intervals, Mapping) or not intervals:
        raise InputError(where, "the timing profile has no fit intervals",
                         "use a profile written by `servetwin calibrate` (timing.profile_name), "
                         "or turn simulation.intervals off")
    fast: dict[str, float] = {}
    slow: dict[str, float] = {}
    for regime in REGIMES:
        q = intervals.get(regime, intervals.get("all"))
        if not isinstance(q, Mapping) or not {"log_q05", "log_q95"} <= q.keys():
            raise InputError(where, f"fit.intervals has no {regime!r} (nor 'all') interval",
                             "refit the profile with `servetwin calibrate`")
        lo, hi = float(q["log_q05"]), float(q["log_q95"])
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise InputError(where, f"fit.intervals.{regime} = [{lo}, {hi}]: not an interval",
                             "refit the profile with `servetwin calibrate`")
        # r = log(predicted / measured): measured = predicted / exp(r)
        fast[regime] = math.exp(-hi)
        slow[regime] = math.exp(-lo)
    return fast, slow


def band(summary: Mapping[str, Any], fast: Mapping[str, Any], slow: Mapping[str, Any],
         factors: tuple[Mapping[str, float], Mapping[str, float]], source: str
         ) -> dict[str, Any]:
    """The ``uncertainty`` section of a summary: per latency and percentile, the value of
    the run and of the fast and slow runs."""
    out: dict[str, Any] = {
        "level": 0.9,
        "method": "every pass at its regime's interval end (systematic profile error)",
        "source": source,
        "step_time_factors": {"fast": dict(factors[0]), "slow": dict(factors[1])},
    }
    for lat in LATENCIES:
        mid = summary.get(lat)
        if not isinstance(mid, Mapping):
            continue
        out[lat] = {p: {"low": fast[lat][p], "mid": mid[p], "high": slow[lat][p]}
                    for p in ("p50", "p90", "p99") if p in mid}
    out["output_throughput_tokens_per_s"] = {
        "low": slow.get("output_throughput_tokens_per_s"),
        "mid": summary.get("output_throughput_tokens_per_s"),
        "high": fast.get("output_throughput_tokens_per_s")}
    return out
