"""The planner inside a run: periodic decisions, workers that start slowly and drain.

``Autoscaler`` joins a ``Cluster`` (``Cluster(..., autoscaler=...)``). Every
``planner.interval_s`` it brings the ready workers up to date, builds an
``Observation`` of the interval just ended and asks the ``Planner`` for a target
worker count; the ``Fleet`` starts or drains workers to reach it:

* a started worker gets a fresh engine at once (it is booked: GPU-seconds count
  from the start) but is offered to the router only after a start-up delay
  drawn from the scenario's distribution (``sim.planner.STARTUP_DELAYS``);
* a drained worker leaves the router's candidates at once, finishes what it
  holds, then stops (a starting one is cancelled).

Event order at one instant: step ends, then workers becoming ready
(``READY_PRIORITY``), then arrivals, then the planner's tick
(``TICK_PRIORITY``), then scheduling decisions. A worker ready at t can take an
arrival at t; a tick at t sees that instant's arrivals. Nothing here depends on
the engine mode, so fast-forward and step-by-step runs decide the same.

Observation fields: arrivals and their mean prompt length, completions and their
mean output length, TTFT and ITL of the requests finished in the interval; queue
and KV usage are sampled at the tick over ready workers (not time-averaged).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .planner import Decision, Fleet, Observation, Planner, StartupDelay, WorkerState
from .request import Request

if TYPE_CHECKING:
    from .cluster import Cluster
    from .engines.vllm import VllmEngine

READY_PRIORITY = 0.999_999  # after every step end (< 1 - 1/slots), before arrivals (1.0)
TICK_PRIORITY = 1.7  # after arrivals (1.0) and KV deliveries (1.5), before decisions (2.x)
PRIORITY_SLOTS = 1 << 20  # worker ids for end-event priorities: ids grow as workers start


class Autoscaler:
    def __init__(self, planner: Planner, startup: StartupDelay,
                 engine_factory: Callable[[], VllmEngine], rng: np.random.Generator,
                 gpus_per_worker: int = 1) -> None:
        self.planner = planner
        self.startup = startup
        self.engine_factory = engine_factory
        self.rng = rng
        self.fleet = Fleet(gpus_per_worker)
        self.candidates: list[int] = []
        self._cluster: Cluster | None = None
        self._reset_interval()
        self.end_s = 0.0

    def _reset_interval(self) -> None:
        self._arrivals = 0
        self._prompt_sum = 0
        self._done = 0
        self._output_sum = 0
        self._ttft: list[float] = []
        self._itl: list[float] = []

    # ------------------------------------------------------------ wiring
    def attach(self, cluster: Cluster) -> None:
        self._cluster = cluster
        for _ in cluster.workers:
            wid = self.fleet.add_ready(0.0)
            self.candidates.append(wid)

    def start(self) -> None:
        from .cluster import _at

        assert self._cluster is not None
        _at(self._cluster.env, self.planner.interval_s, TICK_PRIORITY, self._tick)

    # ------------------------------------------------------------- hooks
    def on_arrival(self, req: Request) -> None:
        self._arrivals += 1
        self._prompt_sum += req.prompt_tokens

    def on_done(self, req: Request, now: float) -> None:
        self.end_s = max(self.end_s, now)
        if not req.reject_reason:
            self._done += 1
            self._output_sum += req.num_output
            self._ttft.append(req.first_token_s - req.arrival_s)
            if req.num_output > 1:
                self._itl.append((req.finish_s - req.first_token_s) / (req.num_output - 1))
        self._maybe_stop(req.worker_id, now)

    def _maybe_stop(self, wid: int, now: float) -> None:
        assert self._cluster is not None
        fw = self.fleet.workers.get(wid)
        if fw is None or fw.state is not WorkerState.DRAINING:
            return
        worker = self._cluster.workers[wid]
        if worker.plan is None and not worker.engine.has_work:
            self.fleet.stop(wid, now, "drained")

    # ------------------------------------------------------------ events
    def _tick(self, _ev: Any) -> None:
        from .cluster import _at

        cl = self._cluster
        assert cl is not None
        cl.counter.events += 1
        now = cl.env.now
        ready = self.candidates
        for wid in ready:
            cl.workers[wid].sync(now)
        engines = [cl.workers[w].engine for w in ready]
        waiting = [len(e.waiting) for e in engines]
        kv = [e.pool.num_used / e.pool.num_usable for e in engines]
        obs = Observation(
            time_s=now, interval_s=self.planner.interval_s,
            num_workers_ready=len(ready),
            num_workers_starting=self.fleet.count(WorkerState.STARTING),
            num_workers_draining=self.fleet.count(WorkerState.DRAINING),
            num_arrivals=self._arrivals,
            num_completions=self._done,
            mean_prompt_tokens=self._prompt_sum / self._arrivals if self._arrivals else math.nan,
            mean_output_tokens=self._output_sum / self._done if self._done else math.nan,
            mean_num_waiting=float(sum(waiting)),
            peak_num_waiting=max(waiting, default=0),
            mean_kv_usage=float(np.mean(kv)) if kv else 0.0,
            mean_ttft_s=float(np.mean(self._ttft)) if self._ttft else math.nan,
            mean_itl_s=float(np.mean(self._itl)) if self._itl else math.nan,
        )
        self._reset_interval()
        decision = self.planner.decide(obs)
        self._apply(decision, now)
        if cl.num_unfinished > 0:
            _at(cl.env, now + self.planner.interval_s, TICK_PRIORITY, self._tick)

    def _apply(self, decision: Decision, now: float) -> None:
        from .cluster import Worker, _at

        cl = self._cluster
        assert cl is not None
        active = {w.worker_id: len(w.engine.waiting) + len(w.engine.running)
                  for w in cl.workers}
        started, drained = self.fleet.apply(decision, now, active)
        for wid in started:
            assert wid == len(cl.workers), "fleet ids are the cluster's worker indices"
            engine = self.engine_factory()
            cl.workers.append(Worker(cl, wid, engine, slots=PRIORITY_SLOTS))
            cl.engines.append(engine)
            delay = float(self.startup.sample(self.rng))
            _at(cl.env, now + delay, READY_PRIORITY, self._on_ready, wid)
        for wid in drained:
            if wid in self.candidates:
                self.candidates.remove(wid)
            self._maybe_stop(wid, now)

    def _on_ready(self, ev: Any) -> None:
        cl = self._cluster
        assert cl is not None
        wid = ev._value
        if self.fleet.workers[wid].state is not WorkerState.STARTING:
            return  # cancelled while starting
        cl.counter.events += 1
        self.fleet.mark_ready(wid, cl.env.now)
        self.candidates.append(wid)
        self.candidates.sort()
        cl.unpark(cl.env.now)

    # ----------------------------------------------------------- report
    def summary(self, until_s: float) -> dict[str, Any]:
        f = self.fleet
        ready_times = [w.ready_s - w.start_s for w in f.workers.values()
                       if math.isfinite(w.ready_s) and w.start_s > 0]
        return {
            "gpu_seconds": f.gpu_seconds(until_s),
            "num_decisions": len(self.planner.decisions),
            "num_scale_ups": sum(e.kind == "start" and e.time_s > 0 for e in f.events),
            "num_scale_downs": sum(e.kind == "drain" for e in f.events),
            "max_workers_booked": _max_booked(f),
            "startup_s_mean": float(np.mean(ready_times)) if ready_times else math.nan,
            "events": [{"time_s": e.time_s, "worker_id": e.worker_id, "kind": e.kind,
                        "reason": e.reason} for e in f.events],
        }


def _max_booked(fleet: Fleet) -> int:
    """Most workers holding GPUs at once (start to stop)."""
    edges = []
    for w in fleet.workers.values():
        edges.append((w.start_s, 1))
        if math.isfinite(w.stop_s):
            edges.append((w.stop_s, -1))
    n = best = 0
    for _, d in sorted(edges, key=lambda e: (e[0], e[1])):
        n += d
        best = max(best, n)
    return best
