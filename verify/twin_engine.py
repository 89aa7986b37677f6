"""The twin server's engine: sim's vLLM engine run in wall-clock time, its streams,
prefix-block ids, timing and fault selection. The HTTP side is verify/twin_server.py,
whose docstring describes the behaviour of both."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
import traceback
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from hashlib import blake2b
from itertools import islice

import numpy as np

from sim.engines.vllm import StepPlan, VllmConfig, VllmEngine
from sim.request import Request
from sim.steplog import StepLog
from sim.timing import TimingModel

NOTE = "a test instrument, not evidence of fidelity"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
STEPLOG_RESET_STEPS = 100_000  # the server never reads the step log; keep it bounded
BROKEN_EVENT = b'data: {"id":"broken","choices":[{"index":0,"te\n\n'  # --fault-malformed-sse


class FixedTiming:
    """Step time = ``step_s`` + ``per_token_s`` x tokens in the step (for load tests)."""

    def __init__(self, step_s: float, per_token_s: float = 0.0) -> None:
        if not (step_s >= 0 and per_token_s >= 0 and step_s + per_token_s > 0):
            raise ValueError(f"step {step_s} s, per token {per_token_s} s: need >= 0, not both 0")
        self.step_s = step_s
        self.per_token_s = per_token_s

    def step_time(self, num_prefill_tokens: int, prefill_attn_work: float,
                  num_prefill_seqs: int, num_decode_seqs: int,
                  decode_context_tokens: int) -> float:
        return self.step_s + self.per_token_s * (num_prefill_tokens + num_decode_seqs)

    def decode_run_times(self, num_decode_seqs: int, decode_context_tokens0: int,
                         num_steps: int) -> np.ndarray:
        return np.full(num_steps, self.step_s + self.per_token_s * (0 + num_decode_seqs))


def is_faulty(key: int, fraction: float) -> bool:
    return math.floor((key + 1) * fraction) > math.floor(key * fraction)


@dataclass(frozen=True)
class Faults:
    reset_after_events: int | None = None  # abort the TCP connection after N events
    stall_after_events: int | None = None  # stop sending after N events, keep it open
    malformed_sse: bool = False  # a broken SSE line after the first event
    status: int | None = None  # answer this HTTP status instead
    wrong_usage: bool = False  # usage.completion_tokens one less than streamed
    fraction: float = 0.5
    never_healthy: bool = False  # /health always 503

    @property
    def any_stream_fault(self) -> bool:
        return (self.reset_after_events is not None or self.stall_after_events is not None
                or self.malformed_sse or self.wrong_usage)


@dataclass(frozen=True)
class TwinConfig:
    engine: VllmConfig
    timing: TimingModel
    timing_note: str
    model_name: str = "servetwin-twin"
    time_scale: float = 1.0  # wall seconds per simulated second
    tick_s: float = 0.001  # steps ending within one tick are released together
    max_hash_ids: int = 1 << 18
    faults: Faults = field(default_factory=Faults)


class _Hist:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, x: float) -> None:
        self.counts[bisect_left(self.bounds, x)] += 1
        self.sum += x

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for b, c in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += c
            out.append(("+Inf" if b == math.inf else repr(b), total))
        return out


class Stream:
    """One request's way out: the engine task appends SSE bytes, the handler writes them."""

    __slots__ = ("abort", "buf", "closed", "detached", "ev_last", "ev_token", "include_usage",
                 "limit", "malformed", "produced", "req", "sent", "stall", "waiter",
                 "wrong_usage")

    def __init__(self, req: Request, ev_token: bytes, ev_last: bytes, include_usage: bool
                 ) -> None:
        self.req = req
        self.ev_token = ev_token
        self.ev_last = ev_last
        self.include_usage = include_usage
        self.produced = 0  # tokens the engine has produced for it
        self.sent = 0  # token events queued for the client
        self.buf: list[bytes] = []
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False  # everything there is to send is in buf
        self.detached = False  # the client is gone
        self.limit: int | None = None  # fault: events before a reset or stall
        self.stall = False
        self.abort = False
        self.malformed = False
        self.wrong_usage = False

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


class Twin:
    """The engine task and the state /metrics reports."""

    def __init__(self, cfg: TwinConfig) -> None:
        self.cfg = cfg
        bs = cfg.engine.block_size
        self.engine = VllmEngine(cfg.engine, cfg.timing, bs, cfg.max_hash_ids,
                                 fast_forward=True)
        self.block_size = bs
        self.scale = cfg.time_scale
        self.t0 = time.perf_counter()
        self.clock = 0.0  # simulated time the engine has reached
        self.plan: StepPlan | None = None
        self.pending: deque[Stream] = deque()  # arrived, not yet given to the engine
        self.streams: dict[int, Stream] = {}
        self._dirty: list[Stream] = []
        self._wake = asyncio.Event()
        self._hash_table: dict[bytes, int] = {}  # block key -> id, least recently used first
        self._free_ids: list[int] = []
        self._next_id = 0
        self.error: str | None = None  # the engine task's crash, if it crashed
        self.num_arrivals = 0
        self.num_hash_ids_exhausted = 0
        self.num_disconnected = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_success = 0
        self.ttft = _Hist(TTFT_BUCKETS)
        self.e2e = _Hist(E2E_BUCKETS)

    def vnow(self) -> float:
        return (time.perf_counter() - self.t0) / self.scale

    # ---------------------------------------------------------------- intake
    def dense_ids(self, tokens: array) -> np.ndarray:
        """Dense ids of the prompt's full blocks, chained: block j's id names blocks 0..j."""
        if not self.engine.pool.enable_caching:
            return np.empty(0, dtype=np.int64)
        step = tokens.itemsize * self.block_size
        raw = tokens.tobytes()
        table = self._hash_table
        ids: list[int] = []
        key = b""
        for j in range(len(tokens) // self.block_size):
            key = blake2b(key + raw[j * step:(j + 1) * step], digest_size=16).digest()
            d = table.pop(key, None)
            if d is None:
                d = self._new_id()
                if d < 0:
                    self.num_hash_ids_exhausted += 1
                    break
            table[key] = d  # (re)inserted last: the most recently used
            ids.append(d)
        return np.asarray(ids, dtype=np.int64)

    def _new_id(self) -> int:
        if self._free_ids:
            return self._free_ids.pop()
        cap = self.cfg.max_hash_ids
        if self._next_id < cap:
            self._next_id += 1
            return self._next_id - 1
        # reuse the least recently used ids whose blocks the pool no longer caches
        pool = self.engine.pool
        slots = pool.slots_per_hash
        table = self._hash_table
        for key in list(islice(table, max(1, cap // 8))):
            d = table[key]
            if all(pool.cached_block(d * slots + s) < 0 for s in range(slots)):
                del table[key]
                self._free_ids.append(d)
        return self._free_ids.pop() if self._free_ids else -1

    def submit(self, stream: Stream) -> None:
        if self.error:
            self._fail(stream, self.error, 500)
            self._flush()
            return
        stream.req.arrival_s = self.vnow()
        self.streams[stream.req.rid] = stream
        self.pending.append(stream)
        if self.plan is None:
            self._wake.set()

    # ------------------------------------------------------------ engine task
    async def run(self) -> None:
        try:
            await self._run()
        except Exception as e:  # a bug in the twin: say so everywhere, never hang streams
            self.error = f"engine task crashed: {type(e).__name__}: {e}"
            traceback.print_exc(file=sys.stderr)
            for s in list(self.streams.values()):
                self._fail(s, self.error)
            self._flush()

    async def _run(self) -> None:
        pc = time.perf_counter
        while True:
            start = pc()
            self._advance((start - self.t0) / self.scale)
            self._flush()
            plan = self.plan
            if plan is None:
                if self.engine.has_work:  # nothing could be scheduled: try again later
                    await asyncio.sleep(self.cfg.tick_s)
                    continue
                self._wake.clear()
                if not self.pending:
                    await self._wake.wait()
                continue
            nxt = float(plan.ends[plan.committed]) if plan.num_steps > 1 else plan.end_s
            now = pc()
            delay = max(self.t0 + nxt * self.scale - now, start + self.cfg.tick_s - now)
            await asyncio.sleep(delay if delay > 0 else 0)

    def _advance(self, v: float) -> None:
        """Bring the engine to simulated time ``v``: commit steps that ended, admit
        arrivals at step boundaries, schedule the next step."""
        eng = self.engine
        pending = self.pending
        idle_tries = 0
        while True:
            plan = self.plan
            if plan is not None:
                if plan.num_steps > 1 and pending:
                    self._cut(plan, pending[0].req.arrival_s)
                if plan.end_s > v:
                    if plan.num_steps > 1:
                        m = int(np.searchsorted(plan.ends[:plan.num_steps - 1], v, "right"))
                        if m > plan.committed:
                            eng.commit(plan, m)
                            self._emit_running()
                    return
                done = eng.commit(plan, plan.num_steps)
                self._emit_running()
                self._emit(done)
                for req in done:
                    self._finished(req)
                self.plan = None
                self.clock = plan.end_s
                if eng.steps.num_steps > STEPLOG_RESET_STEPS:
                    eng.steps = StepLog()  # only token_steps index it; the twin never reads them
            elif not eng.has_work:
                if not pending:
                    return
                self.clock = max(self.clock, pending[0].req.arrival_s)
            t = self.clock
            while pending and pending[0].req.arrival_s <= t:
                s = pending.popleft()
                if not eng.add_request(s.req):
                    self._reject(s.req)
            plan = eng.schedule(t)
            for req in eng.take_rejected():
                self._reject(req)
            if plan is None:
                idle_tries += 1
                if idle_tries > 3 and eng.has_work:
                    return  # cannot happen with vLLM's rules; never spin the server
                continue
            idle_tries = 0
            self.plan = plan

    def _cut(self, plan: StepPlan, arrival_s: float) -> None:
        """A request arrived during a decode run: end the run after the step in flight
        (sim.cluster.Worker._cut_run)."""
        last = plan.num_steps - 1
        c = int(np.searchsorted(plan.ends[:last], arrival_s, "right"))
        if c >= last:
            return
        if c > 0 and plan.ends[c - 1] == arrival_s:
            self.engine.truncate(plan, c)
        else:
            self.engine.truncate(plan, c + 1)

    def _emit_running(self) -> None:
        """Stream what the running requests produced (the decode cohort's counters
        are brought up to date first)."""
        self.engine.sync_requests()
        self._emit(self.engine.running)

    def _emit(self, reqs: Iterable[Request]) -> None:
        streams = self.streams
        dirty = self._dirty
        for req in reqs:
            s = streams.get(req.rid)
            if s is None:
                continue
            new = req.num_output - s.produced
            if new <= 0:
                continue
            if s.produced == 0:
                self.ttft.observe((req.first_token_s - req.arrival_s) * self.scale)
                self.num_prompt_tokens += req.prompt_tokens
            s.produced = req.num_output
            self.num_generation_tokens += new
            if s.detached or s.closed:
                continue
            self._queue_tokens(s, new, req.num_output >= req.max_output_tokens)
            dirty.append(s)

    def _queue_tokens(self, s: Stream, new: int, last: bool) -> None:
        if s.limit is not None:
            new = min(new, s.limit - s.sent)
            if s.sent + new >= s.limit:
                s.closed = True
                s.abort = not s.stall
                last = False
        if new > 0:
            first = s.ev_last if new == 1 and last else s.ev_token
            body = s.ev_token * (new - 1) + (s.ev_last if last else s.ev_token)
            if s.malformed and s.sent == 0:
                body = body[:len(first)] + BROKEN_EVENT + body[len(first):]
            s.buf.append(body)
            s.sent += new
        if last:
            req = s.req
            if s.include_usage:
                cached = max(req.num_cached_tokens, 0)
                n = req.max_output_tokens - s.wrong_usage
                usage = (f'{{"prompt_tokens":{req.prompt_tokens},"total_tokens":'
                         f'{req.prompt_tokens + n},"completion_tokens":{n},'
                         f'"prompt_tokens_details":{{"cached_tokens":{cached}}}}}')
                head = s.ev_token.split(b',"choices":', 1)[0]
                s.buf.append(head + b',"choices":[],"usage":' + usage.encode() + b"}\n\n")
            s.buf.append(b"data: [DONE]\n\n")
            s.closed = True

    def _finished(self, req: Request) -> None:
        self.streams.pop(req.rid, None)
        self.num_success += 1
        self.e2e.observe((req.finish_s - req.arrival_s) * self.scale)

    def _reject(self, req: Request) -> None:
        s = self.streams.get(req.rid)
        if s is not None:
            self._fail(s, req.reject_reason)

    def _fail(self, s: Stream, message: str, code: int = 400) -> None:
        self.streams.pop(s.req.rid, None)
        s.req.reject_reason = s.req.reject_reason or message
        msg = json.dumps({"error": {"message": message, "type": "BadRequestError"
                                    if code == 400 else "InternalServerError", "code": code}})
        s.buf.append(f"data: {msg}\n\ndata: [DONE]\n\n".encode())
        s.closed = True
        self._dirty.append(s)

    def _flush(self) -> None:
        for s in self._dirty:
            s.wake()
        self._dirty.clear()

    def detach(self, s: Stream) -> None:
        if not s.detached:
            s.detached = True
            self.num_disconnected += 1
            s.buf.clear()
