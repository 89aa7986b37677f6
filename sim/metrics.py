"""Per-request records and the one summary function.

A record is one flat row per request (``RECORD_COLUMNS``) plus its token times
as a ragged array (``token_offsets`` / ``token_times_s``). The simulator writes
them and the verify stage will measure them; ``summarize`` computes every
figure from records alone, so predicted and measured numbers are defined the
same way. Definitions follow ``vllm bench serve``
(vllm-project/vllm:vllm/benchmarks/serve.py @ v0.33.0, calculate_metrics):

* TTFT  = first token time - arrival (send) time
* TPOT  = (E2E - TTFT) / (output tokens - 1), per request with > 1 token
* ITL   = every gap between consecutive tokens of a request, pooled
* E2E   = finish time - arrival time
* duration = last finish - first arrival; throughputs divide by it
* percentiles: numpy's linear interpolation, as vLLM's
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .cluster import SimOutcome

RECORD_COLUMNS = ("request_id", "arrival_s", "first_token_s", "finish_s", "num_prompt_tokens",
                  "num_cached_tokens", "num_output_tokens", "worker_id", "num_preemptions",
                  "status")
PERCENTILES = (50, 90, 99)
# build_records counts ITL gaps by step when tokens outnumber steps this many times
ITL_COUNT_RATIO = 8


@dataclass
class TokenSteps:
    """Token times as the simulator knows them, without a per-token array: request
    i's tokens are those at ``pre_times[pre_off[i]:pre_off[i+1]]`` (KV computed on an
    earlier worker: disaggregated prefill), then one token per step of its worker in
    each step range ``[a, b)`` listed at ``ranges[roff[i]:roff[i+1]]`` as a, b, a, b...,
    the token's time being that step's end, ``step_ends[worker_id][k]``. A long trace
    has tens of millions of tokens but a few hundred thousand steps per worker."""
    step_ends: list[np.ndarray]  # per worker, float64, every step's end time
    worker_id: np.ndarray  # int64, per request
    roff: np.ndarray  # int64, len n+1
    ranges: np.ndarray  # int64
    pre_off: np.ndarray  # int64, len n+1
    pre_times: np.ndarray  # float64

    def counts(self) -> np.ndarray:
        """Tokens per request."""
        r = self.ranges
        per_range = r[1::2] - r[0::2]
        csum = np.concatenate(([0], np.cumsum(per_range)))
        return csum[self.roff[1:] // 2] - csum[self.roff[:-1] // 2] + np.diff(self.pre_off)

    def times(self) -> np.ndarray:
        """All token times, request after request (what ``token_times_s`` holds)."""
        pieces: list[np.ndarray] = []
        r = self.ranges.tolist()
        roff = self.roff.tolist()
        poff = self.pre_off.tolist()
        for i, w in enumerate(self.worker_id.tolist()):
            if poff[i + 1] > poff[i]:
                pieces.append(self.pre_times[poff[i]:poff[i + 1]])
            if roff[i + 1] > roff[i]:
                ends = self.step_ends[w]
                for j in range(roff[i], roff[i + 1], 2):
                    pieces.append(ends[r[j]:r[j + 1]])
        return np.concatenate(pieces) if pieces else np.empty(0)


class Records:
    """One flat row per request (``columns``) and each request's token times as a
    ragged array: request i's tokens at ``token_times_s[token_offsets[i]:
    token_offsets[i+1]]``. The simulator's records keep their token times as steps
    (``token_steps``) and build the per-token array only when it is read."""

    __slots__ = (
        "_times",
        "columns",
        "itl_counts",
        "reject_reasons",
        "token_offsets",
        "token_steps",
    )

    def __init__(self, columns: dict[str, np.ndarray], token_offsets: np.ndarray,
                 token_times_s: np.ndarray | None, reject_reasons: dict[int, str],
                 itl_counts: tuple[np.ndarray, np.ndarray] | None = None,
                 token_steps: TokenSteps | None = None) -> None:
        if token_times_s is None and token_steps is None:
            raise ValueError("Records need token_times_s or token_steps")
        self.columns = columns
        self.token_offsets = token_offsets  # int64, len n+1
        self._times = token_times_s
        self.reject_reasons = reject_reasons
        # the simulator's records also carry the ITL gaps of the completed requests as
        # (distinct gap values, how many times each occurs): the same multiset as the
        # gaps of token_times_s, from the steps (a long trace has tens of millions of
        # tokens but a few hundred thousand steps); None (measured records, subsets):
        # from the times
        self.itl_counts = itl_counts
        self.token_steps = token_steps

    @property
    def token_times_s(self) -> np.ndarray:
        """float64: request i's tokens at [offsets[i], offsets[i+1])."""
        if self._times is None:
            assert self.token_steps is not None
            self._times = self.token_steps.times()
        return self._times

    def __len__(self) -> int:
        return int(self.columns["request_id"].size)


def build_records(outcome: SimOutcome) -> Records:
    reqs = outcome.requests
    n = len(reqs)
    cols: dict[str, np.ndarray] = {
        "request_id": np.fromiter((r.rid for r in reqs), np.int64, n),
        "arrival_s": np.fromiter((r.arrival_s for r in reqs), np.float64, n),
        "first_token_s": np.fromiter((r.first_token_s for r in reqs), np.float64, n),
        "finish_s": np.fromiter((r.finish_s for r in reqs), np.float64, n),
        "num_prompt_tokens": np.fromiter((r.prompt_tokens for r in reqs), np.int64, n),
        "num_cached_tokens": np.fromiter((max(r.num_cached_tokens, 0) for r in reqs),
                                         np.int64, n),
        "num_output_tokens": np.fromiter((r.num_output for r in reqs), np.int64, n),
        "worker_id": np.fromiter((r.worker_id for r in reqs), np.int64, n),
        "num_preemptions": np.fromiter((r.num_preemptions for r in reqs), np.int64, n),
    }
    cols["status"] = np.array(["rejected" if r.reject_reason else "ok" for r in reqs],
                              dtype=object)
    ends = [e.steps.column("end_s") for e in outcome.engines]
    tokens = _token_steps(outcome, ends, cols["worker_id"])
    offsets = np.concatenate(([0], np.cumsum(tokens.counts())))
    reasons = {r.rid: r.reject_reason for r in reqs if r.reject_reason}
    # counting gaps by step pays where batches are large (many tokens per step); with a
    # few requests per step a partition of the gaps themselves is quicker
    steps = sum(int(w.size) for w in ends)
    counts = _itl_counts(outcome, ends) if steps * ITL_COUNT_RATIO < offsets[-1] else None
    return Records(cols, offsets, None, reasons, counts, tokens)


def _token_steps(outcome: SimOutcome, ends: list[np.ndarray],
                 worker_id: np.ndarray) -> TokenSteps:
    ranges: list[int] = []
    roff = [0]
    pre: list[float] = []
    pre_off = [0]
    for r in outcome.requests:
        if r.pre_token_times:  # tokens from an earlier worker (disaggregated prefill)
            pre.extend(r.pre_token_times)
        pre_off.append(len(pre))
        ranges.extend(r.token_steps)
        roff.append(len(ranges))
    return TokenSteps(ends, worker_id, np.asarray(roff, dtype=np.int64),
                      np.asarray(ranges, dtype=np.int64), np.asarray(pre_off, dtype=np.int64),
                      np.asarray(pre, dtype=np.float64))


def _itl_counts(outcome: SimOutcome,
                ends: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The ITL gaps of the completed requests as (values, counts), without a per-token
    array. Inside a range of steps [a, b) of worker w a request's gaps are that worker's
    step durations ends[k] - ends[k-1] for k in a+1 .. b-1, so each duration is counted
    once per request spanning it (a difference array per worker); the gaps between two
    ranges, and those of tokens from an earlier worker (disaggregated prefill), are
    listed one by one. Each value is the float difference ``np.diff`` of the token times
    gives."""
    marks: list[list[int]] = [[] for _ in ends]  # +1 at a+1, -1 at b (as b+S for -1)
    single: list[float] = []
    for r in outcome.requests:
        if r.reject_reason:
            continue
        ts = r.token_steps
        pre = r.pre_token_times
        if len(pre) > 1:
            single.extend(np.diff(np.asarray(pre, dtype=np.float64)).tolist())
        if not ts:
            continue
        w = ends[r.worker_id]
        m = marks[r.worker_id]
        if pre:
            single.append(float(w[ts[0]] - pre[-1]))
        for j in range(0, len(ts), 2):
            a, b = ts[j], ts[j + 1]
            if b - a >= 2:
                m.append(a + 1)
                m.append(-b - 1)  # negative: a closing mark at b
            if j:
                single.append(float(w[a] - w[ts[j - 1] - 1]))
    values = [np.asarray(single, dtype=np.float64)]
    counts = [np.ones(len(single), dtype=np.int64)]
    for w, m in zip(ends, marks, strict=True):
        if not m:
            continue
        mk = np.asarray(m, dtype=np.int64)
        cnt = np.zeros(w.size + 1, dtype=np.int64)
        np.add.at(cnt, mk[mk > 0], 1)
        np.add.at(cnt, -mk[mk < 0] - 1, -1)
        c = np.cumsum(cnt)[1:w.size]  # c[k-1]: requests with a gap ending at step k
        keep = c > 0
        values.append(np.diff(w)[keep])
        counts.append(c[keep])
    return np.concatenate(values), np.concatenate(counts)


def _weighted_stats(values: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """``_stats`` of the multiset where ``values[i]`` occurs ``counts[i]`` times: the
    same mean up to summation order, the same percentiles (numpy's linear method)."""
    n = int(counts.sum())
    if n == 0:
        return _stats(np.empty(0))
    order = np.argsort(values, kind="stable")
    v = values[order]
    last_rank = np.cumsum(counts[order]) - 1  # the rank of each value's last copy
    # numpy's pairwise sum, not np.dot: BLAS's dot sums in an order that depends on its
    # thread count (a Ray worker runs with OMP_NUM_THREADS=1, a local process does not),
    # which moved the mean by an ulp between executors
    out = {"mean": float((values * counts).sum() / n)}
    q = np.asarray(PERCENTILES, dtype=np.float64) / 100
    virtual = q * (n - 1)
    lo = np.floor(virtual)
    frac = virtual - lo
    lo_i = lo.astype(np.int64)
    hi_i = np.minimum(lo_i + 1, n - 1)
    a = v[np.searchsorted(last_rank, lo_i)]
    b = v[np.searchsorted(last_rank, hi_i)]
    diff = b - a
    res = np.where(frac >= 0.5, b - diff * (1 - frac), a + diff * frac)  # numpy's _lerp
    for p, x in zip(PERCENTILES, res, strict=True):
        out[f"p{p}"] = float(x)
    return out


def _stats(x: np.ndarray) -> dict[str, float]:
    if x.size == 0:
        return {"mean": float("nan"), **{f"p{p}": float("nan") for p in PERCENTILES}}
    out = {"mean": float(np.mean(x))}
    for p, v in zip(PERCENTILES, np.percentile(x, PERCENTILES), strict=True):
        out[f"p{p}"] = float(v)
    return out


def _itl(off: np.ndarray, times: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Every gap between consecutive tokens of a completed request, request by
    request in record order: one diff over all tokens, less the gaps that span
    two requests and those of requests not completed (tens of millions of tokens
    in a long trace: no per-request loop)."""
    if times.size < 2:
        return np.empty(0)
    gaps = np.diff(times)
    keep = np.repeat(ok, np.diff(off))[:-1]
    cross = off[1:-1] - 1  # the gap from a request's last token to the next one's first
    keep[cross[(cross >= 0) & (cross < gaps.size)]] = False
    return gaps if keep.all() else gaps[keep]


def summarize(records: Records) -> dict[str, Any]:
    c = records.columns
    ok = c["status"] == "ok"
    arrival = c["arrival_s"][ok]
    first = c["first_token_s"][ok]
    finish = c["finish_s"][ok]
    out_tokens = c["num_output_tokens"][ok]
    prompt = c["num_prompt_tokens"][ok]
    ttft = first - arrival
    e2e = finish - arrival
    multi = out_tokens > 1
    tpot = (e2e[multi] - ttft[multi]) / (out_tokens[multi] - 1)
    # ITL: the gaps inside each completed request, request by request (never the gap
    # from one request's last token to the next one's first)
    itl = (_weighted_stats(*records.itl_counts) if records.itl_counts is not None
           else _stats(_itl(records.token_offsets, records.token_times_s, ok)))
    n_all = len(records)
    duration = float(finish.max() - c["arrival_s"].min()) if ok.any() else 0.0
    rate = (lambda x: x / duration) if duration > 0 else (lambda x: float("nan"))
    return {
        "num_requests": n_all,
        "num_completed": int(ok.sum()),
        "num_rejected": int(n_all - ok.sum()),
        "duration_s": duration,
        "request_throughput_per_s": rate(int(ok.sum())),
        "output_throughput_tokens_per_s": rate(int(out_tokens.sum())),
        "total_throughput_tokens_per_s": rate(int(out_tokens.sum() + prompt.sum())),
        "ttft_s": _stats(ttft),
        "tpot_s": _stats(tpot),
        "itl_s": itl,
        "e2e_s": _stats(e2e),
        "prefix_cache_hit_rate": (float(c["num_cached_tokens"][ok].sum() / prompt.sum())
                                  if prompt.sum() else 0.0),
        "num_preemptions": int(c["num_preemptions"].sum()),
    }


def engine_summary(outcome: SimOutcome, duration_s: float) -> dict[str, Any]:
    """Figures only the simulator knows: forward passes, KV usage over time."""
    steps = 0
    usage_time = 0.0
    usage_max = 0.0
    per_worker = []
    for e in outcome.engines:
        s = e.steps
        steps += s.num_steps
        dur = s.column("end_s") - s.column("start_s")
        frac = s.column("kv_used_blocks") / e.pool.num_usable
        w_time = float((frac * dur).sum())
        usage_time += w_time
        w_max = float(frac.max()) if frac.size else 0.0
        usage_max = max(usage_max, w_max)
        per_worker.append({"num_steps": int(s.num_steps),
                           "kv_usage_mean": w_time / duration_s if duration_s > 0 else 0.0,
                           "kv_usage_max": w_max,
                           "num_gpu_blocks": int(e.pool.num_blocks)})
    n = max(len(outcome.engines), 1)
    return {
        "num_forward_passes": steps,
        "num_events": outcome.num_events,
        "kv_usage_mean": usage_time / (duration_s * n) if duration_s > 0 else 0.0,
        "kv_usage_max": usage_max,
        "workers": per_worker,
    }


def kv_usage_series(outcome: SimOutcome, interval_s: float = 1.0) -> dict[str, np.ndarray]:
    """KV usage of each worker sampled every ``interval_s`` (0 while idle)."""
    t_end = max((float(e.steps.column("end_s")[-1]) for e in outcome.engines
                 if e.steps.num_steps), default=0.0)
    grid = np.arange(0.0, t_end + interval_s, interval_s)
    out = {"time_s": grid}
    for i, e in enumerate(outcome.engines):
        starts = e.steps.column("start_s")
        ends = e.steps.column("end_s")
        frac = e.steps.column("kv_used_blocks") / e.pool.num_usable
        k = np.searchsorted(starts, grid, side="right") - 1
        inside = (k >= 0) & (grid < ends[np.maximum(k, 0)]) if ends.size else np.zeros_like(grid,
                                                                                           bool)
        out[f"worker_{i}"] = np.where(inside, frac[np.maximum(k, 0)] if frac.size else 0.0, 0.0)
    return out


def state_series(outcome: SimOutcome, interval_s: float = 0.5) -> dict[str, np.ndarray]:
    """What an engine's /metrics gauges would show if sampled every ``interval_s``: per
    worker, the running and waiting counts and the KV usage of the step in progress
    (all 0 while a worker is idle: an idle vLLM engine has nothing queued). Rows are
    (time_s, worker_id, metric, value) as flat columns, the shape verify scrapes."""
    t_end = max((float(e.steps.column("end_s")[-1]) for e in outcome.engines
                 if e.steps.num_steps), default=0.0)
    grid = np.arange(0.0, t_end + interval_s, interval_s)
    times, workers, metrics, values = [], [], [], []
    for i, e in enumerate(outcome.engines):
        s = e.steps
        if not s.num_steps:
            continue
        starts, ends = s.column("start_s"), s.column("end_s")
        k = np.maximum(np.searchsorted(starts, grid, side="right") - 1, 0)
        inside = (grid >= starts[0]) & (grid < ends[k])
        for name, col in (("num_requests_running", s.column("num_running").astype(float)),
                          ("num_requests_waiting", s.column("num_waiting").astype(float)),
                          ("kv_cache_usage_perc", s.column("kv_used_blocks") / e.pool.num_usable)):
            v = np.where(inside, col[k], 0.0)
            times.append(grid)
            workers.append(np.full(grid.size, i, np.int64))
            metrics.append(np.full(grid.size, name, dtype=object))
            values.append(v)
    if not times:
        return {"time_s": np.empty(0), "worker_id": np.empty(0, np.int64),
                "metric": np.empty(0, object), "value": np.empty(0)}
    return {"time_s": np.concatenate(times), "worker_id": np.concatenate(workers),
            "metric": np.concatenate(metrics), "value": np.concatenate(values)}
