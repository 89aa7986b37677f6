"""A run as a Chrome / Perfetto trace (the Trace Event Format), opened in ui.perfetto.dev.

Tracks (process = pid, thread = tid)::

    pid 0  "cluster"     tid 1 router   tid 2 planner   tid 3 fleet   tid 10+ one per link
    pid w+1 "worker w"   tid 1 steps    tid 2 requests  tid 3 kv      tid 4 lifecycle
                         tid 5 offload

Times are microseconds (``ts``, ``dur``), the format's unit. Steps and request arrivals
come from a finished run (``Timeline.from_outcome``), so a run without a timeline pays
nothing; what only the cluster knows (handoffs, offloads, preemption times, planner
decisions, worker lifecycle) is added with the ``add_*`` methods. ``write`` streams the
events to the file in chunks (never one string for the whole trace); ``.gz`` gzips it.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .cluster import SimOutcome
    from .planner import Decision, Fleet
    from .request import Request
    from .steplog import StepLog

US = 1e6
CLUSTER_PID = 0
ROUTER_TID, PLANNER_TID, FLEET_TID, LINK_TID0 = 1, 2, 3, 10
STEPS_TID, REQUESTS_TID, KV_TID, LIFECYCLE_TID, OFFLOAD_TID = 1, 2, 3, 4, 5
WORKER_THREADS = {STEPS_TID: "steps", REQUESTS_TID: "requests", KV_TID: "kv",
                  LIFECYCLE_TID: "lifecycle", OFFLOAD_TID: "offload"}
CLUSTER_THREADS = {ROUTER_TID: "router", PLANNER_TID: "planner", FLEET_TID: "fleet"}
_CHUNK = 4096  # events per write

Event = dict[str, Any]


def worker_pid(worker_id: int) -> int:
    return worker_id + 1


def _clean(args: Mapping[str, Any]) -> dict[str, Any]:
    """JSON has no NaN or inf: write them as null. Numpy scalars become Python ones."""
    out: dict[str, Any] = {}
    for k, v in args.items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


def _instant(name: str, pid: int, tid: int, time_s: float, args: Mapping[str, Any]) -> Event:
    return {"name": name, "ph": "i", "s": "t", "pid": pid, "tid": tid, "ts": time_s * US,
            "args": _clean(args)}


def _span(name: str, pid: int, tid: int, start_s: float, end_s: float,
          args: Mapping[str, Any]) -> Event:
    ts = start_s * US
    return {"name": name, "ph": "X", "pid": pid, "tid": tid, "ts": ts,
            "dur": max(end_s * US - ts, 0.0), "args": _clean(args)}


@dataclass
class _Steps:
    worker_id: int
    steps: StepLog


class Timeline:
    def __init__(self, max_steps_per_worker: int | None = None) -> None:
        """``max_steps_per_worker``: above this many steps, a worker's consecutive decode
        steps of identical composition are written as one X event with ``args.steps = k``
        (steps of differing composition are never merged, so the cap is a trigger, not a
        bound on the event count)."""
        self.max_steps_per_worker = max_steps_per_worker
        self._events: list[Event] = []
        self._steps: list[_Steps] = []
        self._requests: list[Request] = []
        self._worker_ids: set[int] = set()
        self._links: dict[str, int] = {}

    # ------------------------------------------------------------ from a run
    @classmethod
    def from_outcome(cls, outcome: SimOutcome, max_steps_per_worker: int | None = None,
                     worker_ids: list[int] | None = None) -> Timeline:
        """``worker_ids[i]``: the id of ``outcome.engines[i]`` (default: i)."""
        tl = cls(max_steps_per_worker)
        ids = worker_ids if worker_ids is not None else list(range(len(outcome.engines)))
        for wid, engine in zip(ids, outcome.engines, strict=True):
            tl.add_steps(wid, engine.steps)
        tl._requests.extend(outcome.requests)
        for req in outcome.requests:
            if req.worker_id >= 0:
                tl._worker_ids.add(req.worker_id)
        return tl

    def add_steps(self, worker_id: int, steps: StepLog) -> None:
        self._worker_ids.add(worker_id)
        self._steps.append(_Steps(worker_id, steps))

    # ------------------------------------------------- what the cluster knows
    def _add(self, event: Event) -> None:
        self._events.append(event)

    def add_preemption(self, worker_id: int, time_s: float, request_id: int,
                       kind: str = "preempt", **args: Any) -> None:
        """A preemption (vLLM, recompute) or a retraction (SGLang) of one request."""
        self._worker_ids.add(worker_id)
        self._add(_instant(kind, worker_pid(worker_id), REQUESTS_TID, time_s,
                           {"request_id": request_id, **args}))

    def _link_tid(self, link: str) -> int:
        if link not in self._links:
            self._links[link] = LINK_TID0 + len(self._links)
        return self._links[link]

    def add_handoff(self, src_worker_id: int, dst_worker_id: int, start_s: float,
                    end_s: float, request_id: int, link: str | None = None,
                    **args: Any) -> None:
        """A KV transfer, drawn on its link's track in the cluster process."""
        name = link or f"link w{src_worker_id}->w{dst_worker_id}"
        self._add(_span("kv handoff", CLUSTER_PID, self._link_tid(name), start_s, end_s,
                        {"request_id": request_id, "src_worker_id": src_worker_id,
                         "dst_worker_id": dst_worker_id, **args}))

    def add_offload(self, worker_id: int, start_s: float, end_s: float, tier: str,
                    **args: Any) -> None:
        self._worker_ids.add(worker_id)
        self._add(_span(f"offload {tier}", worker_pid(worker_id), OFFLOAD_TID, start_s, end_s,
                        {"tier": tier, **args}))

    def add_worker_event(self, worker_id: int, time_s: float, name: str,
                         **args: Any) -> None:
        self._worker_ids.add(worker_id)
        self._add(_instant(name, worker_pid(worker_id), LIFECYCLE_TID, time_s, args))

    def add_decision(self, decision: Decision, **args: Any) -> None:
        self._add(_instant("planner decision", CLUSTER_PID, PLANNER_TID, decision.time_s,
                           {"num_workers": decision.num_workers, "reason": decision.reason,
                            **decision.inputs, **args}))

    def add_fleet(self, fleet: Fleet, until_s: float) -> None:
        """Each worker's start / ready / drain / stop instants, X spans over its starting
        and draining phases, and a counter of workers per state on the fleet track."""
        from .planner import WorkerState

        for w in fleet.workers.values():
            pid, wid = worker_pid(w.worker_id), w.worker_id
            self._worker_ids.add(wid)
            ready_end = w.ready_s if math.isfinite(w.ready_s) else (
                w.stop_s if math.isfinite(w.stop_s) else until_s)
            self._add(_span("starting", pid, LIFECYCLE_TID, w.start_s, ready_end,
                            {"gpus": w.gpus}))
            if math.isfinite(w.drain_s):
                stop = w.stop_s if w.state is WorkerState.STOPPED else until_s
                self._add(_span("draining", pid, LIFECYCLE_TID, w.drain_s, stop, {}))
        counts = dict.fromkeys(("starting", "ready", "draining"), 0)
        after = {"start": "starting", "ready": "ready", "drain": "draining", "stop": None}
        state: dict[int, str | None] = {}
        for ev in fleet.events:
            self._add(_instant(ev.kind, worker_pid(ev.worker_id), LIFECYCLE_TID, ev.time_s,
                               {"reason": ev.reason}))
            old = state.get(ev.worker_id)
            if old is not None:
                counts[old] -= 1
            new = after[ev.kind]
            if new is not None:
                counts[new] += 1
            state[ev.worker_id] = new
            self._add({"name": "workers", "ph": "C", "pid": CLUSTER_PID, "tid": FLEET_TID,
                       "ts": ev.time_s * US, "args": dict(counts)})

    # ---------------------------------------------------------------- events
    def _metadata(self) -> Iterator[Event]:
        def meta(kind: str, pid: int, tid: int, name: str) -> Event:
            return {"name": kind, "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}}

        yield meta("process_name", CLUSTER_PID, 0, "cluster")
        for tid, name in CLUSTER_THREADS.items():
            yield meta("thread_name", CLUSTER_PID, tid, name)
        for name, tid in self._links.items():
            yield meta("thread_name", CLUSTER_PID, tid, name)
        for wid in sorted(self._worker_ids):
            yield meta("process_name", worker_pid(wid), 0, f"worker {wid}")
            yield {"name": "process_sort_index", "ph": "M", "pid": worker_pid(wid), "tid": 0,
                   "args": {"sort_index": worker_pid(wid)}}
            for tid, name in WORKER_THREADS.items():
                yield meta("thread_name", worker_pid(wid), tid, name)

    def _request_events(self) -> Iterator[Event]:
        for r in self._requests:
            if r.worker_id >= 0:
                pid, tid = worker_pid(r.worker_id), REQUESTS_TID
            else:
                pid, tid = CLUSTER_PID, ROUTER_TID
            yield _instant("arrival", pid, tid, r.arrival_s,
                           {"request_id": r.rid, "num_prompt_tokens": r.prompt_tokens,
                            "max_output_tokens": r.max_output_tokens,
                            "num_preemptions": r.num_preemptions,
                            "reject_reason": r.reject_reason or None})
            if math.isfinite(r.finish_s):
                yield _instant("rejected" if r.reject_reason else "finish", pid, tid,
                               r.finish_s, {"request_id": r.rid, "num_output_tokens":
                                            r.num_output})

    def _step_events(self, src: _Steps) -> Iterator[str]:
        """A worker's forward passes ("X", identical decode steps merged when it has
        more than ``max_steps_per_worker``) and a KV counter ("C") where it changes, as
        JSON text: hundreds of thousands of fixed-shape events, rendered here the way
        the encoder would (key order, float repr) at a fraction of its cost."""
        log = src.steps
        n = log.num_steps
        if n == 0:
            return
        c = log.columns()
        start, end = c["start_s"], c["end_s"]
        p, d, run, wait = (c["num_prefill_tokens"], c["num_decode_seqs"], c["num_running"],
                           c["num_waiting"])
        kv = c["kv_used_blocks"]
        cap = self.max_steps_per_worker
        if cap is not None and n > cap:
            same = ((p[1:] == 0) & (p[:-1] == 0) & (d[1:] == d[:-1]) & (run[1:] == run[:-1])
                    & (wait[1:] == wait[:-1]) & (start[1:] == end[:-1]))
            firsts = np.flatnonzero(np.concatenate(([True], ~same)))
        else:
            firsts = np.arange(n)
        lasts = np.append(firsts[1:] - 1, n - 1)
        ts_a = start[firsts] * US  # float64 products: the bits float(x) * US gives
        dur_a = end[lasts] * US - ts_a
        if not (np.isfinite(ts_a).all() and np.isfinite(dur_a).all()):
            raise ValueError("a step with a non-finite time")  # allow_nan=False's check
        pid = worker_pid(src.worker_id)
        head = f'"ph":"X","pid":{pid},"tid":{STEPS_TID},"ts":'
        kv_head = f'{{"name":"kv","ph":"C","pid":{pid},"tid":{KV_TID},"ts":'
        prev_counter: tuple[int, int, int] | None = None
        for a, b, ts, dur, np_, nd, r_a, w_a, k_a, k_b in zip(
                firsts.tolist(), lasts.tolist(), ts_a.tolist(), dur_a.tolist(),
                p[firsts].tolist(), d[firsts].tolist(), run[firsts].tolist(),
                wait[firsts].tolist(), kv[firsts].tolist(), kv[lasts].tolist(), strict=True):
            name = "prefill+decode" if np_ and nd else ("prefill" if np_ else "decode")
            merged = (f',"steps":{b - a + 1},"merged":"identical decode steps",'
                      f'"kv_used_blocks_last":{k_b}' if b > a else "")
            yield (f'{{"name":"{name}",{head}{ts!r},"dur":{dur!r},"args":{{"step":{a},'
                   f'"num_prefill_tokens":{np_},"num_decode_seqs":{nd},"num_running":{r_a},'
                   f'"num_waiting":{w_a},"kv_used_blocks":{k_a}{merged}}}}}')
            counter = (k_a, r_a, w_a)
            if counter != prev_counter:
                prev_counter = counter
                yield (f'{kv_head}{ts!r},"args":{{"kv_used_blocks":{k_a},'
                       f'"num_running":{r_a},"num_waiting":{w_a}}}}}')

    def events(self) -> Iterator[Event | str]:
        """Every event, metadata first; steps are generated lazily, worker by worker,
        already as JSON text (``str``); the others as dicts."""
        yield from self._metadata()
        yield from self._events
        yield from self._request_events()
        for src in self._steps:
            yield from self._step_events(src)

    # ----------------------------------------------------------------- write
    def write(self, path: str | Path) -> int:
        """Write the trace JSON (gzip if the name ends in .gz); returns the event count."""
        p = Path(path)
        if p.suffix == ".gz":
            # level 3: a 45 MB trace in 0.3 s and 6.1 MB; gzip's default 9 took 2.1 s for
            # 5.0 MB (half of a planner scenario's whole run)
            with gzip.open(p, "wt", encoding="utf-8", compresslevel=3) as f:
                return _write_stream(f, self.events())
        with open(p, "w", encoding="utf-8") as f:
            return _write_stream(f, self.events())


def _write_stream(f: IO[str], events: Iterator[Event | str]) -> int:
    enc = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode

    def dumps(ev: Event | str) -> str:
        return ev if isinstance(ev, str) else enc(ev)

    f.write('{"displayTimeUnit":"ms","traceEvents":[\n')
    count = 0
    chunk: list[str] = []
    for ev in events:
        chunk.append(dumps(ev))
        count += 1
        if len(chunk) >= _CHUNK:
            f.write(("," if count > len(chunk) else "") + ",\n".join(chunk))
            chunk = []
    if chunk:
        f.write(("," if count > len(chunk) else "") + ",\n".join(chunk))
    f.write("\n]}\n")
    return count
