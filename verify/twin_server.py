"""The twin server: an OpenAI-compatible streaming endpoint timed by the simulator.

A test and demo instrument, never evidence of fidelity (DESIGN §4): it lets the load
generator, routers and the verify pipeline run for real, over HTTP, without a GPU.

    POST /v1/completions   token-id prompts only; exactly ``max_tokens`` tokens
                           (ignore_eos is implied); SSE chunks as vLLM sends them, a
                           final ``usage`` chunk with stream_options.include_usage,
                           then ``data: [DONE]``
    GET  /health           200 (JSON); 503 with --fault-never-healthy
    GET  /metrics          vLLM-named Prometheus series (vllm:*, labels model_name, engine)
    GET  /v1/models

Timing. One ``sim.engines.vllm.VllmEngine`` runs in wall-clock time: an engine task
takes a step, sleeps until its simulated end (x time_scale), commits it and hands each
stream its new tokens. Simulated time is continuous (a step starts where the previous
one ended, or at the arrival that woke an idle engine), so a late wake-up delays when
tokens are released, never the engine's own clock. Decode runs are fast-forwarded; an
arrival cuts a run after the step in flight, as sim.cluster does. Several steps that end
within one tick (--tick-ms) are released together: a stream gets all its new tokens in
one transport write, each token still its own SSE event.

Prefix cache. Prompt token ids are cut into full blocks of ``block_size`` tokens; a
block's key is a 128-bit BLAKE2 digest of its parent's key and its tokens, so two prompts
share keys exactly as far as they share full blocks (vLLM hashes full blocks the same
way). The engine needs dense ids, so a dict maps keys to ids in [0, max_hash_ids), in
least-recently-used order; when the ids run out, the oldest eighth of the table is
scanned and ids that no cached block holds are reused (a request still waiting with such
an old id could then be mistaken for a newer prefix: only after max_hash_ids * 7/8 other
blocks arrived meanwhile). Blocks that find no id are not cached, counted in /health.

Known departures from vLLM: a client that disconnects does not abort its request (the
sim engine has no abort; the request runs to its end, its tokens dropped); no text
prompts, no sampling, no stop strings.

Faults (opt-in, for tests of clients). A request's fault key is the integer in its
``x-request-id`` header, else its arrival number at the server (0, 1, ...). Key k is
faulty iff floor((k + 1) * fraction) > floor(k * fraction) (``is_faulty``): fraction
0.5 picks the odd keys, 1.0 every key. Faulty requests get every enabled fault.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import sys
import time
import traceback
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from hashlib import blake2b
from itertools import islice
from typing import Any

import numpy as np
from aiohttp import web

from sim.engines.vllm import StepPlan, VllmConfig, VllmEngine, cdiv
from sim.errors import InputError
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
                            self._emit(plan.requests)
                    return
                done = eng.commit(plan, plan.num_steps)
                self._emit(plan.requests or [r for r, _ in plan.scheduled])
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


# ---------------------------------------------------------------------------- HTTP
def _error(status: int, message: str) -> web.Response:
    kind = {400: "BadRequestError", 429: "RateLimitError", 503: "ServiceUnavailableError"}
    body = {"error": {"message": message, "type": kind.get(status, "Error"), "code": status}}
    return web.json_response(body, status=status)


_TRAILING_INT = re.compile(r"(\d+)\s*$")


class TwinApp:
    def __init__(self, cfg: TwinConfig) -> None:
        self.cfg = cfg
        self.twin = Twin(cfg)
        self._model_json = json.dumps(cfg.model_name)
        self._engine_task: asyncio.Task[None] | None = None

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.models)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app: web.Application) -> None:
        self.twin.t0 = time.perf_counter()
        self._engine_task = asyncio.get_running_loop().create_task(self.twin.run())

    async def _stop(self, _app: web.Application) -> None:
        if self._engine_task is not None:
            self._engine_task.cancel()
            await asyncio.gather(self._engine_task, return_exceptions=True)

    # ------------------------------------------------------------- endpoints
    async def health(self, _request: web.Request) -> web.Response:
        t = self.twin
        info = {"status": "ok", "note": NOTE, "model": self.cfg.model_name,
                "timing": self.cfg.timing_note, "time_scale": self.cfg.time_scale,
                "num_requests": t.num_arrivals, "num_disconnected": t.num_disconnected,
                "num_hash_ids_exhausted": t.num_hash_ids_exhausted}
        if t.error:
            return web.json_response({**info, "status": t.error}, status=503)
        if self.cfg.faults.never_healthy:
            return web.json_response({**info, "status": "unhealthy (fault injection)"},
                                     status=503)
        return web.json_response(info)

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.cfg.model_name, "object": "model", "owned_by": "servetwin"}]})

    async def metrics(self, _request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        reg = CollectorRegistry()
        reg.register(_Collector(self))
        return web.Response(body=generate_latest(reg), headers={"Content-Type":
                                                                CONTENT_TYPE_LATEST})

    def _parse(self, body: Any) -> tuple[array, int, bool, bool] | web.Response:
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
            prompt = prompt[0]
        if not isinstance(prompt, list) or not prompt:
            return _error(400, "prompt must be a non-empty list of token ids (the twin server "
                          "takes no text prompts)")
        try:
            tokens = array("q", prompt)
        except (TypeError, OverflowError):
            return _error(400, "prompt must be a list of integer token ids")
        if min(tokens) < 0:
            return _error(400, "token ids must be >= 0")
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return _error(400, f"max_tokens = {max_tokens!r}: must be an integer >= 1")
        eng = self.cfg.engine
        if len(tokens) + max_tokens > eng.max_model_len:
            return _error(400, f"This model's maximum context length is {eng.max_model_len} "
                          f"tokens. However, you requested {len(tokens) + max_tokens} tokens "
                          f"({len(tokens)} in the prompt, {max_tokens} in the completion).")
        if cdiv(len(tokens), eng.block_size) > eng.num_gpu_blocks - 1:
            return _error(400, f"prompt of {len(tokens)} tokens needs more KV blocks than the "
                          f"twin's {eng.num_gpu_blocks - 1}")
        options = body.get("stream_options") or {}
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        return tokens, max_tokens, bool(body.get("stream", False)), include_usage

    def _fault_key(self, request: web.Request, seq: int) -> int:
        rid = request.headers.get("x-request-id")
        m = _TRAILING_INT.search(rid) if rid else None
        return int(m.group(1)) if m else seq

    async def completions(self, request: web.Request) -> web.StreamResponse:
        twin = self.twin
        seq = twin.num_arrivals
        twin.num_arrivals += 1
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "the body is not JSON")
        parsed = self._parse(body)
        if isinstance(parsed, web.Response):
            return parsed
        tokens, max_tokens, streaming, include_usage = parsed
        faults = self.cfg.faults
        faulty = is_faulty(self._fault_key(request, seq), faults.fraction)
        if faulty and faults.status is not None:
            return _error(faults.status, f"fault injection: HTTP {faults.status}")
        req = Request(seq, 0.0, len(tokens), max_tokens, twin.dense_ids(tokens))
        created = int(time.time())
        head = (f'data: {{"id":"cmpl-{seq}","object":"text_completion","created":{created},'
                f'"model":{self._model_json},"choices":[{{"index":0,"text":" t","logprobs":null,'
                f'"finish_reason":')
        s = Stream(req, (head + 'null,"stop_reason":null}]}\n\n').encode(),
                   (head + '"length","stop_reason":null}]}\n\n').encode(), include_usage)
        if faulty and streaming:
            if faults.reset_after_events is not None:
                s.limit = faults.reset_after_events
            if faults.stall_after_events is not None:
                s.limit, s.stall = faults.stall_after_events, True
            s.malformed = faults.malformed_sse
        s.wrong_usage = faulty and faults.wrong_usage
        twin.submit(s)
        if not streaming:
            return await self._whole(s, created)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        loop = asyncio.get_running_loop()
        try:
            await resp.prepare(request)
            while True:
                if not s.buf:
                    if s.closed and not s.stall:
                        break
                    s.waiter = loop.create_future()
                    await s.waiter  # a stalled stream waits here until the client leaves
                data = b"".join(s.buf) if len(s.buf) > 1 else s.buf[0]
                s.buf.clear()
                await resp.write(data)
            if s.abort:
                assert request.transport is not None
                request.transport.abort()
                return resp
            await resp.write_eof()
        except asyncio.CancelledError:  # the client left (handler_cancellation is on)
            twin.detach(s)
            raise
        except ConnectionError:
            twin.detach(s)
        return resp

    async def _whole(self, s: Stream, created: int) -> web.Response:
        loop = asyncio.get_running_loop()
        try:
            while not s.closed:
                s.waiter = loop.create_future()
                await s.waiter
        except asyncio.CancelledError:
            self.twin.detach(s)
            raise
        req = s.req
        if req.reject_reason:
            return _error(400, req.reject_reason)
        n = req.max_output_tokens
        return web.json_response({
            "id": f"cmpl-{req.rid}", "object": "text_completion", "created": created,
            "model": self.cfg.model_name,
            "choices": [{"index": 0, "text": " t" * n, "logprobs": None,
                         "finish_reason": "length", "stop_reason": None}],
            "usage": {"prompt_tokens": req.prompt_tokens, "completion_tokens": n,
                      "total_tokens": req.prompt_tokens + n,
                      "prompt_tokens_details": {"cached_tokens": max(req.num_cached_tokens,
                                                                     0)}}})


class _Collector:
    """vLLM's metric names (vllm/v1/metrics/loggers.py @ v0.33.0) from the twin's state,
    built at scrape time: the hot path only bumps plain integers."""

    def __init__(self, app: TwinApp) -> None:
        self.app = app

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        twin = self.app.twin
        eng = twin.engine
        labels = ["model_name", "engine"]
        values = [self.app.cfg.model_name, "0"]

        def family(kind: Callable[..., Any], name: str, doc: str, value: float) -> Any:
            f = kind(name, doc, labels=labels)
            f.add_metric(values, value)
            return f

        g, c = GaugeMetricFamily, CounterMetricFamily
        yield family(g, "vllm:num_requests_running", "Requests in the running batch",
                     len(eng.running))
        yield family(g, "vllm:num_requests_waiting", "Requests waiting",
                     len(eng.waiting) + len(twin.pending))
        yield family(g, "vllm:kv_cache_usage_perc", "KV-cache usage, 1 = 100 %",
                     eng.pool.num_used / eng.pool.num_usable)
        yield family(c, "vllm:prompt_tokens", "Prompt tokens processed", twin.num_prompt_tokens)
        yield family(c, "vllm:generation_tokens", "Generation tokens",
                     twin.num_generation_tokens)
        yield family(c, "vllm:prefix_cache_queries", "Prefix-cache queries, in tokens",
                     eng.num_prefix_query_tokens)
        yield family(c, "vllm:prefix_cache_hits", "Prefix-cache hits, in tokens",
                     eng.num_prefix_hit_tokens)
        yield family(c, "vllm:num_preemptions", "Preemptions", eng.num_preemptions)
        ok = CounterMetricFamily("vllm:request_success", "Finished requests",
                                 labels=[*labels, "finished_reason"])
        ok.add_metric([*values, "length"], twin.num_success)
        yield ok
        for name, doc, hist in (
                ("vllm:time_to_first_token_seconds", "Time to first token", twin.ttft),
                ("vllm:e2e_request_latency_seconds", "Arrival to finish", twin.e2e)):
            h = HistogramMetricFamily(name, doc, labels=labels)
            h.add_metric(values, hist.buckets(), hist.sum)
            yield h


async def serve(cfg: TwinConfig, host: str = "127.0.0.1", port: int = 8000,
                announce: Callable[[str], None] = print) -> None:
    """Serve until SIGINT or SIGTERM. ``announce`` gets the base URL once listening
    (port 0 picks a free port)."""
    import signal
    import socket

    runner = web.AppRunner(TwinApp(cfg).make_app(), access_log=None,
                           handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port,
                                                          type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        await runner.cleanup()
        raise InputError("--host/--port", f"cannot listen on {host}:{port} ({e.strerror or e})",
                         "choose a free port, or 0 for any") from None
    site = web.SockSite(runner, sock, backlog=4096, shutdown_timeout=1.0)
    await site.start()
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    announce(f"http://{shown}:{bound[1]}")
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


class TwinProcess:
    """``servetwin twin-serve`` as a child process on a free port (tests, benchmarks).
    Ready when it prints its URL; ``stop`` sends SIGTERM (then SIGKILL) and reaps it."""

    def __init__(self, *args: str, ready_timeout_s: float = 30.0,
                 log_path: str | None = None) -> None:
        import os
        import subprocess
        import sys
        import tempfile
        from pathlib import Path

        root = Path(__file__).resolve().parent.parent
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="twin-serve-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        argv = [sys.executable, "-m", "servetwin", "twin-serve", "--port", "0", *args]
        self.proc = subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.PIPE,
                                     stderr=self._log, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self.url = self._wait_url(ready_timeout_s)

    def _wait_url(self, timeout_s: float) -> str:
        import select

        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        out = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                out += line
                m = re.search(rb"listening on (http://\S+)", line)
                if m:
                    return m.group(1).decode()
                if not line and self.proc.poll() is not None:
                    break
        self.stop()
        with open(self.log_path, "rb") as f:
            err = f.read().decode("utf-8", "replace")
        raise RuntimeError(f"twin-serve did not start: stdout {out!r}, log {err[-2000:]}")

    def kill(self) -> None:
        """SIGKILL, as a crashed server (streams cut without a goodbye)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self, timeout_s: float = 10.0) -> int:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return int(self.proc.returncode)

    def __enter__(self) -> TwinProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
