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
        f_scale: float = 0.05, held: Sequence[str] = (), level: str = "robust",
        extra_s: np.ndarray | None = None) -> FitResult:
    """Bounded robust least squares of log(predicted / measured) over the identified
    coefficients. f_scale: the relative error (0.05 = 5 %) beyond which soft_l1 / huber
    stop weighing a residual quadratically.

    ``level="mean"`` then scales every step time by one factor, Σ measured / Σ predicted
    over the samples (mean_level): the robust fit follows the typical step and discounts
    the slow ones, but a request's latency is a sum of steps, which the slow ones are part
    of. On a noisy host (the 2-core VM's engine: a few per cent of steps 30 % or more
    slow) that is a level 0.4-5 % higher; on op tables or a quiet GPU, about none.

    ``extra_s``: seconds per row that the simulator adds to the step beside the profile's
    step time (the finish cost, finish_cost): the profile is fitted to measured - extra
    (at least half the measured), the level makes Σ (factor x predicted + extra) equal
    Σ measured, and the residuals and intervals are of predicted + extra."""
    if level not in LEVELS:
        raise InputError("level", f"{level!r}", f"use one of {', '.join(LEVELS)}")
    prior = prior or TimingProfile()
    df = _check_samples(samples, tp)
    measured = df["measured_s"].to_numpy()
    extra = np.zeros(len(df)) if extra_s is None else np.asarray(extra_s, dtype=float)
    if extra.shape != (len(df),) or not (np.isfinite(extra).all() and (extra >= 0).all()):
        raise InputError("extra_s", f"{extra.shape} values", f"give {len(df)} finite "
                         "non-negative seconds, one per sample")
    # the step's own time, which the profile models (at least half the measured: a
    # charge is an estimate)
    own = np.maximum(measured - extra, 0.5 * measured)
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
        return weight * np.log(pred / own)

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
        factor = float(own.sum() / predict(df, model, gpu, tp, dtype, profile).sum())
        profile = mean_level(profile, factor, gpu.efficiency_ceiling)
    r = np.log((predict(df, model, gpu, tp, dtype, profile) + extra) / measured)
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


@dataclass(frozen=True)
class FinishCost:
    """The steps' time after a request finishes, beyond what the fitted model predicts
    for them (finish_cost): ``finish_s`` a finished request, which the simulator adds to
    the engine's next step (TimingProfile.finish_s)."""

    finish_s: float
    lag_s: tuple[float, ...]  # per finished request, on the 1st, 2nd ... step after it
    intercept_s: float  # the rows' mean excess that no finish explains
    num_events: int  # finished requests followed by a step of the same phase

    def to_dict(self) -> dict[str, Any]:
        return {"finish_s": self.finish_s, "lag_s": list(self.lag_s),
                "intercept_s": self.intercept_s, "num_events": self.num_events}

    def format(self) -> str:
        return (f"{1e3 * self.finish_s:.2f} ms a finished request (the "
                + ", ".join(f"{1e3 * x:+.2f}" for x in self.lag_s)
                + f" ms of the {len(self.lag_s)} steps after it; {self.num_events} finishes)")


MIN_FINISH_EVENTS = 20


def finish_lags(phase: np.ndarray, finished: np.ndarray, lags: int) -> np.ndarray:
    """Column j - 1: the requests the row j steps earlier finished, where that row is of
    the same phase (0 else). Rows in their log order."""
    phase, fin = np.asarray(phase), np.asarray(finished, dtype=float)
    out = np.zeros((len(phase), lags))
    for j in range(1, min(lags, len(phase) - 1) + 1):
        out[j:, j - 1] = np.where(phase[j:] == phase[:-j], fin[:-j], 0.0)
    return out


def finish_cost(measured: np.ndarray, predicted: np.ndarray, phase: np.ndarray,
                finished: np.ndarray, lags: int = 3) -> FinishCost | None:
    """How much longer the steps after a request's last token take than the model says.

    measured - predicted = a + Σ_j b_j x (requests finished j steps earlier, same phase),
    j = 1 .. ``lags``, robust least squares (soft_l1 at the residuals' MAD);
    finish_s = max(Σ b_j, 0). On vLLM-CPU with its API server on the model's core, the
    steps after each finish in the served replays of three configs ran 0.7-1.9 ms long in
    all (1-3 steps), where first tokens were followed by no such excess (the replays'
    joined steps, 2026-11-28); in the profiling, the short requests of the mix phases
    finish with their first token. None with fewer than MIN_FINISH_EVENTS finishes
    followed by a step."""
    r = np.asarray(measured, float) - np.asarray(predicted, float)
    x = finish_lags(phase, finished, lags)
    events = int(x[:, 0].sum())
    if events < MIN_FINISH_EVENTS:
        return None
    a = np.column_stack([np.ones(len(r)), x])
    scale = max(float(np.median(np.abs(r - np.median(r)))) * 1.4826, 1e-6)
    res = least_squares(lambda c: (a @ c - r) / scale, np.zeros(a.shape[1]), loss="soft_l1")
    lag_s = tuple(float(v) for v in res.x[1:])
    return FinishCost(max(sum(lag_s), 0.0), lag_s, float(res.x[0]), events)
