"""Predicted against measured, config by config, and whether the twin ranked the configs right.

For each config the simulator's records and the measured records of the same replay are
joined on ``request_id``. Only requests that completed ok on *both* sides are summarised,
each side by the one shared ``sim.metrics.summarize``, so a figure means the same thing on
both; every request left out is counted with its cause, never dropped silently::

    predicted ids ──┐
                    ├─ ok in both ──► summarize(pred) vs summarize(meas) ──► relative errors
    measured ids  ──┘  the rest   ──► excluded: not measured / not predicted /
                                      measured error (reason) / predicted rejected (reason)

Alongside: per-request paired errors (median absolute percentage error of TTFT and E2E),
an accounting check of the measured records against the engine's own /metrics counters,
and, across configs, Spearman ρ / Kendall τ of predicted against measured values and
whether the predicted best config is the measured best.

Relative error is (predicted − measured) / measured: +10 % means the twin predicts 10 %
more than was measured.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from sim.errors import InputError
from sim.metrics import RECORD_COLUMNS, Records, summarize

from .accounting import Check, accounting_checks, engine_counter

LATENCY_METRICS = ("ttft_s", "tpot_s", "itl_s", "e2e_s")
LATENCY_STATS = ("mean", "p50", "p90", "p99")
# per-config figures that are one number, not a distribution; higher is better for the
# throughputs (the rank check uses output throughput, as the screen's objective does)
SCALAR_METRICS = ("request_throughput_per_s", "output_throughput_tokens_per_s",
                  "total_throughput_tokens_per_s", "prefix_cache_hit_rate", "num_preemptions")
SCALAR_STAT = "value"
RANK_THROUGHPUT = "output_throughput_tokens_per_s"
PAIRED_METRICS = ("ttft_s", "e2e_s")


@dataclass
class ConfigRun:
    config_id: str
    label: str                      # the knobs in words: "max_num_seqs=8, ..."
    engine: str                     # "vllm" | "sglang" | "llamacpp"
    predicted: Records
    measured: Records
    engine_counters: dict[str, float] = field(default_factory=dict)  # deltas over the replay
    series: pd.DataFrame | None = None            # columns time_s, metric, value
    predicted_series: pd.DataFrame | None = None  # same shape, from the simulator
    notes: list[str] = field(default_factory=list)


@dataclass
class MetricPair:
    metric: str
    stat: str                       # "p50", ... or SCALAR_STAT
    predicted: float
    measured: float
    rel_error: float                # (predicted − measured) / measured

    def to_dict(self) -> dict[str, Any]:
        return {"predicted": self.predicted, "measured": self.measured,
                "rel_error": self.rel_error}


@dataclass
class Exclusion:
    cause: str                      # "measured error", "predicted rejected", "not measured", ...
    reason: str
    count: int


@dataclass
class ConfigComparison:
    config_id: str
    label: str
    engine: str
    num_requests: int               # distinct request ids on either side
    num_compared: int               # ok on both sides
    exclusions: list[Exclusion]     # a request failing on both sides appears under both causes
    values: list[MetricPair]
    paired: dict[str, dict[str, float]]
    checks: list[Check]
    notes: list[str]
    predicted_summary: dict[str, Any]
    measured_summary: dict[str, Any]
    per_request: pd.DataFrame       # the compared requests: request_id, <metric>_pred/_meas
    run: ConfigRun = field(repr=False)

    @property
    def num_excluded(self) -> int:
        return self.num_requests - self.num_compared

    def value(self, metric: str, stat: str = SCALAR_STAT) -> MetricPair:
        return next(f for f in self.values if f.metric == metric and f.stat == stat)

    def excluded_by_cause(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for e in self.exclusions:
            out[e.cause] += e.count
        return dict(out)


@dataclass
class RankAgreement:
    metric: str
    stat: str
    higher_is_better: bool
    num_configs: int                # configs with a finite value on both sides
    spearman_rho: float
    kendall_tau: float
    reason: str                     # why ρ/τ are NaN, "" when they are not
    predicted_best: list[str]       # config ids (several on a tie)
    measured_best: list[str]
    best_agrees: bool | None        # None with fewer than 2 configs
    regret: float                   # measured loss of picking the predicted best, relative


@dataclass
class Comparison:
    metrics: tuple[str, ...]
    stats: tuple[str, ...]
    configs: list[ConfigComparison]
    ranks: list[RankAgreement]
    rank_note: str                  # why there is no rank agreement, "" when there is

    def to_dict(self) -> dict[str, Any]:
        return json_safe({
            "metrics": list(self.metrics), "stats": list(self.stats),
            "configs": [_config_dict(c) for c in self.configs],
            "rank_agreement": [vars(r) for r in self.ranks],
            "rank_note": self.rank_note,
        })

    def table(self) -> pd.DataFrame:
        rows = [{"config_id": c.config_id, "label": c.label, "engine": c.engine,
                 "metric": f.metric, "stat": f.stat, "predicted": f.predicted,
                 "measured": f.measured, "rel_error": f.rel_error,
                 "num_compared": c.num_compared, "num_excluded": c.num_excluded}
                for c in self.configs for f in c.values]
        cols = ["config_id", "label", "engine", "metric", "stat", "predicted", "measured",
                "rel_error", "num_compared", "num_excluded"]
        return pd.DataFrame(rows, columns=cols)


# ---------------------------------------------------------------- compare
def compare(runs: list[ConfigRun],
            metrics: tuple[str, ...] = ("ttft_s", "tpot_s", "itl_s", "e2e_s"),
            stats: tuple[str, ...] = ("p50", "p90", "p99")) -> Comparison:
    metrics, stats = tuple(metrics), tuple(stats)
    _check_choice("compare: metrics", metrics, LATENCY_METRICS)
    _check_choice("compare: stats", stats, LATENCY_STATS)
    ids = [r.config_id for r in runs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError("compare: runs", f"config_id {dup[0]!r} appears more than once",
                         "give each config run a distinct config_id")
    configs = [compare_config(r, metrics, stats) for r in runs]
    if len(configs) < 2:
        note = (f"{len(configs)} config compared: rank agreement needs at least 2 "
                "(Spearman and Kendall at least 3)")
        return Comparison(metrics, stats, configs, [], note)
    targets = [(m, s, False) for m in metrics for s in stats] + \
        [(RANK_THROUGHPUT, SCALAR_STAT, True)]
    ranks = [rank_agreement(configs, m, s, hib) for m, s, hib in targets]
    return Comparison(metrics, stats, configs, ranks, "")


def compare_config(run: ConfigRun, metrics: tuple[str, ...], stats: tuple[str, ...]
                   ) -> ConfigComparison:
    where = f"config {run.config_id}"
    pred_ids = _ids(run.predicted, f"{where}: predicted")
    meas_ids = _ids(run.measured, f"{where}: measured")
    pred_ok = run.predicted.columns["status"] == "ok"
    meas_ok = run.measured.columns["status"] == "ok"
    pred_pos = pd.Index(pred_ids)
    meas_pos = pd.Index(meas_ids)
    both = np.intersect1d(pred_ids[pred_ok], meas_ids[meas_ok])  # sorted
    union = np.union1d(pred_ids, meas_ids)
    p_idx = pred_pos.get_indexer(both)
    m_idx = meas_pos.get_indexer(both)
    pred = subset(run.predicted, p_idx)
    meas = subset(run.measured, m_idx)
    exclusions = _exclusions(run, pred_ids, meas_ids, pred_ok, meas_ok)
    if both.size:
        ps, ms = summarize(pred), summarize(meas)
    else:
        ps, ms = _empty_summary(), _empty_summary()
    values = [MetricPair(m, s, ps[m][s], ms[m][s], rel_error(ps[m][s], ms[m][s]))
               for m in metrics for s in stats]
    values += _scalar_values(run, ps, ms)
    per_request = _per_request(both, pred, meas)
    paired = {m: _paired(per_request[f"{m}_pred"].to_numpy(), per_request[f"{m}_meas"].to_numpy())
              for m in PAIRED_METRICS}
    notes = list(run.notes)
    if not both.size:
        notes.insert(0, f"no request completed ok on both sides ({len(union)} requests, all "
                        "excluded): there is nothing to compare for this config")
    return ConfigComparison(
        run.config_id, run.label, run.engine, int(union.size), int(both.size), exclusions,
        values, paired, accounting_checks(run, ps, pred, meas), notes, ps, ms, per_request, run)


def subset(records: Records, idx: np.ndarray) -> Records:
    """The records at positions ``idx``, token times included."""
    idx = np.asarray(idx, dtype=np.int64)
    cols = {k: v[idx] for k, v in records.columns.items()}
    off = records.token_offsets
    counts = np.diff(off)[idx]
    new_off = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    # token j of the new layout comes from old offset start + (j - new start)
    src = np.repeat(off[idx] - new_off[:-1], counts) + np.arange(int(new_off[-1]))
    kept = set(cols["request_id"].tolist())
    reasons = {k: v for k, v in records.reject_reasons.items() if k in kept}
    return Records(cols, new_off, records.token_times_s[src], reasons)


def rel_error(predicted: float, measured: float) -> float:
    if not (math.isfinite(predicted) and math.isfinite(measured)):
        return float("nan")
    if measured == 0:
        return 0.0 if predicted == 0 else math.copysign(math.inf, predicted)
    return (predicted - measured) / measured


def _ids(records: Records, where: str) -> np.ndarray:
    missing = [c for c in RECORD_COLUMNS if c not in records.columns]
    if missing:
        raise InputError(where, f"records lack the column(s) {', '.join(missing)}",
                         "build records with every column of sim.metrics.RECORD_COLUMNS")
    ids = np.asarray(records.columns["request_id"])
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise InputError(where, f"request_id {uniq[counts > 1][0].item()!r} appears "
                         f"{int(counts.max())} times", "give each request one record")
    return ids


def _exclusions(run: ConfigRun, pred_ids: np.ndarray, meas_ids: np.ndarray,
                pred_ok: np.ndarray, meas_ok: np.ndarray) -> list[Exclusion]:
    out: Counter[tuple[str, str]] = Counter()
    not_measured = np.setdiff1d(pred_ids, meas_ids).size
    if not_measured:
        out["not measured", "predicted, but no measured record"] = not_measured
    not_predicted = np.setdiff1d(meas_ids, pred_ids).size
    if not_predicted:
        out["not predicted", "measured, but the simulator has no record"] = not_predicted
    status = run.measured.columns["status"]
    for i in np.flatnonzero(~meas_ok):
        rid = meas_ids[i].item()
        reason = run.measured.reject_reasons.get(rid) or f"status {status[i]!s}"
        out["measured error", str(reason)] += 1
    status = run.predicted.columns["status"]
    for i in np.flatnonzero(~pred_ok):
        rid = pred_ids[i].item()
        reason = run.predicted.reject_reasons.get(rid) or f"status {status[i]!s}"
        out["predicted rejected", str(reason)] += 1
    return [Exclusion(cause, reason, n)
            for (cause, reason), n in sorted(out.items(), key=lambda kv: (-kv[1], kv[0]))]


def _empty_summary() -> dict[str, Any]:
    nan = float("nan")
    dist = {"mean": nan, "p50": nan, "p90": nan, "p99": nan}
    return {"num_requests": 0, "num_completed": 0, "num_rejected": 0, "duration_s": 0.0,
            "request_throughput_per_s": nan, "output_throughput_tokens_per_s": nan,
            "total_throughput_tokens_per_s": nan, **{m: dict(dist) for m in LATENCY_METRICS},
            "prefix_cache_hit_rate": nan, "num_preemptions": 0}


def _scalar_values(run: ConfigRun, ps: dict[str, Any], ms: dict[str, Any]) -> list[MetricPair]:
    out = []
    for m in SCALAR_METRICS[:4]:
        out.append(MetricPair(m, SCALAR_STAT, float(ps[m]), float(ms[m]),
                          rel_error(float(ps[m]), float(ms[m]))))
    # preemptions over the whole replay on both sides: the client never sees one, so the
    # measured figure is the engine's counter (NaN when it exposes none)
    pred = float(run.predicted.columns["num_preemptions"].sum())
    preempted = engine_counter(run, "num_preemptions")
    meas = float("nan") if preempted is None else preempted
    out.append(MetricPair("num_preemptions", SCALAR_STAT, pred, meas, rel_error(pred, meas)))
    return out


def _per_request(ids: np.ndarray, pred: Records, meas: Records) -> pd.DataFrame:
    out: dict[str, np.ndarray] = {"request_id": ids}
    for side, rec in (("pred", pred), ("meas", meas)):
        c = rec.columns
        ttft = c["first_token_s"] - c["arrival_s"]
        e2e = c["finish_s"] - c["arrival_s"]
        n_out = c["num_output_tokens"].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            tpot = np.where(n_out > 1, (e2e - ttft) / (n_out - 1), np.nan)
        out |= {f"ttft_s_{side}": ttft, f"tpot_s_{side}": tpot, f"e2e_s_{side}": e2e}
    return pd.DataFrame(out)


def _paired(pred: np.ndarray, meas: np.ndarray) -> dict[str, float]:
    keep = np.isfinite(pred) & np.isfinite(meas) & (meas > 0)
    if not keep.any():
        return {"median_ape": float("nan"), "num_requests": 0}
    ape = np.abs(pred[keep] - meas[keep]) / meas[keep]
    return {"median_ape": float(np.median(ape)), "num_requests": int(keep.sum())}


# -------------------------------------------------------- rank agreement
def rank_agreement(configs: list[ConfigComparison], metric: str, stat: str,
                   higher_is_better: bool) -> RankAgreement:
    figs = [(c.config_id, c.value(metric, stat)) for c in configs]
    have = [(cid, f.predicted, f.measured) for cid, f in figs
            if math.isfinite(f.predicted) and math.isfinite(f.measured)]
    n = len(have)
    ids = [h[0] for h in have]
    pred = np.array([h[1] for h in have], dtype=np.float64)
    meas = np.array([h[2] for h in have], dtype=np.float64)
    missing = len(configs) - n
    left = f"; {missing} config(s) without a value on both sides left out" if missing else ""
    rho = tau = float("nan")
    if n < 3:
        reason = f"needs at least 3 configs with values, has {n}{left}"
    elif np.all(pred == pred[0]):
        reason = f"the predicted values are all equal ({n} configs){left}"
    elif np.all(meas == meas[0]):
        reason = f"the measured values are all equal ({n} configs){left}"
    else:
        rho = float(scipy_stats.spearmanr(pred, meas).statistic)
        tau = float(scipy_stats.kendalltau(pred, meas).statistic)
        reason = left.removeprefix("; ")
    if n < 2:
        return RankAgreement(metric, stat, higher_is_better, n, rho, tau, reason, [], [], None,
                             float("nan"))
    pick = np.max if higher_is_better else np.min
    p_best = [i for i, v in zip(ids, pred, strict=True) if v == pick(pred)]
    m_best = [i for i, v in zip(ids, meas, strict=True) if v == pick(meas)]
    # what choosing the predicted best costs, measured: 0 when it is (one of) the best
    chosen = meas[ids.index(p_best[0])]
    best = pick(meas)
    regret = 0.0 if chosen == best else abs(chosen - best) / abs(best) if best else math.inf
    return RankAgreement(metric, stat, higher_is_better, n, rho, tau, reason, p_best, m_best,
                         bool(set(p_best) & set(m_best)), float(regret))


# ----------------------------------------------------------------- helpers
def _check_choice(where: str, chosen: tuple[str, ...], valid: tuple[str, ...]) -> None:
    for x in chosen:
        if x not in valid:
            raise InputError(where, f"{x!r} is not one of {', '.join(valid)}",
                             f"choose from {', '.join(valid)}")


def _config_dict(c: ConfigComparison) -> dict[str, Any]:
    latency: dict[str, dict[str, Any]] = {}
    scalars: dict[str, Any] = {}
    for f in c.values:
        if f.stat == SCALAR_STAT:
            scalars[f.metric] = f.to_dict()
        else:
            latency.setdefault(f.metric, {})[f.stat] = f.to_dict()
    return {
        "config_id": c.config_id, "label": c.label, "engine": c.engine,
        "num_requests": c.num_requests, "num_compared": c.num_compared,
        "num_excluded": c.num_excluded, "excluded_by_cause": c.excluded_by_cause(),
        "exclusions": [vars(e) for e in c.exclusions],
        "latency": latency, "scalars": scalars, "paired": c.paired,
        "checks": [vars(k) for k in c.checks], "notes": list(c.notes),
        "engine_counters": dict(c.run.engine_counters),
        "predicted_summary": c.predicted_summary, "measured_summary": c.measured_summary,
    }


def json_safe(v: Any) -> Any:
    """Plain JSON types only: NaN and ±inf become None, numpy scalars Python ones."""
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [json_safe(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if v is None or isinstance(v, bool | int | str):
        return v
    return str(v)
