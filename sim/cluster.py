"""The cluster: one simpy Environment, arrivals -> router -> workers.

Events are plain simpy events scheduled at absolute times with explicit
priorities, so that simultaneous events happen in one fixed order whatever the
mode (step-by-step or fast-forward) and whatever order they were created in::

    at one instant t:  step ends (worker 0, 1, ...)      priority [0, 1)
                       arrivals (trace order)             priority 1
                       scheduling decisions (worker 0..)  priority [2, 3)

A scheduling decision at t therefore sees every arrival and completion at t.
simpy's own ``Timeout`` adds a delay to ``now``; a run's step boundaries are
computed as a running sum, and ``now + (t - now)`` can miss ``t`` by an ulp,
so events are pushed at their absolute time (``_at``).

A worker executing a fast-forward run holds one event at the run's end. An
arrival routed to it cuts the run at the first step boundary the arrival can
influence (the in-flight step completes); steps already past are committed. An
arrival that queues behind a request the run's admission refused changes nothing
before the run ends but the steps' waiting count: the engine absorbs it
(``absorbs_arrival``) and the run goes on.
"""

from __future__ import annotations

import inspect
import itertools
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from heapq import heappush
from typing import Any, TypeAlias

import numpy as np
import simpy

from .autoscale import PRIORITY_SLOTS, Autoscaler
from .engines.sglang import SglangEngine
from .engines.vllm import VllmEngine
from .errors import ScenarioError
from .request import Request
from .router import Router
from .workload import ClosedLoop, Trace

# A worker runs either engine through the same calls (schedule / commit / cut_run ...).
# The union is spelled out so that the compiled build (sim/_native.py) dispatches on it.
Engine: TypeAlias = VllmEngine | SglangEngine
Plan: TypeAlias = Any  # the engine's own plan (StepPlan | SglangPlan), handed back to it

ARRIVAL_PRIORITY = 1.0


class Counter:
    """Python-level events handled, for the benchmark."""

    def __init__(self) -> None:
        self.events = 0


class _Fire(simpy.Event):
    """An already-triggered event carrying a value, for ``_at``."""

    def __init__(self, env: simpy.Environment, callback: Callable[[simpy.Event], None],
                 value: object) -> None:
        self.env = env
        self.callbacks = [callback]
        self._value = value
        self._ok = True


def _at(env: simpy.Environment, time_s: float, priority: float,
        callback: Callable[[simpy.Event], None], value: object = None) -> None:
    queue: list[tuple[float, float, int, simpy.Event]] = env._queue  # type: ignore[assignment]
    heappush(queue, (time_s, priority, next(env._eid), _Fire(env, callback, value)))


def _alone_at(env: simpy.Environment, now: float) -> bool:
    """True if no other event is due at ``now`` (nothing can join this instant)."""
    queue: list[tuple[float, float, int, simpy.Event]] = env._queue  # type: ignore[assignment]
    return not queue or queue[0][0] > now


class Worker:
    def __init__(self, cluster: Cluster, worker_id: int, engine: Engine,
                 slots: int | None = None) -> None:
        """``slots``: worker ids that may ever exist (orders simultaneous events)."""
        self.cluster = cluster
        self.env = cluster.env
        self.worker_id = worker_id
        self.engine = engine
        n = (cluster.num_workers if slots is None else slots) + 1
        self._end_priority = worker_id / n
        self._schedule_priority = 2.0 + worker_id / n
        self.plan: Plan | None = None
        self._gen = 0
        self._schedule_armed = False
        # the API server in front of the engine takes requests in one at a time, each
        # taking frontend_s before the engine sees it (TimingProfile.frontend_s; 0: none)
        profile = getattr(engine.timing, "profile", None)
        self.frontend_s = float(getattr(profile, "frontend_s", 0.0))
        self._frontend_free = 0.0  # when the API server is next free

    # -------------------------------------------------------------- intake
    def submit(self, req: Request, now: float) -> None:
        req.worker_id = self.worker_id
        if self.frontend_s > 0.0:
            at = max(now, self._frontend_free) + self.frontend_s
            self._frontend_free = at
            _at(self.env, at, ARRIVAL_PRIORITY, self._on_frontend, req)
            return
        self._admit(req, now)

    def _on_frontend(self, ev: simpy.Event) -> None:
        self.cluster.counter.events += 1
        req = ev.value
        assert isinstance(req, Request)
        self._admit(req, self.env.now)

    def _admit(self, req: Request, now: float) -> None:
        if not self.engine.add_request(req):
            self.cluster.on_done(req, now)
            return
        plan = self.plan
        if plan is None:
            self._want_schedule(now)
            return
        if plan.num_steps > 1 and not self.engine.absorbs_arrival(plan, now):
            self._cut_run(plan, now)

    def _cut_run(self, plan: Plan, now: float) -> None:
        """A request arrived during a run: end the run after the in-flight step."""
        last = plan.num_steps - 1
        c = int(np.searchsorted(plan.ends[:last], now, side="right"))  # steps ended by now
        if c > 0 and plan.ends[c - 1] == now:
            # step c has not been decided yet in step-by-step terms: stop here
            self.engine.truncate(plan, c)
            self._gen += 1
            self.plan = None
            done = self.engine.commit(plan, c)
            assert not done, "a decode run completes requests only in its last step"
            self._want_schedule(now)
            return
        if c >= last:
            return  # the in-flight step is the last one anyway
        # the steps before the cut are committed with the rest when the run ends
        self.engine.truncate(plan, c + 1)
        self._arm_end(plan)

    def sync(self, now: float) -> None:
        """Commit the run's steps that ended by ``now`` (never the last one: its
        own event commits it, with any completions)."""
        plan = self.plan
        if plan is None or plan.num_steps <= 1:
            return
        last = plan.num_steps - 1
        m = int(np.searchsorted(plan.ends[:last], now, side="right"))
        if m > plan.committed:
            done = self.engine.commit(plan, m)
            assert not done, "a decode run completes requests only in its last step"
        if m > 0 and plan.ends[m - 1] < now:
            # step m started before now (one that starts at now is decided after
            # this instant's arrivals, in step-by-step mode too)
            self.engine.start_step(plan, m)

    def sync_kv(self, now: float) -> None:
        """Only the KV pool up to ``now``: a run's steps that started by ``now`` take
        their blocks (evicting what they evict); tokens are committed later. Enough for
        a router that reads prefix caches only, and far cheaper than ``sync``."""
        plan = self.plan
        if plan is None or plan.num_steps <= 1:
            return
        ev = getattr(plan, "ev_steps", None)  # the run's steps that take a block, in order
        if ev is None:  # an engine without a KV-only sync (SGLang): the whole state
            self.sync(now)
            return
        if not ev:
            return
        i = bisect_left(ev, plan.handed)  # the next one: has it started? (most often not)
        if i == len(ev) or ev[i] >= plan.num_steps or plan.ends[ev[i] - 1] >= now:
            return
        last = plan.num_steps - 1
        m = int(np.searchsorted(plan.ends[:last], now, side="right"))
        if m > 0 and plan.ends[m - 1] < now:
            self.engine.start_step(plan, m)
        elif m > 0:
            self.engine.start_step(plan, m - 1)

    # -------------------------------------------------------------- events
    def _want_schedule(self, now: float) -> None:
        if not self._schedule_armed:
            self._schedule_armed = True
            _at(self.env, now, self._schedule_priority, self._on_schedule)

    def _on_schedule(self, _ev: simpy.Event) -> None:
        self.cluster.counter.events += 1
        self._schedule_armed = False
        now = self.env.now
        plan = self.engine.schedule(now)
        for req in self.engine.take_rejected():
            self.cluster.on_done(req, now)
        if plan is None:
            if self.engine.has_work:
                self._want_schedule(now)  # everything running was preempted
            return
        self.plan = plan
        self._arm_end(plan)

    def _arm_end(self, plan: Plan) -> None:
        self._gen += 1
        _at(self.env, plan.end_s, self._end_priority, self._on_end_event, self._gen)

    def _on_end_event(self, ev: simpy.Event) -> None:
        plan = self.plan
        if ev._value != self._gen or plan is None:
            return  # a run end that a cut moved earlier
        self.cluster.counter.events += 1
        now = self.env.now
        done = self.engine.commit(plan, plan.num_steps)
        self.plan = None
        for req in done:
            self.cluster.on_done(req, now)
        if self.engine.has_work and not self._schedule_armed:
            if _alone_at(self.env, now):
                # nothing else happens at this instant: decide now, without a
                # second event (the same decision the deferred one would make)
                self._on_schedule(ev)
            else:
                self._want_schedule(now)


@dataclass
class SimOutcome:
    requests: list[Request]
    engines: list[Engine]
    num_events: int


class Cluster:
    def __init__(self, engines: Sequence[Engine], router: Router, trace: Trace,
                 dense_hash_ids: np.ndarray, closed_loop: ClosedLoop | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 autoscaler: Autoscaler | None = None) -> None:
        """``dense_hash_ids``: the trace's hash ids renumbered densely (kv.dense_hash_ids).
        ``progress(done, total)`` is called each time another percent of the requests
        has finished (the caller decides how to show it; the simulation keeps no clock)."""
        self.env = simpy.Environment()
        self.num_workers = len(engines)
        slots = PRIORITY_SLOTS if autoscaler is not None else None
        self.workers = [Worker(self, i, e, slots) for i, e in enumerate(engines)]
        self.engines = list(engines)
        self.router = router
        self.autoscaler = autoscaler
        self._parked: list[Request] = []  # arrivals while no worker is ready (planner)
        if autoscaler is not None:
            if "candidates" not in inspect.signature(router.choose).parameters:
                raise ScenarioError("cluster.router", f"router {type(router).__name__} cannot "
                                    "choose among a changing set of workers",
                                    "add a `candidates` parameter to its choose() (see "
                                    "sim/router.py) or run without a planner")
            autoscaler.attach(self)
        self.trace = trace
        self._dense = dense_hash_ids
        self.closed_loop = closed_loop
        self.counter = Counter()
        self.requests: list[Request] = []
        self._next_index = 0
        n = len(trace)
        if closed_loop is not None and closed_loop.num_requests is not None:
            n = min(n, closed_loop.num_requests)
        self._num_total = n
        self._ids = itertools.count()
        self._progress = progress
        self._num_done = 0
        self._next_report = 0

    # ------------------------------------------------------------- arrivals
    def _make(self, i: int, arrival_s: float) -> Request:
        tr = self.trace
        off = tr.hash_offsets
        req = Request(i, arrival_s, int(tr.input_tokens[i]), int(tr.output_tokens[i]),
                      self._dense[off[i]:off[i + 1]])
        sid = int(tr.session_ids[i])
        if sid >= 0:
            req.session_id = sid
        self.requests.append(req)
        return req

    def _route(self, req: Request, now: float, parked: bool = False) -> None:
        workers = self.workers
        kv_only = getattr(self.router, "reads_kv_only", False)
        scaler = self.autoscaler
        if scaler is not None:
            if not parked:  # a parked request was counted when it arrived
                scaler.on_arrival(req)
            cands = scaler.candidates
            if not cands:
                self._parked.append(req)
                return
            if self.router.state_dependent:
                for i in cands:
                    if kv_only:
                        workers[i].sync_kv(now)
                    else:
                        workers[i].sync(now)
            chosen = self.router.choose(req, self.engines, candidates=cands)
            workers[chosen].submit(req, now)
            return
        if self.router.state_dependent:
            for w in workers:
                if kv_only:
                    w.sync_kv(now)
                else:
                    w.sync(now)
        workers[self.router.choose(req, self.engines)].submit(req, now)

    def unpark(self, now: float) -> None:
        """A worker became ready: route the requests that arrived while none was."""
        parked, self._parked = self._parked, []
        for req in parked:
            self._route(req, now, parked=True)

    @property
    def num_unfinished(self) -> int:
        return self._num_total - self._num_done

    def _open_loop(self, _ev: simpy.Event) -> None:
        self.counter.events += 1
        now = self.env.now
        arrivals = self.trace.arrival_s
        i = self._next_index
        while i < self._num_total and arrivals[i] == now:
            self._route(self._make(i, now), now)
            i += 1
        self._next_index = i
        if i < self._num_total:
            _at(self.env, float(arrivals[i]), ARRIVAL_PRIORITY, self._open_loop)

    def _release(self, now: float) -> None:
        """Closed loop: the next request of the trace arrives now."""
        i = self._next_index
        if i < self._num_total:
            self._next_index = i + 1
            self._route(self._make(i, now), now)

    def on_done(self, req: Request, now: float) -> None:
        """A request finished or was refused; a closed loop replaces it at once."""
        done_hook = getattr(self.router, "on_done", None)  # optional router hook
        if done_hook is not None:
            done_hook(req, now)
        if self.autoscaler is not None:
            self.autoscaler.on_done(req, now)
        self._num_done += 1
        if self._progress is not None and (self._num_done >= self._next_report
                                           or self._num_done == self._num_total):
            self._progress(self._num_done, self._num_total)
            self._next_report = self._num_done + max(1, self._num_total // 100)
        if self.closed_loop is not None:
            self._release(now)

    # ------------------------------------------------------------------ run
    def run(self) -> SimOutcome:
        if self._num_total:
            if self.closed_loop is None:
                _at(self.env, float(self.trace.arrival_s[0]), ARRIVAL_PRIORITY, self._open_loop)
            else:
                first = min(self.closed_loop.concurrency, self._num_total)

                def start(_ev: simpy.Event) -> None:
                    for _ in range(first):
                        self._release(0.0)

                _at(self.env, 0.0, ARRIVAL_PRIORITY, start)
            if self.autoscaler is not None:
                self.autoscaler.start()
        self.env.run()
        self.requests.sort(key=lambda r: r.rid)
        return SimOutcome(self.requests, self.engines, self.counter.events)
