"""Fit a TimingProfile to measured forward passes, and say how well it predicts held-out ones.

The residual of one sample is r = log(predicted_s / measured_s): a relative error, symmetric in
over- and under-prediction, so a 2 ms decode step and a 2 s prefill weigh the same. Predictions
go through sim.timing.RooflineTiming(model, gpu, tp, dtype, profile).step_time on the row's
aggregates, so the fitted profile is exactly what the simulator will run.

    fit(samples, model, gpu, tp, dtype)     scipy.optimize.least_squares, bounded:
                                            efficiencies in [1e-3, 1], seconds in [0, 1 s]
    kfold(samples, ..., k=5, seed=0)        held-out APE = |predicted / measured − 1|,
                                            median / mean overall and per regime

A coefficient the samples cannot move (comm_eff and allreduce_latency_s at tp = 1;
attn_prefill_eff with no prefill rows and memory-bound decode attention), or can move only
as another does (allreduce_latency_s next to step_overhead_s: both a constant per step), is
held at the prior and reported in FitResult.not_identified; fitting it would return noise.

Prediction intervals: the 5 % and 95 % quantiles of the log residuals per regime; a
prediction t has a 90 % interval [t / exp(q95), t / exp(q05)] (r = log(t / measured)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from sim.catalog import GpuSpec, ModelSpec
from sim.errors import InputError
from sim.timing import _EFFICIENCIES, _SECONDS, RooflineTiming, TimingProfile

from .measurements import AGGREGATES, check, regime

# Identification order: a later coefficient collinear with earlier ones is held.
COEFFICIENTS = (*_EFFICIENCIES, "step_overhead_s", "per_seq_overhead_s", "allreduce_latency_s")
EFF_BOUNDS = (1e-3, 1.0)
SECONDS_MAX = 1.0
_MS = 1e3  # seconds are optimised in milliseconds so every variable is O(0.01 .. 1)
REGIMES = ("prefill", "decode", "mixed")


@dataclass(frozen=True)
class FitResult:
    profile: TimingProfile
    prior: TimingProfile
    identified: tuple[str, ...]
    not_identified: tuple[str, ...]
    at_bound: tuple[str, ...]  # identified coefficients that ended on a bound
    num_samples: int
    loss: str
    success: bool
    message: str
    log_residuals: np.ndarray = field(repr=False)  # in-sample log(predicted / measured)
    regimes: np.ndarray = field(repr=False)
    intervals: dict[str, tuple[float, float]]  # regime -> (q05, q95) of the log residuals
    # level="mean": the factor every step time of the robust fit was scaled by (else 1)
    level_factor: float = 1.0


@dataclass(frozen=True)
class KFoldResult:
    k: int
    seed: int
    # "all", "prefill", "decode", "mixed" (present regimes only) ->
    # {num_samples, median_ape, mean_ape, p90_ape, log_q05, log_q95}
    by_regime: dict[str, dict[str, float]]
    ape: np.ndarray = field(repr=False)  # held-out APE per sample, input order
    log_residuals: np.ndarray = field(repr=False)

    def intervals(self) -> dict[str, tuple[float, float]]:
        return {r: (s["log_q05"], s["log_q95"]) for r, s in self.by_regime.items()}


def predict(samples: pd.DataFrame, model: ModelSpec, gpu: GpuSpec, tp: int, dtype: str,
            profile: TimingProfile) -> np.ndarray:
    """Seconds per row, through the simulator's own timing model."""
    timing = RooflineTiming(model, gpu, tp, dtype, profile)
    cols = [samples[c].to_numpy() for c in AGGREGATES]
    step = timing.step_time
    return np.array([step(int(p), float(a), int(n), int(d), int(c))
                     for p, a, n, d, c in zip(*cols, strict=True)], dtype=float)


def _check_samples(samples: pd.DataFrame, tp: int) -> pd.DataFrame:
    df = check(samples, "samples")
    if len(df) == 0:
        raise InputError("samples", "no rows to fit", "give at least one measured forward pass")
    bad = df["tp"] != tp
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(f"samples: row {i + 1}", f"tp = {df['tp'].iloc[i]}, fitting tp = {tp}",
                         "fit one TP degree at a time (filter the rows or change --tp)")
    if (df["pp"] != 1).any():
        i = int(np.flatnonzero((df["pp"] != 1).to_numpy())[0])
        raise InputError(f"samples: row {i + 1}", f"pp = {df['pp'].iloc[i]}: the timing model "
                         "covers one pipeline stage only", "give pp = 1 samples")
    return df


def _perturbed(prior: TimingProfile, name: str) -> TimingProfile:
    v = getattr(prior, name)
    if name in _EFFICIENCIES:
        return replace(prior, **{name: max(v * 0.25, EFF_BOUNDS[0])})
    return replace(prior, **{name: v + 1e-3})


def identifiable(samples: pd.DataFrame, model: ModelSpec, gpu: GpuSpec, tp: int, dtype: str,
                 prior: TimingProfile) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(identified, not identified). Each coefficient gets a large move (an efficiency
    × 0.25, a time + 1 ms); its column is the relative change of every prediction. Taken in
    COEFFICIENTS order, a coefficient is identified when its column is not (to 1e-6) a
    combination of the columns already taken: exactly absent terms (tp = 1 comm) give a zero
    column, and allreduce_latency_s is a per-step constant like step_overhead_s, so step
    times alone can never tell the two apart."""
    base = predict(samples, model, gpu, tp, dtype, prior)
    yes: list[str] = []
    no: list[str] = []
    taken = np.zeros((len(base), 0))
    for name in COEFFICIENTS:
        col = predict(samples, model, gpu, tp, dtype, _perturbed(prior, name)) / base - 1.0
        norm = float(np.linalg.norm(col))
        if norm > 1e-6 * np.sqrt(len(col)):
            col = col / norm
            if taken.shape[1]:
                col = col - taken @ np.linalg.lstsq(taken, col, rcond=None)[0]
            if np.linalg.norm(col) > 1e-6:
                taken = np.column_stack([taken, col / np.linalg.norm(col)])
                yes.append(name)
                continue
        no.append(name)
    return tuple(yes), tuple(no)


def _to_x(profile: TimingProfile, names: tuple[str, ...]) -> np.ndarray:
    return np.array([getattr(profile, n) * (_MS if n in _SECONDS else 1.0) for n in names])


def _from_x(x: np.ndarray, names: tuple[str, ...], prior: TimingProfile) -> TimingProfile:
    values = {n: float(v) / (_MS if n in _SECONDS else 1.0) for n, v in zip(names, x, strict=True)}
    return replace(prior, **values)


def _bounds(names: tuple[str, ...], ceiling: float = EFF_BOUNDS[1]
            ) -> tuple[np.ndarray, np.ndarray]:
    """Efficiencies in [EFF_BOUNDS[0], the device's efficiency_ceiling (1 for a GPU)],
    seconds in [0, SECONDS_MAX]."""
    lo = np.array([EFF_BOUNDS[0] if n in _EFFICIENCIES else 0.0 for n in names])
    hi = np.array([ceiling if n in _EFFICIENCIES else SECONDS_MAX * _MS for n in names])
    return lo, hi


def _quantiles(r: np.ndarray) -> tuple[float, float]:
    return float(np.quantile(r, 0.05)), float(np.quantile(r, 0.95))


LEVELS = ("robust", "mean")


def fit(samples: pd.DataFrame, model: ModelSpec, gpu: GpuSpec, tp: int, dtype: str = "bf16",
        prior: TimingProfile | None = None, loss: str = "soft_l1",
        f_scale: float = 0.05, held: Sequence[str] = (), level: str = "robust") -> FitResult:
    """Bounded robust least squares of log(predicted / measured) over the identified
    coefficients. f_scale: the relative error (0.05 = 5 %) beyond which soft_l1 / huber
    stop weighing a residual quadratically.

    ``level="mean"`` then scales every step time by one factor, Σ measured / Σ predicted
    over the samples (mean_level): the robust fit follows the typical step and discounts
    the slow ones, but a request's latency is a sum of steps, which the slow ones are part
    of. On a noisy host (the 2-core VM's engine: a few per cent of steps 30 % or more
    slow) that is a level 0.4-5 % higher; on op tables or a quiet GPU, about none."""
    if level not in LEVELS:
        raise InputError("level", f"{level!r}", f"use one of {', '.join(LEVELS)}")
    prior = prior or TimingProfile()
    df = _check_samples(samples, tp)
    measured = df["measured_s"].to_numpy()
    names, fixed = identifiable(df, model, gpu, tp, dtype, prior)
    # held: coefficients the caller pins at the prior (e.g. GEMM efficiencies fitted at
    # TP 1); reported with the not-identified ones
    unknown = [h for h in held if h not in COEFFICIENTS]
    if unknown:
        raise InputError("held", f"{unknown[0]!r} is not a coefficient",
                         f"use some of {', '.join(COEFFICIENTS)}")
    fixed = (*fixed, *(n for n in names if n in held))
    names = tuple(n for n in names if n not in held)
    # each regime weighs the same in the fit, whatever its number of samples: an engine's
    # step log holds thousands of decode steps for every few dozen prefills
    reg_all = regime(df).to_numpy()
    counts = {g: int((reg_all == g).sum()) for g in set(reg_all)}
    weight = np.sqrt(np.array([len(df) / (len(counts) * counts[g]) for g in reg_all]))

    def residuals(x: np.ndarray) -> np.ndarray:
        pred = predict(df, model, gpu, tp, dtype, _from_x(x, names, prior))
        return weight * np.log(pred / measured)

    lo, hi = _bounds(names, gpu.efficiency_ceiling)
    profile, success, message = prior, True, "nothing to fit"
    if names:
        # Two starts: the prior, and the middle of the efficiency range with the prior's
        # times; the roofline's max() makes the surface kinked, and the prior can sit on a
        # face where one of two competing terms has no gradient.
        mid = _to_x(prior, names)
        mid[[n in _EFFICIENCIES for n in names]] = 0.5
        starts = [_to_x(prior, names), mid]
        best: Any = None
        for x0 in starts:
            x0 = np.clip(x0, lo + 1e-9 * (hi - lo), hi - 1e-9 * (hi - lo))
            res = least_squares(residuals, x0, bounds=(lo, hi), loss=loss, f_scale=f_scale,
                                x_scale=np.maximum(np.abs(x0), 1e-2), diff_step=1e-6,
                                xtol=1e-10, ftol=1e-10, gtol=1e-10, max_nfev=400)
            if best is None or res.cost < best.cost:
                best = res
        profile = _from_x(best.x, names, prior)
        success, message = bool(best.success), str(best.message)
        span = hi - lo
        at = tuple(n for n, v, a, b, s in zip(names, best.x, lo, hi, span, strict=True)
                   if v <= a + 1e-6 * s or v >= b - 1e-6 * s)
    else:
        at = ()
    factor = 1.0
    if level == "mean":
        factor = float(measured.sum() / predict(df, model, gpu, tp, dtype, profile).sum())
        profile = mean_level(profile, factor, gpu.efficiency_ceiling)
    r = np.log(predict(df, model, gpu, tp, dtype, profile) / measured)
    reg = regime(df).to_numpy()
    intervals = {g: _quantiles(r[reg == g]) for g in REGIMES if (reg == g).any()}
    return FitResult(profile=profile, prior=prior, identified=names, not_identified=fixed,
                     at_bound=at, num_samples=len(df), loss=loss, success=success,
                     message=message, log_residuals=r, regimes=reg, intervals=intervals,
                     level_factor=factor)


def mean_level(profile: TimingProfile, factor: float, ceiling: float = 1.0) -> TimingProfile:
    """``profile`` with every step time ``factor`` times as long: each efficiency divided
    by it (held within the device's ``ceiling``, where the scale then falls short), each
    per-step time multiplied. The API server's time per request is no step time."""
    eff = {n: min(getattr(profile, n) / factor, ceiling) for n in _EFFICIENCIES}
    return replace(profile, **eff, step_overhead_s=profile.step_overhead_s * factor,
                   per_seq_overhead_s=profile.per_seq_overhead_s * factor,
                   allreduce_latency_s=profile.allreduce_latency_s * factor)


def _folds(reg: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index per row: each regime shuffled and dealt round-robin, so every fold holds
    its share of prefill, decode and mixed rows."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(reg), dtype=np.int64)
    offset = 0
    for g in REGIMES:
        idx = np.flatnonzero(reg == g)
        rng.shuffle(idx)
        fold[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)
    return fold


def summarize(ape: np.ndarray, r: np.ndarray, reg: np.ndarray) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for g in ("all", *REGIMES):
        m = np.ones(len(reg), bool) if g == "all" else reg == g
        if not m.any():
            continue
        q05, q95 = _quantiles(r[m])
        out[g] = {"num_samples": int(m.sum()), "median_ape": float(np.median(ape[m])),
                  "mean_ape": float(np.mean(ape[m])), "p90_ape": float(np.quantile(ape[m], 0.9)),
                  "log_q05": q05, "log_q95": q95}
    return out


def kfold(samples: pd.DataFrame, model: ModelSpec, gpu: GpuSpec, tp: int, dtype: str = "bf16",
          prior: TimingProfile | None = None, loss: str = "soft_l1", k: int = 5, seed: int = 0,
          f_scale: float = 0.05, held: Sequence[str] = (), level: str = "robust") -> KFoldResult:
    """Held-out errors: fit on k − 1 folds, predict the k-th, for every fold."""
    df = _check_samples(samples, tp)
    if not 2 <= k <= len(df):
        raise InputError("kfold", f"k = {k} with {len(df)} samples",
                         "k must be in 2 .. number of samples")
    reg = regime(df).to_numpy()
    fold = _folds(reg, k, seed)
    r = np.empty(len(df))
    for i in range(k):
        out = fold == i
        result = fit(df[~out], model, gpu, tp, dtype, prior, loss, f_scale, held, level)
        pred = predict(df[out], model, gpu, tp, dtype, result.profile)
        r[out] = np.log(pred / df["measured_s"].to_numpy()[out])
    ape = np.abs(np.expm1(r))
    return KFoldResult(k=k, seed=seed, by_regime=summarize(ape, r, reg), ape=ape,
                       log_residuals=r)
