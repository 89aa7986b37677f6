"""Drift: how far new forward-pass measurements sit from an existing profile's predictions.

Each new sample is predicted with the OLD profile (calibrate.fit.predict, the simulator's
own timing model) and compared per regime (calibrate.measurements.regime: prefill, decode,
mixed, the split the fit uses). Sign convention, the one every number here uses:

    error = measured / predicted − 1      + : the new measurements are SLOWER than the
                                              profile predicts; − : faster.
                                              measured = 1.2 × predicted  ->  +20 %
    APE   = |predicted / measured − 1|    as calibrate.fit's k-fold, so it compares with the
                                          profile's stored held-out median APE

The profile stores, per regime, the 5 % and 95 % quantiles (q05, q95) of its residuals
r = log(predicted / measured) (calibrate/profile.py `fit.intervals`). A new sample is
outside the 90 % interval when its r is outside [q05, q95]; in error terms the interval is
[exp(−q95) − 1, exp(−q05) − 1]. A regime has MOVED when its median r lies outside
[q05, q95]: the typical new sample falls where fewer than 5 % of the old ones did. A
profile without intervals (or without one for a regime) is compared on the error alone:
moved when |median error| > threshold (5 % unless told), and the report says so.

    drift(samples, profile, meta, model, gpu, tp, dtype)  -> DriftResult
    check_samples(samples, model_name, tp, where)          model / TP / pp must match
    stored_intervals(meta, where)                          the profile's intervals, checked
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binom

from sim.catalog import GpuSpec, ModelSpec, load_model
from sim.errors import InputError
from sim.timing import TimingProfile

from .fit import REGIMES, predict
from .measurements import AGGREGATES, check, regime

NOMINAL = 0.90  # the stored interval is the 5 % .. 95 % quantile range
DEFAULT_THRESHOLD = 0.05
# A "within" regime whose share outside the interval is improbably high under no drift
# (one-sided binomial, p below this) says so: the spread moved, or the median is creeping.
EXCESS_P = 0.01


def _excess_p(n: int, outside: float) -> float:
    """P(at least this many of n samples outside | each is outside with 1 − NOMINAL)."""
    k = round(outside * n)
    return float(binom.sf(k - 1, n, 1.0 - NOMINAL)) if k else 1.0


@dataclass(frozen=True)
class RegimeDrift:
    regime: str  # prefill, decode, mixed, or all (stats only, no verdict)
    num_samples: int
    median_error: float | None  # measured / predicted − 1
    p10_error: float | None
    p90_error: float | None
    median_ape: float | None  # |predicted / measured − 1|
    old_median_ape: float | None  # the profile's k-fold held-out median APE, if stored
    interval: tuple[float, float] | None  # 90 % interval, in error terms
    fraction_outside: float | None
    moved: bool
    verdict: str


@dataclass(frozen=True)
class DriftResult:
    regimes: tuple[RegimeDrift, ...]  # prefill, decode, mixed, all
    moved: bool
    verdict: str
    intervals_from: str | None  # "kfold held-out", "in-sample", or None: no intervals
    threshold: float
    notes: tuple[str, ...]
    samples: pd.DataFrame = field(repr=False)  # aggregates, measured_s, predicted_s,
    #                                            error, regime, outside (per sample)

    def by_regime(self) -> dict[str, RegimeDrift]:
        return {r.regime: r for r in self.regimes}

    def as_dict(self) -> dict[str, Any]:
        return {
            "sign_convention": "error = measured / predicted - 1 (+: new samples slower "
                               "than the profile predicts); APE = |predicted / measured - 1|",
            "moved": self.moved, "verdict": self.verdict,
            "intervals_from": self.intervals_from, "interval_coverage": NOMINAL,
            "threshold": self.threshold, "notes": list(self.notes),
            "regimes": {r.regime: {k: (list(v) if isinstance(v, tuple) else v)
                                   for k, v in asdict(r).items() if k != "regime"}
                        for r in self.regimes},
        }


def _number(value: Any, where: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = float("nan")
    if not np.isfinite(x):
        raise InputError(where, f"{value!r}: not a number",
                         "re-run `servetwin calibrate` to rewrite the profile")
    return x


def stored_intervals(meta: Mapping[str, Any],
                     where: str) -> tuple[dict[str, tuple[float, float]], str | None]:
    """({regime: (q05, q95)}, intervals_from); ({}, None) when the profile stores none."""
    fit = meta.get("fit") or {}
    raw = fit.get("intervals") if isinstance(fit, Mapping) else None
    if raw is None or raw == {}:
        return {}, None
    if not isinstance(raw, Mapping):
        raise InputError(f"{where}: fit.intervals", f"{raw!r}: not a mapping",
                         "give {regime: {log_q05, log_q95}} or drop fit.intervals")
    out: dict[str, tuple[float, float]] = {}
    for g, q in raw.items():
        at = f"{where}: fit.intervals.{g}"
        if g not in (*REGIMES, "all"):
            raise InputError(at, f"regime {g!r} is unknown", f"use {', '.join(REGIMES)}, all")
        if not isinstance(q, Mapping) or not {"log_q05", "log_q95"} <= set(q):
            raise InputError(at, f"{q!r}: needs log_q05 and log_q95",
                             "re-run `servetwin calibrate` to rewrite the profile")
        lo, hi = _number(q["log_q05"], f"{at}.log_q05"), _number(q["log_q95"], f"{at}.log_q95")
        if lo > hi:
            raise InputError(at, f"log_q05 = {lo} > log_q95 = {hi}", "swap or refit")
        out[str(g)] = (lo, hi)
    return out, str(fit.get("intervals_from") or "unknown")


def check_samples(samples: pd.DataFrame, model_name: str, tp: int,
                  where: str) -> pd.DataFrame:
    """The rows, checked, of the profile's model and TP degree (pp 1); a blank model name
    is taken as the profile's (counted by drift's notes)."""
    df = check(samples, where)
    if len(df) == 0:
        raise InputError(where, "no rows", "give at least one measured forward pass")
    known = {model_name}
    for name in sorted(set(df["model"]) - {"", model_name}):
        try:
            resolved = load_model(name).name
        except InputError:
            resolved = name
        if resolved != model_name:
            i = int(np.flatnonzero((df["model"] == name).to_numpy())[0])
            raise InputError(f"{where}: row {i + 1}", f"model = {name!r}, the profile is "
                             f"of {model_name!r}", "compare measurements of the profile's "
                             "model, or fit a profile for this one")
        known.add(name)
    for col, want in (("tp", tp), ("pp", 1)):
        bad = df[col] != want
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(f"{where}: row {i + 1}", f"{col} = {df[col].iloc[i]}, the "
                             f"profile is of {col} = {want}", "compare samples of the "
                             "profile's parallel layout (filter the rows)")
    return df


def _pct(x: float) -> str:
    """+12.3 %; a value that rounds to zero prints as +0.0, never -0.0."""
    return f"{round(100 * x, 1) + 0.0:+.1f} %"


def _interval_error(q: tuple[float, float]) -> tuple[float, float]:
    return float(np.expm1(-q[1])), float(np.expm1(-q[0]))


def _regime(g: str, r: np.ndarray, q: tuple[float, float] | None,
            old_ape: float | None, threshold: float) -> RegimeDrift:
    n = len(r)
    if n == 0:
        return RegimeDrift(g, 0, None, None, None, None, old_ape,
                           _interval_error(q) if q else None, None, False, "no samples")
    med = float(np.median(r))
    err = float(np.expm1(-med))
    # the error falls as r rises: its p10 is r's p90
    p10, p90 = (float(np.expm1(-np.quantile(r, p))) for p in (0.9, 0.1))
    ape = float(np.median(np.abs(np.expm1(r))))
    if q is None:
        moved = abs(err) > threshold
        verdict = (f"moved: {_pct(err)} (beyond ±{100 * threshold:.1f} %; no interval "
                   "stored)" if moved else
                   f"within ±{100 * threshold:.1f} % ({_pct(err)}; no interval stored)")
        return RegimeDrift(g, n, err, p10, p90, ape, old_ape, None, None, moved, verdict)
    outside = float(np.mean((r < q[0]) | (r > q[1])))
    moved = not q[0] <= med <= q[1]
    lo, hi = _interval_error(q)
    span = f"{_pct(lo)[:-2]} .. {_pct(hi)}"
    if moved:
        verdict = f"moved: {_pct(err)} (beyond the 90 % interval {span})"
    else:
        verdict = f"within the interval ({_pct(err)}; interval {span})"
        excess = _excess_p(n, outside)
        if excess < EXCESS_P:
            verdict += (f"; but {100 * outside:.0f} % of samples outside it "
                        f"({100 * (1 - NOMINAL):.0f} % expected, p = {excess:.2g})")
    return RegimeDrift(g, n, err, p10, p90, ape, old_ape, (lo, hi), outside, moved, verdict)


def host_time(meta: Mapping[str, Any], where: str = "profile"
              ) -> tuple[float, float, float] | None:
    """The host time between vLLM's step lines that a profile fitted in place by `servetwin
    verify --calibrate-first` added to its coefficients, as (per step, per sequence, per
    decode-context token) seconds: provenance.host_step_gap_model where the profiling
    measured one (calibrate.profiling.host_gap_model), else the constant
    provenance.host_step_gap_s; None where it added none."""
    prov = meta.get("provenance") or {}
    if not isinstance(prov, Mapping):
        return None
    model = prov.get("host_step_gap_model")
    if isinstance(model, Mapping):
        parts = tuple(_number(model.get(k), f"{where}: provenance.host_step_gap_model.{k}")
                      for k in ("step_s", "per_seq_s", "per_context_token_s"))
        return (parts[0], parts[1], parts[2]) if any(parts) else None
    raw = prov.get("host_step_gap_s")
    if raw is None:
        return None
    gap = _number(raw, f"{where}: provenance.host_step_gap_s")
    return (gap, 0.0, 0.0) if gap > 0 else None


def with_host_time(profile: TimingProfile, parts: tuple[float, float, float],
                   sign: float = 1.0) -> TimingProfile:
    """``profile`` with host time ``parts`` (host_time's) added (sign 1) or taken off
    (sign -1; never below 0)."""
    step, seq, ctx = (sign * x for x in parts)
    return replace(profile, step_overhead_s=max(profile.step_overhead_s + step, 0.0),
                   per_seq_overhead_s=max(profile.per_seq_overhead_s + seq, 0.0),
                   per_context_token_s=max(profile.per_context_token_s + ctx, 0.0))


def logged_time_profile(profile: TimingProfile, meta: Mapping[str, Any],
                        where: str = "profile") -> tuple[TimingProfile, str | None]:
    """The profile as the fit saw the step times: a profile fitted in place by `servetwin
    verify --calibrate-first` adds the host time between vLLM's step lines to its
    coefficients (host_time), and a step line's elapsed time does not contain it.
    Comparing new step lines against the served-step profile would read that host time as
    drift, so it comes off again; (profile, a note saying so) or (profile, None)."""
    parts = host_time(meta, where)
    if parts is None:
        return profile, None
    step, seq, ctx = parts
    what, source = f"{1e3 * step:.2f} ms a step", "provenance.host_step_gap_s"
    if seq or ctx:
        what += f" + {1e6 * seq:.1f} us a sequence + {1e9 * ctx:.1f} us per 1,000 context tokens"
        source = "provenance.host_step_gap_model"
    return with_host_time(profile, parts, -1.0), (
        f"{where} adds {what} of host time between step lines ({source}); compared without "
        "it, as step lines are logged")


def _old_apes(meta: Mapping[str, Any]) -> dict[str, float]:
    fit = meta.get("fit") or {}
    kf = fit.get("kfold") if isinstance(fit, Mapping) else None
    regimes = kf.get("regimes") if isinstance(kf, Mapping) else None
    if not isinstance(regimes, Mapping):
        return {}
    return {str(g): float(s["median_ape"]) for g, s in regimes.items()
            if isinstance(s, Mapping) and isinstance(s.get("median_ape"), int | float)}


def _provenance_notes(df: pd.DataFrame, meta: Mapping[str, Any]) -> list[str]:
    """Where the samples differ from the profile in GPU, engine or version: expected in a
    drift check (that is what moved), but said, so a GPU swap is not read as a version's."""
    prov = meta.get("provenance") or {}
    notes = []
    for col in ("gpu", "engine", "engine_version", "dtype"):
        old = str(prov.get(col, "") or "")
        new = sorted(set(df[col]) - {""})
        if old and new and new != [old]:
            notes.append(f"{col}: profile {old}, samples {', '.join(new)}")
    return notes


def drift(samples: pd.DataFrame, profile: TimingProfile, meta: Mapping[str, Any],
          model: ModelSpec, gpu: GpuSpec, tp: int, dtype: str = "bf16",
          threshold: float = DEFAULT_THRESHOLD, where: str = "profile") -> DriftResult:
    """New samples against an old profile (load_profile's (profile, meta)); where names the
    profile file in errors. Samples are checked with check_samples first."""
    if not threshold > 0:
        raise InputError("threshold", f"{threshold}: must be > 0", "give a positive fraction")
    df = check_samples(samples, model.name, tp, "samples")
    intervals, intervals_from = stored_intervals(meta, where)
    old_ape = _old_apes(meta)
    profile, gap_note = logged_time_profile(profile, meta, where)
    predicted = predict(df, model, gpu, tp, dtype, profile)
    measured = df["measured_s"].to_numpy()
    r = np.log(predicted / measured)
    reg = regime(df).to_numpy()
    rows = [_regime(g, r[reg == g], intervals.get(g), old_ape.get(g), threshold)
            for g in REGIMES]
    every = _regime("all", r, intervals.get("all"), old_ape.get("all"), threshold)
    rows.append(replace(every, moved=False, verdict=""))
    notes = _provenance_notes(df, meta)
    if gap_note:
        notes.append(gap_note)
    if not intervals:
        notes.append(f"{where} stores no prediction intervals (fit.intervals): compared on "
                     f"the median error alone, moved beyond ±{100 * threshold:.1f} %")
    for row in rows[:3]:
        if row.num_samples and intervals and row.regime not in intervals:
            notes.append(f"{where} has no interval for {row.regime}: compared on the error "
                         "alone")
    blank = int((df["model"] == "").sum())
    if blank:
        notes.append(f"{blank} sample(s) carry no model name: taken as {model.name}")
    moved = [x for x in rows[:3] if x.moved]
    if moved:
        verdict = "moved: " + ", ".join(f"{x.regime} {_pct(x.median_error or 0.0)}"
                                        for x in moved)
    elif intervals:
        verdict = "within the interval in every regime with samples"
        wide = [x.regime for x in rows[:3] if "expected, p =" in x.verdict]
        if wide:
            verdict += f"; more samples outside than expected in {', '.join(wide)}"
    else:
        verdict = f"within ±{100 * threshold:.1f} % in every regime with samples"
    per_sample = df.loc[:, [*AGGREGATES, "measured_s"]].copy()
    per_sample["predicted_s"] = predicted
    per_sample["error"] = measured / predicted - 1.0
    per_sample["regime"] = reg
    # None where the regime has no stored interval
    per_sample["outside"] = [None if g not in intervals else
                             not intervals[g][0] <= x <= intervals[g][1]
                             for g, x in zip(reg, r, strict=True)]
    return DriftResult(regimes=tuple(rows), moved=bool(moved), verdict=verdict,
                       intervals_from=intervals_from, threshold=threshold, notes=tuple(notes),
                       samples=per_sample)
