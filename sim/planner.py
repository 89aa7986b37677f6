"""Autoscaling: start-up delays, planner policies and the fleet's bookkeeping.

Three parts, none of which needs simpy, so each is tested by hand:

* start-up delay distributions (``STARTUP_DELAYS``): how long a new worker takes
  from "start" to "ready" (image pull, weight load, CUDA graph capture);
* planner policies (``PLANNER_POLICIES``): once per interval the cluster hands
  an ``Observation`` to a ``Planner``, which returns a ``Decision`` (a target
  worker count) after applying the limits and cooldowns;
* ``Fleet``: worker states and times, GPU-seconds and the scale-event log.

A worker's life, and what its GPUs are booked for::

    start ---- starting ---- ready ---- serving ---- drain ---- draining ---- stop
    |<------------------------- GPUs booked ------------------------------>|

GPUs are booked from ``start`` (a starting worker holds its GPUs while it loads)
until ``stop``. A draining worker takes no new requests, finishes the ones it
has, then stops; it still holds its GPUs, so it counts against ``max_gpus``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import InputError, ScenarioError
from .registry import Registry
from .timing import TimingModel, prefill_attn_work

# ----------------------------------------------------------------- start-up delays


class StartupDelay(Protocol):
    def sample(self, rng: np.random.Generator) -> float: ...

    def expected_s(self) -> float: ...


STARTUP_DELAYS: Registry[Callable[..., StartupDelay]] = Registry("startup delay")


def _require(ok: bool, where: str, value: object, rule: str, fix: str) -> None:
    if not ok:
        raise ScenarioError(where, f"{value!r}: {rule}", fix)


@STARTUP_DELAYS.register("fixed")
@dataclass(frozen=True)
class FixedDelay:
    delay_s: float

    def __post_init__(self) -> None:
        _require(self.delay_s >= 0, "startup.delay_s", self.delay_s, "must be >= 0",
                 "give a start-up delay in seconds")

    def sample(self, rng: np.random.Generator) -> float:
        return float(self.delay_s)

    def expected_s(self) -> float:
        return float(self.delay_s)


@STARTUP_DELAYS.register("uniform")
@dataclass(frozen=True)
class UniformDelay:
    lo_s: float
    hi_s: float

    def __post_init__(self) -> None:
        _require(0 <= self.lo_s <= self.hi_s, "startup.lo_s", (self.lo_s, self.hi_s),
                 "must satisfy 0 <= lo_s <= hi_s", "swap or fix the bounds")

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.lo_s, self.hi_s))

    def expected_s(self) -> float:
        return (self.lo_s + self.hi_s) / 2


@STARTUP_DELAYS.register("lognormal")
@dataclass(frozen=True)
class LognormalDelay:
    """Median and log-space sigma: the shape of measured cold starts (a long right tail)."""

    median_s: float
    sigma: float

    def __post_init__(self) -> None:
        _require(self.median_s > 0, "startup.median_s", self.median_s, "must be > 0",
                 "give the median start-up time in seconds")
        _require(self.sigma >= 0, "startup.sigma", self.sigma, "must be >= 0",
                 "sigma is the standard deviation of log(delay); 0 means fixed")

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.lognormal(math.log(self.median_s), self.sigma))

    def expected_s(self) -> float:
        return self.median_s * math.exp(self.sigma**2 / 2)


@STARTUP_DELAYS.register("gamma")
@dataclass(frozen=True)
class GammaDelay:
    """Mean and coefficient of variation: shape k = 1/cv^2, scale = mean/k."""

    mean_s: float
    cv: float

    def __post_init__(self) -> None:
        _require(self.mean_s > 0, "startup.mean_s", self.mean_s, "must be > 0",
                 "give the mean start-up time in seconds")
        _require(self.cv > 0, "startup.cv", self.cv, "must be > 0",
                 "use kind: fixed for a constant delay")

    def sample(self, rng: np.random.Generator) -> float:
        shape = 1.0 / self.cv**2
        return float(rng.gamma(shape, self.mean_s / shape))

    def expected_s(self) -> float:
        return self.mean_s


@STARTUP_DELAYS.register("empirical")
@dataclass(frozen=True)
class EmpiricalDelay:
    """Resample a measured table of start-up times (each row equally likely)."""

    values_s: tuple[float, ...]

    def __post_init__(self) -> None:
        _require(len(self.values_s) > 0, "startup.values_s", self.values_s, "must not be empty",
                 "list at least one measured start-up time")
        for i, v in enumerate(self.values_s):
            _require(math.isfinite(v) and v >= 0, f"startup.values_s[{i}]", v,
                     "must be a finite number >= 0", "remove or fix the measurement")

    def sample(self, rng: np.random.Generator) -> float:
        return float(self.values_s[int(rng.integers(len(self.values_s)))])

    def expected_s(self) -> float:
        return float(np.mean(self.values_s))


def read_startup_table(path: str | Path) -> tuple[float, ...]:
    """Seconds from the ``startup_s`` column of a CSV file (other columns are ignored)."""
    p = Path(path)
    fix = "a CSV with a header row naming a startup_s column and one number >= 0 per row"
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(str(p), f"cannot read the start-up table ({e.strerror})", fix) from None
    rows = csv.reader(text.splitlines())
    header = next(rows, None)
    if header is None or "startup_s" not in [h.strip() for h in header]:
        raise InputError(f"{p}:1", f"header {header!r} has no startup_s column", fix)
    col = [h.strip() for h in header].index("startup_s")
    values: list[float] = []
    for line, row in enumerate(rows, start=2):
        if not row or not "".join(row).strip():
            continue
        raw = row[col].strip() if col < len(row) else ""
        try:
            v = float(raw)
        except ValueError:
            v = math.nan
        if not (math.isfinite(v) and v >= 0):
            raise InputError(f"{p}:{line}", f"startup_s = {raw!r}: must be a number >= 0",
                             "fix or delete that row")
        values.append(v)
    if not values:
        raise InputError(str(p), "the start-up table has no rows", fix)
    return tuple(values)


def make_startup_delay(spec: Mapping[str, Any], where: str = "startup") -> StartupDelay:
    """``{kind: lognormal, median_s: 60, sigma: 0.3}``; ``empirical`` takes ``values_s``
    (a list) or ``path`` (a CSV with a ``startup_s`` column)."""
    params = dict(spec)
    kind = str(params.pop("kind", ""))
    build = STARTUP_DELAYS.get(kind, f"{where}.kind")
    if kind == "empirical" and "path" in params:
        params["values_s"] = read_startup_table(params.pop("path"))
    if kind == "empirical" and "values_s" in params:
        params["values_s"] = tuple(float(v) for v in params["values_s"])
    try:
        return build(**params)
    except TypeError as e:
        raise ScenarioError(where, f"bad parameters {sorted(params)} for kind {kind!r} ({e})",
                            "see sim/planner.py for each kind's fields") from None


# ----------------------------------------------------------- observations, decisions


@dataclass(frozen=True)
class Observation:
    """What the cluster saw over the interval ``(time_s - interval_s, time_s]``.
    Means over requests are NaN when no request contributed."""

    time_s: float
    interval_s: float
    num_workers_ready: int
    num_workers_starting: int = 0
    num_workers_draining: int = 0
    num_arrivals: int = 0
    num_completions: int = 0
    mean_prompt_tokens: float = math.nan  # ISL of the interval's arrivals
    mean_output_tokens: float = math.nan  # OSL of the interval's completions
    mean_num_waiting: float = 0.0  # queued requests, all ready workers, time-averaged
    peak_num_waiting: int = 0
    mean_kv_usage: float = 0.0  # used / total KV blocks, mean over ready workers and time
    mean_ttft_s: float = math.nan  # of requests finished in the interval
    mean_itl_s: float = math.nan

    @property
    def num_workers(self) -> int:
        """Workers that count toward the target: ready and starting (not draining)."""
        return self.num_workers_ready + self.num_workers_starting


@dataclass(frozen=True)
class Decision:
    time_s: float
    num_workers: int  # target count of ready + starting workers
    reason: str
    inputs: dict[str, float] = field(default_factory=dict)

    def delta(self, obs: Observation) -> int:
        return self.num_workers - obs.num_workers


class PlannerPolicy(Protocol):
    def desired(self, obs: Observation) -> tuple[int, str, dict[str, float]]:
        """Wanted count of ready + starting workers, why, and the numbers used."""
        ...


PLANNER_POLICIES: Registry[Callable[..., PlannerPolicy]] = Registry("planner policy")


@PLANNER_POLICIES.register("load")
@dataclass(frozen=True)
class LoadPolicy:
    """Threshold scaling on load, one worker per interval: Dynamo's load-based planner
    (ai-dynamo/dynamo:docs/architecture/load_planner.md @ 19d1fc5e; its defaults are
    KV 0.9 / 0.5 and prefill queue 0.5 / 0.2). Up when either signal is above its upper
    threshold, down when both are below their lower ones. Like Dynamo it holds while a
    worker is still starting, so one burst does not launch a worker per interval."""

    kv_scale_up: float = 0.9
    kv_scale_down: float = 0.5
    queue_scale_up: float = 0.5  # mean queued requests per ready worker
    queue_scale_down: float = 0.2
    step: int = 1

    def __post_init__(self) -> None:
        _require(0 <= self.kv_scale_down <= self.kv_scale_up, "planner.kv_scale_down",
                 (self.kv_scale_down, self.kv_scale_up), "must satisfy down <= up",
                 "lower kv_scale_down")
        _require(0 <= self.queue_scale_down <= self.queue_scale_up, "planner.queue_scale_down",
                 (self.queue_scale_down, self.queue_scale_up), "must satisfy down <= up",
                 "lower queue_scale_down")
        _require(self.step >= 1, "planner.step", self.step, "must be >= 1", "use 1")

    def desired(self, obs: Observation) -> tuple[int, str, dict[str, float]]:
        queue = obs.mean_num_waiting / max(obs.num_workers_ready, 1)
        kv = obs.mean_kv_usage
        used = {"mean_kv_usage": kv, "queue_per_worker": queue}
        n = obs.num_workers
        if obs.num_workers_starting > 0:
            return n, f"hold: {obs.num_workers_starting} worker(s) still starting", used
        if kv > self.kv_scale_up or queue > self.queue_scale_up:
            return n + self.step, (f"up: kv {kv:.3f} > {self.kv_scale_up} or queue/worker "
                                   f"{queue:.3f} > {self.queue_scale_up}"), used
        if kv < self.kv_scale_down and queue < self.queue_scale_down:
            return n - self.step, (f"down: kv {kv:.3f} < {self.kv_scale_down} and queue/worker "
                                   f"{queue:.3f} < {self.queue_scale_down}"), used
        return n, "hold: load between thresholds", used


class WorkerCapacity(Protocol):
    """What one worker can do, as the SLA policy needs it (the cluster passes one)."""

    def prefill_time_s(self, prompt_tokens: float) -> float:
        """One prompt's prefill alone on an idle worker."""
        ...

    def max_decode_seqs(self, itl_target_s: float, context_tokens: float) -> float:
        """Most sequences one worker decodes together with a step time <= the target."""
        ...


@dataclass(frozen=True)
class TimingCapacity:
    """A ``WorkerCapacity`` from the engine's timing model (no prefix hits, no chunking)."""

    timing: TimingModel
    max_num_seqs: int

    def prefill_time_s(self, prompt_tokens: float) -> float:
        p = max(round(prompt_tokens), 1)
        return self.timing.step_time(p, prefill_attn_work(p, 0), 1, 0, 0)

    def max_decode_seqs(self, itl_target_s: float, context_tokens: float) -> float:
        ctx = max(round(context_tokens), 1)

        def fits(d: int) -> bool:
            return self.timing.step_time(0, 0.0, 0, d, d * ctx) <= itl_target_s

        lo, hi = 0, self.max_num_seqs  # step time grows with d: bisect the largest that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return float(lo)


@PLANNER_POLICIES.register("sla")
@dataclass(frozen=True)
class SlaPolicy:
    """Workers needed so predicted TTFT <= ttft_target_s and ITL <= itl_target_s, from the
    interval's request rate, ISL and OSL (the shape of Dynamo's throughput planner,
    ai-dynamo/dynamo:components/planner/src/dynamo/planner/utils/planner_core.py @ 07619258,
    _compute_replica_requirements). With rate r, ISL, OSL and n workers:

    * TTFT: prefill as an M/D/1 queue per worker, service t_p = prefill_time_s(ISL),
      rho = r t_p / n, predicted TTFT = t_p (1 + rho / (2 (1 - rho))); the smallest n
      with rho < 1 and predicted TTFT <= target.
    * ITL: Little's law, concurrent decodes L = r * OSL * itl_target; n = ceil(L / D) with
      D = max_decode_seqs(itl_target, ISL + OSL / 2) (Dynamo's mean context).

    Needed = max of the two. It treats prefill and decode as if each had the worker to
    itself (as Dynamo's disaggregated formula does), so for aggregated workers it is
    optimistic; ``headroom`` (> 1) buys margin."""

    ttft_target_s: float
    itl_target_s: float
    capacity: WorkerCapacity
    headroom: float = 1.0

    def __post_init__(self) -> None:
        _require(self.ttft_target_s > 0, "planner.ttft_target_s", self.ttft_target_s,
                 "must be > 0", "give the TTFT target in seconds")
        _require(self.itl_target_s > 0, "planner.itl_target_s", self.itl_target_s,
                 "must be > 0", "give the ITL target in seconds")
        _require(self.headroom >= 1, "planner.headroom", self.headroom, "must be >= 1",
                 "use 1.0 for no margin")

    def desired(self, obs: Observation) -> tuple[int, str, dict[str, float]]:
        if obs.num_arrivals == 0 or obs.interval_s <= 0:
            return 0, "no arrivals in the interval", {"rate_per_s": 0.0}
        rate = obs.num_arrivals / obs.interval_s * self.headroom
        isl = obs.mean_prompt_tokens if math.isfinite(obs.mean_prompt_tokens) else 0.0
        osl = obs.mean_output_tokens if math.isfinite(obs.mean_output_tokens) else 1.0
        t_p = self.capacity.prefill_time_s(isl)
        d_max = self.capacity.max_decode_seqs(self.itl_target_s, isl + osl / 2)
        used = {"rate_per_s": rate, "isl": isl, "osl": osl, "prefill_time_s": t_p,
                "max_decode_seqs": d_max}
        if t_p > self.ttft_target_s or d_max <= 0:
            # more workers do not help: hold
            return obs.num_workers, (f"hold, targets unreachable: prefill alone {t_p:.4g} s "
                                     f"vs TTFT target {self.ttft_target_s}, {d_max:g} decodes "
                                     "fit the ITL target"), used
        n_ttft = _workers_for_ttft(rate, t_p, self.ttft_target_s)
        n_itl = math.ceil(rate * osl * self.itl_target_s / d_max)
        used |= {"workers_for_ttft": float(n_ttft), "workers_for_itl": float(n_itl)}
        n = max(n_ttft, n_itl)
        return n, f"sla: {n_ttft} worker(s) for TTFT, {n_itl} for ITL", used


def predicted_ttft_s(rate_per_s: float, prefill_time_s: float, num_workers: int) -> float:
    """M/D/1 mean time in system per worker with the arrivals split evenly."""
    rho = rate_per_s * prefill_time_s / num_workers
    if rho >= 1:
        return math.inf
    return prefill_time_s * (1 + rho / (2 * (1 - rho)))


def _workers_for_ttft(rate: float, t_p: float, target_s: float) -> int:
    n = max(1, math.floor(rate * t_p) + 1)  # rho < 1
    while predicted_ttft_s(rate, t_p, n) > target_s:
        n += 1
    return n


def make_policy(spec: Mapping[str, Any], capacity: WorkerCapacity | None = None,
                where: str = "planner") -> PlannerPolicy:
    params = dict(spec)
    kind = str(params.pop("kind", ""))
    build = PLANNER_POLICIES.get(kind, f"{where}.kind")
    if kind == "sla":
        if capacity is None:
            raise ScenarioError(where, "the sla policy needs a worker capacity estimate",
                                "pass capacity= (e.g. TimingCapacity) or use kind: load")
        params["capacity"] = capacity
    try:
        return build(**params)
    except TypeError as e:
        raise ScenarioError(where, f"bad parameters {sorted(params)} for kind {kind!r} ({e})",
                            "see sim/planner.py for each policy's fields") from None


# ---------------------------------------------------------------------- planner


@dataclass(frozen=True)
class PlannerLimits:
    min_workers: int = 1
    max_workers: int | None = None
    gpus_per_worker: int = 1
    max_gpus: int | None = None

    def __post_init__(self) -> None:
        _require(self.min_workers >= 0, "planner.min_workers", self.min_workers,
                 "must be >= 0", "use 0 to allow scaling to zero")
        _require(self.gpus_per_worker >= 1, "planner.gpus_per_worker", self.gpus_per_worker,
                 "must be >= 1", "give the GPUs of one worker (tp * pp * dp)")
        _require(self.max_workers is None or self.max_workers >= self.min_workers,
                 "planner.max_workers", self.max_workers, "must be >= min_workers",
                 "raise max_workers")
        _require(self.max_gpus is None or self.max_gpus >= self.min_workers * self.gpus_per_worker,
                 "planner.max_gpus", self.max_gpus, "must fit min_workers * gpus_per_worker",
                 "raise max_gpus or lower min_workers")

    def ceiling(self, num_draining: int) -> int:
        """Most ready + starting workers allowed while ``num_draining`` still hold GPUs."""
        top = self.max_workers if self.max_workers is not None else 1 << 30
        if self.max_gpus is not None:
            top = min(top, self.max_gpus // self.gpus_per_worker - num_draining)
        return max(top, 0)


class Planner:
    """A policy plus the limits and cooldowns. ``scale_down_cooldown_s`` after a scale-up
    is Dynamo's grace period (a new worker needs time to fill its KV cache)."""

    def __init__(self, policy: PlannerPolicy, limits: PlannerLimits, interval_s: float,
                 scale_up_cooldown_s: float = 0.0, scale_down_cooldown_s: float = 0.0) -> None:
        _require(interval_s > 0, "planner.interval_s", interval_s, "must be > 0",
                 "give the adjustment interval in seconds")
        self.policy = policy
        self.limits = limits
        self.interval_s = interval_s
        self.scale_up_cooldown_s = scale_up_cooldown_s
        self.scale_down_cooldown_s = scale_down_cooldown_s
        self._last_up_s = -math.inf
        self._last_down_s = -math.inf
        self.decisions: list[Decision] = []

    def decide(self, obs: Observation) -> Decision:
        want, reason, used = self.policy.desired(obs)
        used = dict(used, wanted=float(want))
        n = obs.num_workers
        lim = self.limits
        target = max(want, lim.min_workers)
        ceiling = lim.ceiling(obs.num_workers_draining)
        if target > ceiling:  # never add past the ceiling, never force a cut to reach it
            target = max(ceiling, min(target, n))
            reason += f"; capped at {target} (max_workers / GPU budget)"
        if target > n and obs.time_s - self._last_up_s < self.scale_up_cooldown_s:
            target, reason = n, reason + "; held: scale-up cooldown"
        if target < n and (obs.time_s - self._last_up_s < self.scale_down_cooldown_s
                           or obs.time_s - self._last_down_s < self.scale_down_cooldown_s):
            target, reason = n, reason + "; held: scale-down cooldown"
        if target > n:
            self._last_up_s = obs.time_s
        elif target < n:
            self._last_down_s = obs.time_s
        decision = Decision(obs.time_s, target, reason, used)
        self.decisions.append(decision)
        return decision


# ------------------------------------------------------------------------ fleet


class WorkerState(Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass
class FleetWorker:
    worker_id: int
    gpus: int
    start_s: float
    ready_s: float = math.nan
    drain_s: float = math.nan
    stop_s: float = math.nan
    state: WorkerState = WorkerState.STARTING


@dataclass(frozen=True)
class ScaleEvent:
    time_s: float
    worker_id: int
    kind: str  # "start", "ready", "drain", "stop"
    reason: str = ""


class Fleet:
    """Worker states with timestamps. Ids are handed out in order by this fleet."""

    def __init__(self, gpus_per_worker: int = 1) -> None:
        self.gpus_per_worker = gpus_per_worker
        self.workers: dict[int, FleetWorker] = {}
        self.events: list[ScaleEvent] = []
        self._next_id = 0

    def start(self, now: float, reason: str = "") -> int:
        wid = self._next_id
        self._next_id += 1
        self.workers[wid] = FleetWorker(wid, self.gpus_per_worker, now)
        self.events.append(ScaleEvent(now, wid, "start", reason))
        return wid

    def add_ready(self, now: float, reason: str = "initial") -> int:
        """A worker that is ready at once (the initial fleet)."""
        wid = self.start(now, reason)
        self.mark_ready(wid, now)
        return wid

    def _move(self, wid: int, now: float, old: tuple[WorkerState, ...], new: WorkerState,
              kind: str, reason: str) -> FleetWorker:
        w = self.workers[wid]
        if w.state not in old:
            raise ValueError(f"worker {wid} is {w.state.value}; cannot {kind} it")
        w.state = new
        self.events.append(ScaleEvent(now, wid, kind, reason))
        return w

    def mark_ready(self, wid: int, now: float) -> None:
        self._move(wid, now, (WorkerState.STARTING,), WorkerState.READY, "ready", "").ready_s = now

    def drain(self, wid: int, now: float, reason: str = "") -> None:
        """Take no new requests. A starting worker has none: it stops at once."""
        if self.workers[wid].state is WorkerState.STARTING:
            self.stop(wid, now, reason or "cancelled while starting")
            return
        self._move(wid, now, (WorkerState.READY,), WorkerState.DRAINING, "drain",
                   reason).drain_s = now

    def stop(self, wid: int, now: float, reason: str = "") -> None:
        w = self._move(wid, now, (WorkerState.DRAINING, WorkerState.STARTING),
                       WorkerState.STOPPED, "stop", reason)
        w.stop_s = now

    def ids(self, state: WorkerState) -> list[int]:
        return [w.worker_id for w in self.workers.values() if w.state is state]

    def count(self, state: WorkerState) -> int:
        return sum(w.state is state for w in self.workers.values())

    @property
    def num_gpus_booked(self) -> int:
        return sum(w.gpus for w in self.workers.values() if w.state is not WorkerState.STOPPED)

    def gpu_seconds(self, until_s: float) -> float:
        """GPU-seconds booked up to ``until_s``, starting and draining time included."""
        total = 0.0
        for w in self.workers.values():
            end = min(w.stop_s, until_s) if w.state is WorkerState.STOPPED else until_s
            total += w.gpus * max(end - w.start_s, 0.0)
        return total

    def choose_to_drain(self, k: int, num_active: Mapping[int, int]) -> list[int]:
        """``k`` workers to remove: starting ones first (newest first: nothing to finish),
        then ready ones with the fewest active requests (ties: the newest)."""
        starting = sorted(self.ids(WorkerState.STARTING), reverse=True)
        ready = sorted(self.ids(WorkerState.READY), key=lambda i: (num_active.get(i, 0), -i))
        return (starting + ready)[:max(k, 0)]

    def apply(self, decision: Decision, now: float,
              num_active: Mapping[int, int]) -> tuple[list[int], list[int]]:
        """Start or drain workers to reach ``decision.num_workers``: returns (started ids,
        drained ids). A drained starting worker is already stopped; a drained ready worker
        must be stopped by the cluster (``stop``) once it has finished its requests."""
        n = self.count(WorkerState.READY) + self.count(WorkerState.STARTING)
        delta = decision.num_workers - n
        started = [self.start(now, decision.reason) for _ in range(max(delta, 0))]
        drained = self.choose_to_drain(-delta, num_active) if delta < 0 else []
        for wid in drained:
            self.drain(wid, now, decision.reason)
        return started, drained

