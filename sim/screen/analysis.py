"""What a sweep's rows mean: cost, SLO feasibility, the Pareto frontier, a ranked
shortlist, and the one-knob comparisons that explain each pick.

The frontier is throughput per GPU (maximise) against the latency objective
(minimise, e.g. ``ttft_s.p90``) over the SLO-feasible configs only::

    throughput/GPU
      ^   1 *                  rank 1: the most tokens per GPU that still meets the SLOs
      |        2 *             rank 2..k: cheaper latency, fewer tokens per GPU
      |   x          3 *       x: dominated (another config is no worse on both axes)
      +-------------------> latency objective
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .space import SearchSpec

KNOB = "knob."
# the mechanisms a one-knob comparison may name, with how far each moved to be named
MIN_MOVE = math.log(1.05)  # 5 %: below it a difference is noise, not a reason
MAX_PARTS = 4  # figures per `why` sentence
HEADLINE = ("num_gpus", "gpu", "throughput_per_gpu", "output_throughput_tokens_per_s",
            "goodput_per_s", "cost_per_m_output_tokens", "num_preemptions")
_LATENCY_NAMES = {"ttft_s": "TTFT", "tpot_s": "TPOT", "itl_s": "ITL", "e2e_s": "E2E"}


# ---------------------------------------------------------------- analyze
def analyze(rows: Sequence[dict[str, Any]], spec: SearchSpec) -> pd.DataFrame:
    """One row per config, in the order given, with the derived columns added."""
    df = pd.DataFrame(list(rows))
    needed = ["config_id", "status", "reason", "num_gpus", "gpu",
              "output_throughput_tokens_per_s", "goodput_per_s", spec.objective,
              *slo_columns(spec)]
    for col in needed:
        if col not in df.columns:
            df[col] = np.nan
    ok = (df["status"] == "ok").to_numpy(dtype=bool)
    out_tps = pd.to_numeric(df["output_throughput_tokens_per_s"], errors="coerce")
    gpus = pd.to_numeric(df["num_gpus"], errors="coerce")
    df["throughput_per_gpu"] = np.where(ok, out_tps / gpus, np.nan)
    cost, notes = _cost(df, spec, ok)
    df["cost_per_m_output_tokens"] = cost
    df["note"] = notes
    verdicts = [_slo_verdict(r, spec) for r in df.to_dict("records")]
    df["slo_ok"] = np.array([v == "" for v in verdicts], dtype=bool)
    df["slo_violation"] = verdicts
    order = frontier_order(df, spec)
    df["pareto"] = False
    df.loc[order, "pareto"] = True
    df["rank"] = np.nan
    ranked = order[: spec.shortlist]
    df.loc[ranked, "rank"] = np.arange(1, len(ranked) + 1, dtype=float)
    return df[_column_order(df, spec)]


def slo_columns(spec: SearchSpec) -> list[str]:
    return [f"{m}.{p}" for m, bounds in spec.slo.items() for p in bounds]


def _cost(df: pd.DataFrame, spec: SearchSpec, ok: np.ndarray) -> tuple[list[float], list[str]]:
    """$ per million output tokens = $/GPU-h x GPUs / 3600 s / (output tok/s) x 1e6."""
    cost: list[float] = []
    notes: list[str] = []
    columns = (df["gpu"], df["num_gpus"], df["output_throughput_tokens_per_s"])
    for is_ok, gpu, n, tps in zip(ok, *columns, strict=True):
        price = spec.cost_per_gpu_hour.get(str(gpu)) if isinstance(gpu, str) else None
        if not is_ok:
            cost.append(math.nan)
            notes.append("")
        elif price is None:
            cost.append(math.nan)
            notes.append(f"no $/GPU-hour for {gpu}: set search.cost_per_gpu_hour.{gpu}")
        elif not tps > 0:
            cost.append(math.nan)
            notes.append("no output tokens: cost per token undefined")
        else:
            cost.append(price * float(n) / 3600.0 / float(tps) * 1e6)
            notes.append("")
    return cost, notes


def _slo_verdict(row: dict[Any, Any], spec: SearchSpec) -> str:
    """'' when the row ran and meets every bound; otherwise what failed, by how much."""
    if row.get("status") != "ok":
        return f"not run to completion: {row.get('status')}"
    failed = []
    for metric, bounds in spec.slo.items():
        for pct, bound in bounds.items():
            col = f"{metric}.{pct}"
            value = finite_or_none(row.get(col))
            if value is None:
                failed.append(f"{col} missing (bound {bound:g} s)")
            elif value > bound:
                failed.append(f"{col} = {_fmt_s(value)} > {_fmt_s(bound)} "
                              f"(+{_fmt_s(value - bound)}, +{(value / bound - 1):.0%})")
    return "; ".join(failed)


def frontier_order(df: pd.DataFrame, spec: SearchSpec) -> list[Any]:
    """Index labels of the frontier, best first: throughput/GPU descending, then latency.

    Throughput per GPU is compared at 3 significant digits: in an open-loop replay it
    is the offered load over the GPUs, and configs with the same GPU count differ only
    in the last requests' drain (~0.01 %), which is no trade-off against latency.
    Ties keep one config: the lowest latency, then fewer GPUs, then the smaller config
    id, so the answer does not depend on row order."""
    cand = df[df["slo_ok"].to_numpy(dtype=bool)].copy()
    cand["_lat"] = pd.to_numeric(cand[spec.objective], errors="coerce")
    cand["_gpus"] = pd.to_numeric(cand["num_gpus"], errors="coerce")
    cand = cand[np.isfinite(cand["throughput_per_gpu"]) & np.isfinite(cand["_lat"])]
    cand["_tput"] = [float(f"{x:.3g}") for x in cand["throughput_per_gpu"]]
    cand = cand.sort_values(["_tput", "_lat", "_gpus", "config_id"],
                            ascending=[False, True, True, True], kind="mergesort")
    best_lat = math.inf
    out = []
    # sweeping down in throughput, a config is undominated iff it is strictly faster
    # than everything with at least its throughput
    for label, lat in zip(cand.index, cand["_lat"], strict=True):
        if lat < best_lat:
            out.append(label)
            best_lat = lat
    return out


def _column_order(df: pd.DataFrame, spec: SearchSpec) -> list[str]:
    knobs = [KNOB + f for f in knob_fields(df, spec)]
    first = ["config_id", *knobs, "status", "reason", "slo_ok", "slo_violation", "pareto",
             "rank", "num_gpus", "gpu", "throughput_per_gpu", "cost_per_m_output_tokens",
             "goodput_per_s", spec.objective, *slo_columns(spec)]
    first = list(dict.fromkeys(first))
    rest = [c for c in df.columns if c not in first and c != "note"]
    return [*first, *rest, "note"]


# -------------------------------------------------------------- shortlist
def shortlist(df: pd.DataFrame, spec: SearchSpec) -> list[dict[str, Any]]:
    """The ranked configs, each with its knobs, headline figures and `why`."""
    fields = knob_fields(df, spec)
    ranked = df[df["rank"].notna()].sort_values("rank", kind="mergesort")
    keys = knob_keys(df, spec)
    entries = []
    for _, row in ranked.iterrows():
        metrics = {c: _native(row.get(c), whole=c.startswith("num_")) for c in
                   (*HEADLINE, spec.objective, *slo_columns(spec)) if c in row.index}
        entries.append({
            "rank": int(row["rank"]),
            "config_id": str(row["config_id"]),
            "knobs": {f: knob_value(spec, f, row[KNOB + f]) for f in fields},
            "metrics": metrics,
            "why": why(row, df, spec, keys),
        })
    return entries


def knob_fields(df: pd.DataFrame, spec: SearchSpec) -> list[str]:
    """The swept fields in the space's order (a checkpoint's rows come back key-sorted)."""
    present = [c[len(KNOB):] for c in df.columns if c.startswith(KNOB)]
    return [f for f in spec.space if f in present] + [f for f in present if f not in spec.space]


def knob_value(spec: SearchSpec, field: str, value: Any) -> Any:
    """The value as the space lists it (pandas may have turned 8 into 8.0)."""
    for v in spec.space.get(field, ()):
        if _key(v) == _key(value):
            return v
    return _native(value)


def why(row: pd.Series, df: pd.DataFrame, spec: SearchSpec,
        keys: dict[str, np.ndarray] | None = None) -> list[str]:
    """One sentence per one-knob neighbour, in the space's field and value order."""
    keys = keys if keys is not None else knob_keys(df, spec)
    mine = {f: _key(row[KNOB + f]) for f in keys}
    out = []
    for f in keys:
        same = np.ones(len(df), dtype=bool)
        for f2 in keys:
            if f2 != f:
                same &= keys[f2] == mine[f2]
        near = df[same & (keys[f] != mine[f])]
        pos = {_key(v): i for i, v in enumerate(spec.space.get(f, ()))}
        near = near.assign(_pos=[pos.get(_key(v), len(pos)) for v in near[KNOB + f]])
        for _, other in near.sort_values(["_pos", "config_id"], kind="mergesort").iterrows():
            out.append(compare(row, other, f, spec))
    return out


def knob_keys(df: pd.DataFrame, spec: SearchSpec) -> dict[str, np.ndarray]:
    """Each knob column as comparable text (8 and 8.0 alike), computed once per table."""
    return {f: np.array([_key(v) for v in df[KNOB + f]], dtype=object)
            for f in knob_fields(df, spec)}


def compare(row: pd.Series, other: pd.Series, field: str, spec: SearchSpec) -> str:
    """Why ``row`` rather than ``other``, which differs only in ``field``."""
    mine = knob_value(spec, field, row[KNOB + field])
    theirs = knob_value(spec, field, other[KNOB + field])
    change = f"{knob_label(field, mine)} instead of {_fmt_value(theirs)}"
    if other["status"] != "ok":
        reason = other.get("reason")
        reason = reason.strip() if isinstance(reason, str) and reason.strip() else "no reason"
        verdict = "is infeasible" if other["status"] == "infeasible" else "failed"
        return f"{change}: {knob_label(field, theirs)} {verdict} ({reason})"
    parts: list[tuple[float, int, str]] = []
    slo_failed = set()
    for metric, bounds in spec.slo.items():
        for pct, bound in bounds.items():
            col = f"{metric}.{pct}"
            a, b = finite_or_none(other.get(col)), finite_or_none(row.get(col))
            if a is not None and b is not None and a > bound >= b:
                slo_failed.add(col)
                parts.append((math.inf, len(parts), f"{latency_name(col)} {_fmt_s(a)} → "
                              f"{_fmt_s(b)} (SLO ≤ {_fmt_s(bound)})"))
    moves = [m for m in _moves(row, other, spec) if m[2] not in slo_failed]
    axes = {"throughput_per_gpu", spec.objective}
    for magnitude, i, col, text in moves:
        if magnitude >= MIN_MOVE and (col in axes or len(parts) < MAX_PARTS):
            parts.append((magnitude, i, text))
    if not parts:
        return f"{change}: {_no_move(row, other, spec)}"
    parts.sort(key=lambda p: (-p[0], p[1]))
    return f"{change}: " + ", ".join(p[2] for p in parts)


def _no_move(row: pd.Series, other: pd.Series, spec: SearchSpec) -> str:
    axes = [(c, kind, finite_or_none(other.get(c)), finite_or_none(row.get(c))) for c, kind in
            (("throughput_per_gpu", "ratio"), (spec.objective, "latency"))]
    if all(a == b for _, _, a, b in axes):
        return (f"identical throughput/GPU and {latency_name(spec.objective)}; listed by the "
                "tie-break (fewer GPUs, then config id)")
    shown = ", ".join(_phrase(c, kind, a, b) for c, kind, a, b in axes
                      if a is not None and b is not None)
    return f"every figure within 5% ({shown})"


def _moves(row: pd.Series, other: pd.Series, spec: SearchSpec
           ) -> list[tuple[float, int, str, str]]:
    """(how far it moved, tie-break, column, phrase), largest move first. A ratio moves
    by |log(new/old)|; a count by |log((new+1)/(old+1))| so that 312 -> 0 counts; a
    fraction by 2 x |new - old| (50 points ~ a factor e): a judgement, not a law."""
    out = []
    latency = list(dict.fromkeys([spec.objective, *slo_columns(spec), "ttft_s.p90",
                                  "tpot_s.p90", "e2e_s.p90"]))
    cols: list[tuple[str, str]] = [("throughput_per_gpu", "ratio"), ("num_gpu_blocks", "kv"),
                                   ("num_preemptions", "count"), ("num_rejected", "count"),
                                   *((c, "latency") for c in latency),
                                   ("goodput_per_s", "ratio"), ("kv_usage_max", "fraction"),
                                   ("prefix_cache_hit_rate", "fraction")]
    if row.get("gpu") != other.get("gpu"):
        cols.append(("cost_per_m_output_tokens", "cost"))
    for i, (col, kind) in enumerate(cols):
        a, b = finite_or_none(other.get(col)), finite_or_none(row.get(col))
        if a is None or b is None:
            continue
        if kind in ("count", "fraction"):
            mag = abs(math.log((b + 1) / (a + 1))) if kind == "count" else 2 * abs(b - a)
        elif a > 0 and b > 0:
            mag = abs(math.log(b / a))
        else:
            mag = 0.0 if a == b else math.inf
        out.append((mag, i, col, _phrase(col, kind, a, b)))
    out.sort(key=lambda m: (-m[0], m[1]))
    return out


def _phrase(col: str, kind: str, a: float, b: float) -> str:
    if kind == "kv":
        ratio = f"{b / a:.1f}x " if a > 0 else ""
        return f"KV capacity {ratio}(num_gpu_blocks {a:,.0f} → {b:,.0f})"
    if kind == "count":
        name = "preemptions" if col == "num_preemptions" else "rejected requests"
        return f"{name} {a:,.0f} → {b:,.0f}"
    if kind == "fraction":
        name = "peak KV usage" if col == "kv_usage_max" else "prefix-cache hit rate"
        return f"{name} {a:.0%} → {b:.0%}"
    if kind == "latency":
        return f"{latency_name(col)} {_fmt_s(a)} → {_fmt_s(b)}"
    if col == "throughput_per_gpu":
        return f"throughput/GPU {a:,.0f} → {b:,.0f} tok/s"
    if col == "goodput_per_s":
        return f"goodput {a:.2f} → {b:.2f} req/s"
    return f"cost ${a:.2f} → ${b:.2f} per M output tokens"


def knob_label(field: str, value: Any) -> str:
    """'TP 2', '8 workers', 'max_num_seqs 64': how people say a knob's value."""
    if field == "engine.tensor_parallel_size":
        return f"TP {_fmt_value(value)}"
    if field == "engine.pipeline_parallel_size":
        return f"PP {_fmt_value(value)}"
    if field == "cluster.num_workers":
        return f"{_fmt_value(value)} worker{'' if value == 1 else 's'}"
    short = field.split(".", 1)[1] if "." in field else field
    return f"{short} {_fmt_value(value)}"


# ------------------------------------------------------------ hypervolume
def hypervolume(points: Iterable[Sequence[float]], ref: Sequence[float]) -> float:
    """Area dominated by ``points`` (2-D, both minimised) and bounded by ``ref``.

    To compare search strategies on this module's frontier, pass
    (-throughput_per_gpu, latency) pairs and a reference worse than every config."""
    rx, ry = float(ref[0]), float(ref[1])
    pts = sorted((float(x), float(y)) for x, y in points if x < rx and y < ry)
    area, prev_y = 0.0, ry
    for x, y in pts:  # x ascending: each point adds the strip below the last best y
        if y < prev_y:
            area += (rx - x) * (prev_y - y)
            prev_y = y
    return area


def frontier_points(df: pd.DataFrame, spec: SearchSpec) -> list[tuple[float, float]]:
    """The frontier as minimisation pairs for :func:`hypervolume`."""
    front = df[df["pareto"].to_numpy(dtype=bool)]
    return [(-float(t), float(lat)) for t, lat in
            zip(front["throughput_per_gpu"], front[spec.objective], strict=True)]


# ---------------------------------------------------------------- helpers
def finite_or_none(v: Any) -> float | None:
    """A finite float, or None for anything else (missing, text, NaN, inf)."""
    if v is None or isinstance(v, bool | str):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _native(v: Any, whole: bool = False) -> Any:
    """A plain Python value for YAML; ``whole``: a count that NaN rows made float."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    if whole and isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _key(v: Any) -> str:
    v = _native(v)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return json.dumps(v, sort_keys=True, default=str)


def _fmt_value(v: Any) -> str:
    v = _native(v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return json.dumps(v) if isinstance(v, list | dict) else str(v)


def _fmt_s(x: float) -> str:
    """Seconds for people, three significant digits: 10.4 s, 1.52 s, 35.5 ms, 669 ms."""
    if abs(x) >= 1:
        return f"{x:.3g} s" if abs(x) < 1000 else f"{x:,.0f} s"
    return f"{x * 1e3:.3g} ms"


def latency_name(col: str) -> str:
    metric, _, pct = col.partition(".")
    return f"{_LATENCY_NAMES.get(metric, metric)} {pct}"
