"""The load generator: replay a plan of requests against OpenAI-compatible endpoints.

asyncio, one process. Open loop by default: every request has an absolute
send time (trace arrival x scale) and the dispatcher sleeps to it, so a slow server
cannot slow the arrivals (the relative-sleep drift of vllm-project/vllm#21104). Closed
loop on request: N users, each sending its next request when the previous one ends.

Each request is a streaming ``POST /v1/completions`` with the prompt as token ids of the
exact length and ``max_tokens = min_tokens`` with ``ignore_eos``, so the engine does the
work the trace says (reference/loadgen_and_engines.md A.6). One record per request is
appended to ``records.jsonl`` the moment it ends (verify/records.py); a failed request
(HTTP error, reset, stall, malformed stream, usage mismatch) is a record with a reason,
and the replay goes on.

Errors and what a record says (``error``, its kind before the first colon):

    connect: ...                        refused, unreachable, connect timeout
    HTTP 503: <body head>               any status but 200 (429, 4xx, 5xx)
    connection reset: after N events    the stream broke (reset, server killed)
    timeout: no event for X s           no bytes for ``stall_timeout_s`` (headers included)
    malformed SSE: event N: <line>      a line that is not SSE, or data that is not JSON
    incomplete stream: ...              the body ended without ``data: [DONE]``
    malformed response: ...             an HTTP head or chunked framing that is not HTTP/1.1
    server error event: ...             an ``{"error": ...}`` event in the stream
    usage mismatch: ...                 usage disagrees with the plan; timings kept
    cancelled                           the replay was cancelled (Ctrl-C) mid-request

Open-loop requests are staged ahead of their deadline (connection taken or opened, bytes
ready) and written at it, so a burst of requests stamped with one time leaves within a
fraction of a millisecond.

Two HTTP clients. ``client="raw"`` (the default) is verify/http1.py: a connection is an
asyncio protocol whose callback de-frames the response and counts its SSE events as the
bytes arrive, so no task wakes per socket read; the request's task only waits for the
connection, the gate and the end. ``client="aiohttp"`` goes through ``ClientSession``.
Both write the same records and take the same faults (tests/verify/test_faults.py runs
each fault through both). Against the twin server on loopback
(benchmarks/loadgen_capacity.py --client both) the raw client holds p99 schedule lag near
1 ms at 2,000 req/s where aiohttp's lag is 2-8 ms, with a fifth less CPU.

Hot path, either client: the work per socket read is one clock read (events of one read
share its time) and a few substring scans of the bytes (``StreamState.feed``): a read
that holds only compact token events (plus the final usage chunk and [DONE]) is counted
without a Python step per event; anything else is parsed event by event (``json.loads``).
Stalls are found by a watchdog task looking at each stream's last read, not by a timer
per read.
"""

from __future__ import annotations

import asyncio
import gc
import json
import platform
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import BytesPayload
from yarl import URL

from sim.errors import InputError
from sim.request import Request
from sim.router import make_router
from sim.workload import Trace

from . import http1
from .prompts import FixedPrompt, HashIds, Prompt, PromptBuilder
from .records import META_FILE, RECORD_KEYS, RECORDS_FILE, RecordWriter, write_meta
from .sse import StreamState, finish_reason, short

SUMMARY_FILE = "replay_summary.json"
# the dispatcher sleeps to SPIN_S before a deadline, then yields to the loop until it
SPIN_S = 0.001
START_DELAY_S = 0.01
# while a replay runs, another thread of this process (the /metrics scraper) can keep the
# loop from the GIL at most this long (Python's default is 5 ms)
GIL_SWITCH_S = 0.0005
# requests are staged this long before their deadline (plus STAGE_PER_REQUEST_S for each
# request of a burst): connection, request line and headers made ready, the body held
# back; at the deadline only the writes remain. 0 turns staging off (sent at the deadline)
STAGE_S = 0.005
STAGE_PER_REQUEST_S = 0.001
RESERVED_BODY_KEYS = ("prompt", "max_tokens", "min_tokens")
# request bodies are built before the replay starts when the plan's prompts total at most
# this many tokens (~6 bytes of JSON each: ~100 MB); a longer plan builds each body while
# staging it. Building a body (drawing its blocks' token ids, joining their text) is a
# tenth of the client's CPU per request at 2,000 req/s (py-spy, 64-token prompts)
PREBUILD_MAX_TOKENS = 16_000_000
_STALLED = "servetwin: stalled stream"  # the watchdog's cancel message
CLIENTS = ("raw", "aiohttp")  # raw: verify/http1.py (the default); aiohttp: ClientSession

ProgressFn = Callable[[int, int, int], None]


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One request of a plan. ``prompt``: a ``Prompt`` (built when sent) or token ids."""

    request_id: int
    intended_s: float  # seconds from t0; ignored in closed loop
    prompt: Prompt
    max_tokens: int  # = min_tokens: the exact output length asked for
    hash_ids: HashIds = ()  # the trace's prefix ids, for routers that look at them

    def __post_init__(self) -> None:
        if not hasattr(self.prompt, "json_items"):
            object.__setattr__(self, "prompt", FixedPrompt(self.prompt))  # type: ignore[arg-type]
        if self.max_tokens < 1:
            raise InputError(f"request {self.request_id}", f"max_tokens = {self.max_tokens}: "
                             "must be >= 1", "plan at least one output token")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt)


@dataclass
class ReplaySummary:
    num_planned: int
    num_sent: int  # requests attempted (each has a record)
    num_ok: int
    num_error: int
    errors_by_kind: dict[str, int]
    schedule_lag_s: dict[str, float]  # send_s - intended_s of the requests that went
                                      # out: p50, p90, p99, max
    duration_s: float  # t0 to the last finish
    num_tokens_streamed: int  # token events received, failed requests included
    records_path: Path
    cancelled: bool = False
    exporter_url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["records_path"] = str(self.records_path)
        d["schedule_lag_s"] = {k: (v if v == v else None)  # NaN (nothing sent): null
                               for k, v in self.schedule_lag_s.items()}
        return d

    def format(self) -> str:
        lag = {k: (v * 1e3 if v == v else float("nan")) for k, v in self.schedule_lag_s.items()}
        rate = self.num_ok / self.duration_s if self.duration_s > 0 else 0.0
        lines = [
            f"replay: {self.num_ok:,} ok, {self.num_error:,} errors of {self.num_sent:,} sent "
            f"({self.num_planned:,} planned){' - CANCELLED' if self.cancelled else ''}",
            f"  {self.duration_s:.2f} s, {rate:,.1f} ok req/s, "
            f"{self.num_tokens_streamed:,} tokens streamed",
            f"  schedule lag p50 {lag['p50']:.3f} ms, p99 {lag['p99']:.3f} ms, "
            f"max {lag['max']:.3f} ms",
        ]
        lines += [f"  error {kind}: {n:,}" for kind, n in sorted(self.errors_by_kind.items())]
        lines.append(f"  records: {self.records_path}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- plans
def plan_from_trace(trace: Trace, prompt_builder: PromptBuilder,
                    scale: float = 1.0) -> list[PlannedRequest]:
    """One planned request per trace row; send times are arrivals x ``scale``."""
    if not scale > 0:
        raise InputError("plan", f"scale = {scale}: must be > 0", "give a positive factor")
    if trace.hash_ids.size and trace.hash_block_tokens != prompt_builder.block_tokens:
        raise InputError(trace.source, f"hash blocks of {trace.hash_block_tokens} tokens but "
                         f"the prompt builder makes blocks of {prompt_builder.block_tokens}",
                         "build the PromptBuilder with block_tokens = trace.hash_block_tokens")
    off = trace.hash_offsets
    ids = trace.hash_ids
    arrival = trace.arrival_s * scale
    out = []
    for i in range(len(trace)):
        h = ids[off[i]:off[i + 1]]
        n_in = int(trace.input_tokens[i])
        out.append(PlannedRequest(i, float(arrival[i]), prompt_builder.prompt(i, h, n_in),
                                  int(trace.output_tokens[i]), h))
    return out


def trace_meta(trace: Trace, prompt_builder: PromptBuilder, scale: float) -> dict[str, Any]:
    """The meta.json entries that say where a trace plan came from."""
    return {"trace_source": trace.source, "schedule_scale": scale,
            "seed": prompt_builder.seed, "prompt_block_tokens": prompt_builder.block_tokens,
            "vocab": [prompt_builder.vocab_low, prompt_builder.vocab_high]}


class EndpointState:
    """What a router may look at for one endpoint (sim routers read ``engines[i]``)."""

    __slots__ = ("num_outstanding", "num_sent", "url", "worker_id")

    def __init__(self, worker_id: int, url: str) -> None:
        self.worker_id = worker_id
        self.url = url
        self.num_outstanding = 0
        self.num_sent = 0


def completions_url(endpoint: str) -> str:
    e = endpoint.rstrip("/")
    return e if e.endswith("/completions") else e + "/v1/completions"


class _GatedBody(BytesPayload):
    """A request body held back until its burst's gate opens.

    aiohttp buffers the request line and headers and sends them with the body's first
    write, so a request staged before its deadline has its connection taken (or opened)
    and its headers built, and nothing is on the wire until the gate opens: then one
    write sends the whole request. ``sent_s`` is that write's time, the request's send
    time: the engine cannot start on a request before its body is complete."""

    def __init__(self, body: bytes, gate: asyncio.Future[None] | None, t0: float) -> None:
        super().__init__(body, content_type="application/json")
        self._gate = gate
        self._t0 = t0
        self.sent_s: float | None = None

    async def write_with_length(self, writer: AbstractStreamWriter,
                                content_length: int | None) -> None:
        if self._gate is not None and not self._gate.done():
            await self._gate
        self.sent_s = time.perf_counter() - self._t0
        await super().write_with_length(writer, content_length)


# ------------------------------------------------------------------------- metrics
class _Exporter:
    """The load generator's own Prometheus metrics, served from the replay's loop."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        p = "servetwin_loadgen_"
        self.requests = Counter(p + "requests", "Requests finished", ["status"],
                                registry=self.registry)
        self.inflight = Gauge(p + "inflight", "Requests in flight", registry=self.registry)
        self.tokens = Counter(p + "tokens", "Token events streamed", registry=self.registry)
        buckets = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
        self.lag = Histogram(p + "schedule_lag_seconds", "send_s - intended_s",
                             buckets=buckets, registry=self.registry)
        self.ttft = Histogram(p + "ttft_seconds", "first token - send",
                              buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                                       2.5, 5.0, 10.0, 30.0, 60.0), registry=self.registry)
        self._runner: Any = None
        self.url = ""

    async def start(self, port: int, host: str = "127.0.0.1") -> str:
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        async def metrics(_request: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.registry),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.url = f"http://{host}:{sock.getsockname()[1]}/metrics"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def _sleep_until(at: float, spin: float = SPIN_S) -> None:
    """Sleep to ``at`` (perf_counter seconds); from ``spin`` before it, yield to the loop
    until it: the selector's timeout has millisecond granularity (rounded up)."""
    pc = time.perf_counter
    while True:
        left = at - pc()
        if left <= 0:
            return
        await asyncio.sleep(left - spin if left > spin else 0)


class _RawStream(http1.Exchange):
    """A request's response as verify/http1.py delivers it: the SSE events counted in the
    connection's callback (``StreamState.feed``); ``fut`` resolves when the record can be
    written (``[DONE]``, an error, the response's or the connection's end)."""

    __slots__ = ("end_s", "err_body", "error", "fut", "st", "status", "t0")

    def __init__(self, st: StreamState, t0: float, fut: asyncio.Future[None]) -> None:
        super().__init__()
        self.st = st
        self.t0 = t0
        self.fut = fut
        self.status: int | None = None
        self.error: str | None = None
        self.err_body = b""
        self.end_s = 0.0

    def _over(self, error: str | None) -> None:
        if not self.fut.done():
            self.end_s = time.perf_counter() - self.t0
            self.error = error
            self.fut.set_result(None)

    def abandon(self) -> None:
        """Done with the response before its end (cancelled, stalled): the connection
        goes, since the rest of the response would still come on it."""
        if self.conn is not None:
            self.conn.detach(self)

    def on_head(self, status: int, headers: dict[bytes, bytes]) -> None:
        self.status = status
        self.st.last_s = time.perf_counter() - self.t0

    def on_body(self, data: bytes) -> None:
        if self.fut.done():
            return  # after [DONE]: the end of the message, read so the connection is reused
        st = self.st
        if self.status != 200:
            st.last_s = time.perf_counter() - self.t0
            self.err_body += data
            if len(self.err_body) >= 400:
                self._over(self._http_error())
                self.abandon()
            return
        if st.feed(data, time.perf_counter() - self.t0):
            self._over(st.error)
            if st.error is not None:
                self.abandon()

    def on_end(self) -> None:
        if self.status != 200:
            self._over(self._http_error())
        else:
            self._over(f"incomplete stream: ended without [DONE] after {self.st.n} events")

    def on_lost(self, reason: str) -> None:
        if reason.startswith(http1.BAD):
            self._over(f"malformed response: after {self.st.n} events: {short(reason[4:], 120)}")
        elif self.status is not None and self.status != 200:
            self._over(self._http_error())
        else:
            self._over(f"connection reset: after {self.st.n} events ({short(reason, 80)})")

    def _http_error(self) -> str:
        return (f"HTTP {self.status}: "
                f"{short(self.err_body[:400].decode('utf-8', 'replace'))}")


# -------------------------------------------------------------------------- replay
class Replay:
    """One replay. ``await run()``; after it returns or is cancelled ``summary`` holds
    the outcome (``run_replay`` uses that to report a Ctrl-C'd replay)."""

    def __init__(self, plan: Sequence[PlannedRequest], endpoints: Sequence[str], model: str,
                 out_dir: str | Path, *, router: str = "round_robin",
                 router_params: Mapping[str, Any] | None = None,
                 closed_loop_concurrency: int | None = None, force_close: bool = False,
                 stall_timeout_s: float = 60.0, connect_timeout_s: float = 10.0,
                 extra_body: Mapping[str, Any] | None = None,
                 progress: ProgressFn | None = None, exporter_port: int | None = None,
                 meta: Mapping[str, Any] | None = None, client: str = "raw") -> None:
        if not endpoints:
            raise InputError("replay", "no endpoint given", "give at least one base URL")
        if closed_loop_concurrency is not None and closed_loop_concurrency < 1:
            raise InputError("replay", f"closed_loop_concurrency = {closed_loop_concurrency}: "
                             "must be >= 1", "give a positive number of users")
        if not stall_timeout_s > 0:
            raise InputError("replay", f"stall_timeout_s = {stall_timeout_s}: must be > 0",
                             "give a positive timeout")
        if client not in CLIENTS:
            raise InputError("replay", f"client = {client!r}: unknown",
                             f"choose one of {', '.join(CLIENTS)}")
        bad = sorted(set(extra_body or {}) & set(RESERVED_BODY_KEYS))
        if bad:
            raise InputError("replay", f"extra_body sets {', '.join(bad)}",
                             "the plan decides prompt, max_tokens and min_tokens")
        self.plan = sorted(plan, key=lambda p: p.intended_s)
        self.endpoints = [EndpointState(i, e) for i, e in enumerate(endpoints)]
        self._urls = [URL(completions_url(e)) for e in endpoints]
        try:
            self._targets = [http1.Target(completions_url(e)) for e in endpoints]
        except ValueError as e:
            raise InputError("replay", str(e), "give base URLs like http://host:port") from None
        self.client = client
        self._pool: http1.Pool | None = None
        self.model = model
        self.out_dir = Path(out_dir)
        self.router = make_router(router, dict(router_params or {}), len(endpoints),
                                  np.random.default_rng(0))
        self.router_kind = router
        self.closed_loop_concurrency = closed_loop_concurrency
        self.force_close = force_close
        self.stall_timeout_s = float(stall_timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        fixed = {"model": model, "ignore_eos": True, "stream": True,
                 "stream_options": {"include_usage": True}, "temperature": 0}
        fixed.update(extra_body or {})
        fixed = {k: v for k, v in fixed.items() if v is not None}  # None drops a field
        self._body_tail = json.dumps(fixed, separators=(",", ":"))[1:]  # '"model":...}'
        self.progress = progress
        self.exporter_port = exporter_port
        self.meta = dict(meta or {})
        self.summary: ReplaySummary | None = None
        self.t0 = 0.0
        self._writer: RecordWriter | None = None
        self._session: aiohttp.ClientSession | None = None
        self._exporter: _Exporter | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._live: dict[asyncio.Task[Any], StreamState] = {}  # requests in flight
        self._lags: list[float] = []
        self._errors: Counter[str] = Counter()
        self._num_ok = 0
        self._num_done = 0
        self._num_tokens = 0
        self._last_finish = 0.0
        self._bodies: list[bytes | None] | None = None  # by plan position, if prebuilt

    # ------------------------------------------------------------------- run
    async def run(self) -> ReplaySummary:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        records_path = self.out_dir / RECORDS_FILE
        if records_path.exists():
            raise InputError(str(records_path), "a replay already wrote records here",
                             "choose a new output folder")
        cancelled = False
        if sum(p.num_prompt_tokens for p in self.plan) <= PREBUILD_MAX_TOKENS:
            self._bodies = [self._body(p) for p in self.plan]
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, GIL_SWITCH_S))
        # what lives before the replay (the plan, imports, a test session's objects)
        # moves out of the collector's reach: a full collection over it stalled the loop
        # ~20 ms at a burst's deadline (its sends all late by 13 ms; seen in
        # tests/verify/test_loadgen.py after two replays in one process)
        gc.collect()
        gc.freeze()
        self._writer = RecordWriter(records_path)
        try:
            if self.client == "aiohttp":
                # no sock_read timeout: aiohttp would re-arm a timer on every socket read;
                # the stall watchdog looks at each stream's last read instead
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0, force_close=self.force_close),
                    timeout=aiohttp.ClientTimeout(total=None,
                                                  sock_connect=self.connect_timeout_s),
                    read_bufsize=4 << 20)
            else:
                self._pool = http1.Pool(self.connect_timeout_s)
            if self.exporter_port is not None:
                self._exporter = _Exporter()
                await self._exporter.start(self.exporter_port)
            self.t0 = time.perf_counter() + START_DELAY_S
            wall0 = time.time() + (self.t0 - time.perf_counter())
            write_meta(self.out_dir / META_FILE, self._meta(wall0))
            watchdog = asyncio.get_running_loop().create_task(self._watch_stalls())
            try:
                if self.closed_loop_concurrency is None:
                    await self._open_loop()
                else:
                    await self._closed_loop(self.closed_loop_concurrency)
                while self._tasks:
                    await asyncio.wait(set(self._tasks))
            except asyncio.CancelledError:
                cancelled = True
                for t in self._tasks:
                    t.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
                raise
            finally:
                watchdog.cancel()
        finally:
            sys.setswitchinterval(switch)
            gc.unfreeze()
            if self._session is not None:
                await self._session.close()
            if self._pool is not None:
                self._pool.close()
            if self._exporter is not None:
                await self._exporter.stop()
            self._writer.close()
            self.summary = self._summarize(records_path, cancelled)
            write_meta(self.out_dir / SUMMARY_FILE, self.summary.to_dict())
        return self.summary

    def _meta(self, wall0: float) -> dict[str, Any]:
        return {
            "t0_unix_s": wall0,
            "t0_iso": datetime.fromtimestamp(wall0, UTC).isoformat(),
            "clock": "time.perf_counter, seconds from t0",
            "endpoints": [e.url for e in self.endpoints],
            "model": self.model,
            "num_planned": len(self.plan),
            "mode": ("open loop" if self.closed_loop_concurrency is None
                     else f"closed loop, {self.closed_loop_concurrency} users"),
            "router": self.router_kind,
            "stall_timeout_s": self.stall_timeout_s,
            "force_close": self.force_close,
            "body_fields": json.loads("{" + self._body_tail),
            "client": (f"python {platform.python_version()}, "
                       + (f"aiohttp {aiohttp.__version__}" if self.client == "aiohttp"
                          else "verify/http1.py on asyncio transports")),
            "record_keys": list(RECORD_KEYS),
            **self.meta,
        }

    def _summarize(self, records_path: Path, cancelled: bool) -> ReplaySummary:
        lags = np.asarray(self._lags, dtype=np.float64)
        if lags.size:
            p50, p90, p99 = (float(x) for x in np.percentile(lags, (50, 90, 99)))
            lag = {"p50": p50, "p90": p90, "p99": p99, "max": float(lags.max())}
        else:
            lag = {k: float("nan") for k in ("p50", "p90", "p99", "max")}
        return ReplaySummary(
            num_planned=len(self.plan), num_sent=self._num_done, num_ok=self._num_ok,
            num_error=self._num_done - self._num_ok, errors_by_kind=dict(self._errors),
            schedule_lag_s=lag, duration_s=max(self._last_finish, 0.0),
            num_tokens_streamed=self._num_tokens, records_path=records_path,
            cancelled=cancelled,
            exporter_url=self._exporter.url if self._exporter is not None else None)

    async def _watch_stalls(self) -> None:
        """Cancel a request that got no bytes for ``stall_timeout_s`` (it is recorded as
        a timeout). Checked every tenth of the timeout (at most every second)."""
        limit = self.stall_timeout_s
        every = min(limit / 10, 1.0)
        pc = time.perf_counter
        while True:
            await asyncio.sleep(every)
            now = pc() - self.t0
            for task, st in list(self._live.items()):
                if now - st.last_s >= limit and not task.done():
                    task.cancel(_STALLED)

    # -------------------------------------------------------------- schedules
    async def _open_loop(self) -> None:
        """Two sorted time streams merged: each burst (traces often stamp many requests
        with one time) is staged ``STAGE_S + STAGE_PER_REQUEST_S x size`` before its
        deadline (bodies built one at a time with the loop free in between, requests
        started up to their held-back body), and its gate opens at the deadline. Staging
        of later bursts goes on while earlier gates wait."""
        loop = asyncio.get_running_loop()
        t0 = self.t0
        plan = self.plan
        gates: deque[tuple[float, asyncio.Future[None]]] = deque()
        i = 0
        while i < len(plan) or gates:
            j = i + 1
            while j < len(plan) and plan[j].intended_s == plan[i].intended_s:
                j += 1
            if i < len(plan):
                deadline = t0 + plan[i].intended_s
                stage_at = (deadline - STAGE_S - STAGE_PER_REQUEST_S * (j - i)
                            if STAGE_S > 0 else deadline)
            if gates and (i >= len(plan) or gates[0][0] <= stage_at):
                at, gate = gates.popleft()
                await _sleep_until(at)
                gate.set_result(None)
                await asyncio.sleep(0)  # the writes go out before anything else
                continue
            await _sleep_until(stage_at, 0.0)  # staging needs no precision: no spin
            gate = loop.create_future()
            for k in range(i, j):
                p = plan[k]
                self._spawn(loop, p, self._take_body(k), p.intended_s, gate)
                await asyncio.sleep(0)  # it runs up to its held-back body
            gates.append((deadline, gate))
            i = j

    async def _closed_loop(self, users: int) -> None:
        it = iter(enumerate(self.plan))

        async def user() -> None:
            for k, p in it:  # one shared iterator: each user takes the next request
                task = self._spawn(asyncio.get_running_loop(), p, self._take_body(k),
                                   time.perf_counter() - self.t0, None)
                await asyncio.wait([task])

        await asyncio.gather(*(user() for _ in range(users)))

    def _spawn(self, loop: asyncio.AbstractEventLoop, p: PlannedRequest, body: bytes,
               intended_s: float, gate: asyncio.Future[None] | None) -> asyncio.Task[None]:
        req = Request(p.request_id, intended_s, p.num_prompt_tokens, p.max_tokens,
                      p.hash_ids)  # type: ignore[arg-type]
        w = self.router.choose(req, self.endpoints)
        ep = self.endpoints[w]
        ep.num_outstanding += 1
        ep.num_sent += 1
        if self._exporter is not None:
            self._exporter.inflight.inc()
        if self.client == "aiohttp":
            coro = self._one(p, _GatedBody(body, gate, self.t0), w, intended_s)
        else:
            coro = self._one_raw(p, body, gate, w, intended_s)
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _take_body(self, k: int) -> bytes:
        """The body of plan position ``k``: the prebuilt one (then dropped), or built now."""
        bodies = self._bodies
        if bodies is not None:
            body = bodies[k]
            if body is not None:
                bodies[k] = None
                return body
        return self._body(self.plan[k])

    def _body(self, p: PlannedRequest) -> bytes:
        n = p.max_tokens
        return (f'{{"prompt":[{p.prompt.json_items()}],"max_tokens":{n},"min_tokens":{n},'
                + self._body_tail).encode()

    # ---------------------------------------------------------------- request
    async def _one(self, p: PlannedRequest, body: _GatedBody, w: int,
                   intended_s: float) -> None:
        """One request through aiohttp (``client="aiohttp"``)."""
        pc = time.perf_counter
        t0 = self.t0
        status: int | None = None
        error: str | None = None
        assert self._session is not None
        t = pc() - t0  # staged now; sent when the body goes out (body.sent_s)
        st = StreamState(t)
        task = asyncio.current_task()
        assert task is not None
        self._live[task] = st
        try:
            headers = {"Content-Type": "application/json", "x-request-id": str(p.request_id)}
            async with self._session.post(self._urls[w], data=body, headers=headers) as resp:
                status = resp.status
                if status != 200:
                    head = await resp.content.read(400)
                    t = pc() - t0
                    error = f"HTTP {status}: {short(head.decode('utf-8', 'replace'))}"
                else:
                    content = resp.content
                    while True:
                        chunk = await content.readany()
                        t = pc() - t0
                        if not chunk:
                            error = ("incomplete stream: ended without [DONE] after "
                                     f"{st.n} events")
                            break
                        if st.feed(chunk, t):
                            error = st.error
                            break
        except asyncio.CancelledError as e:
            t = pc() - t0
            if e.args != (_STALLED,):
                del self._live[task]
                self._record(p, w, intended_s, body.sent_s, t, status, st, "cancelled")
                raise
            task.uncancel()
            error = f"timeout: no event for {self.stall_timeout_s:g} s (after {st.n} events)"
        except aiohttp.ConnectionTimeoutError:
            t = pc() - t0
            error = f"connect: timeout after {self.connect_timeout_s:g} s"
        except aiohttp.ClientConnectorError as e:
            t = pc() - t0
            error = f"connect: {short(str(e))}"
        except TimeoutError:
            t = pc() - t0
            error = f"timeout: no event for {self.stall_timeout_s:g} s (after {st.n} events)"
        except aiohttp.ServerDisconnectedError:
            t = pc() - t0
            error = f"connection reset: server disconnected after {st.n} events"
        except (aiohttp.ClientPayloadError, aiohttp.ClientOSError, ConnectionError) as e:
            t = pc() - t0
            error = f"connection reset: after {st.n} events ({short(str(e), 80)})"
        except Exception as e:  # a record for every request sent, whatever went wrong
            t = pc() - t0
            error = f"client error: {type(e).__name__}: {short(str(e))}"
        del self._live[task]
        self._finish(p, w, intended_s, body.sent_s, t, status, st, error)

    async def _one_raw(self, p: PlannedRequest, body: bytes, gate: asyncio.Future[None] | None,
                       w: int, intended_s: float) -> None:
        """One request on verify/http1.py: the connection taken (or opened) while staged,
        the whole request written at the gate, the stream counted by the connection's
        callbacks (``_RawStream``); this task only waits for its end."""
        pc = time.perf_counter
        t0 = self.t0
        pool = self._pool
        assert pool is not None
        target = self._targets[w]
        st = StreamState(pc() - t0)
        ex = _RawStream(st, t0, asyncio.get_running_loop().create_future())
        task = asyncio.current_task()
        assert task is not None
        self._live[task] = st
        sent: float | None = None
        error: str | None = None
        try:
            conn = pool.take(target.key) or await pool.connect(target.key)
            data = target.post(body, f"x-request-id: {p.request_id}\r\n", self.force_close)
            if gate is not None and not gate.done():
                await gate
            if conn.closed or conn.is_closing():  # the server let it go while staged
                conn = await pool.connect(target.key)
            st.last_s = sent = pc() - t0
            conn.send(ex, data)
            await ex.fut
            t = ex.end_s
            error = ex.error
        except asyncio.CancelledError as e:
            t = pc() - t0
            ex.abandon()
            if e.args != (_STALLED,):
                del self._live[task]
                self._record(p, w, intended_s, sent, t, ex.status, st, "cancelled")
                raise
            task.uncancel()
            error = f"timeout: no event for {self.stall_timeout_s:g} s (after {st.n} events)"
        except TimeoutError:
            t = pc() - t0
            error = f"connect: timeout after {self.connect_timeout_s:g} s"
        except OSError as e:
            t = pc() - t0
            host, port, _ = target.key
            error = f"connect: cannot connect to {host}:{port}: {short(str(e))}"
        except Exception as e:  # a record for every request sent, whatever went wrong
            t = pc() - t0
            ex.abandon()
            error = f"client error: {type(e).__name__}: {short(str(e))}"
        del self._live[task]
        self._finish(p, w, intended_s, sent, t, ex.status, st, error)

    def _finish(self, p: PlannedRequest, w: int, intended_s: float, sent: float | None,
                t: float, status: int | None, st: StreamState, error: str | None) -> None:
        if st.last_token and st.reason is None:
            if b'"finish_reason":"length"' in st.last_token:
                st.reason = "length"
            else:
                try:
                    st.reason = finish_reason(json.loads(st.last_token[6:]))
                except ValueError:
                    error = error or f"malformed SSE: {short(repr(st.last_token))}"
        if error is None and isinstance(st.usage, dict):
            error = _usage_problem(st.usage, p)
        self._record(p, w, intended_s, sent, t, status, st, error)

    def _record(self, p: PlannedRequest, w: int, intended_s: float, sent: float | None,
                finish: float, status: int | None, st: StreamState,
                error: str | None) -> None:
        """``sent``: when the body went out; None if the request failed before (then the
        record's ``send_s`` is when it failed and no schedule lag is counted)."""
        send = finish if sent is None else sent
        ep = self.endpoints[w]
        ep.num_outstanding -= 1
        times, n = st.times, st.n
        u = st.usage if isinstance(st.usage, dict) else {}
        details = u.get("prompt_tokens_details") or {}
        rec = {
            "request_id": p.request_id, "endpoint": ep.url, "worker_id": w,
            "intended_s": intended_s, "send_s": send,
            "first_token_s": times[0] if times else None, "finish_s": finish,
            "event_times_s": times, "num_events": n,
            "expected_prompt_tokens": p.num_prompt_tokens,
            "expected_output_tokens": p.max_tokens,
            "num_prompt_tokens": u.get("prompt_tokens"),
            "num_output_tokens": u.get("completion_tokens"),
            "num_cached_tokens": (details.get("cached_tokens")
                                  if isinstance(details, dict) else None),
            "finish_reason": st.reason, "http_status": status,
            "status": "error" if error else "ok", "error": error,
        }
        assert self._writer is not None
        self._writer.write(rec)
        if sent is not None:
            self._lags.append(sent - intended_s)
        self._num_done += 1
        self._num_tokens += n
        if finish > self._last_finish:
            self._last_finish = finish
        if error:
            self._errors[error.split(":", 1)[0]] += 1
        else:
            self._num_ok += 1
        ex = self._exporter
        if ex is not None:
            ex.requests.labels("error" if error else "ok").inc()
            ex.tokens.inc(n)
            if sent is not None:
                ex.lag.observe(sent - intended_s)
            if times:
                ex.ttft.observe(times[0] - send)
            ex.inflight.dec()
        if self.progress is not None:
            self.progress(self._num_done, len(self.plan), self._num_done - self._num_ok)


def _usage_problem(usage: Mapping[str, Any], p: PlannedRequest) -> str | None:
    got = usage.get("completion_tokens")
    if got is not None and got != p.max_tokens:
        return f"usage mismatch: completion_tokens {got} != {p.max_tokens} expected"
    got = usage.get("prompt_tokens")
    if got is not None and got != p.num_prompt_tokens:
        return f"usage mismatch: prompt_tokens {got} != {p.num_prompt_tokens} expected"
    return None


async def replay(plan: Sequence[PlannedRequest], endpoints: Sequence[str], model: str,
                 out_dir: str | Path, *, router: str = "round_robin",
                 closed_loop_concurrency: int | None = None, force_close: bool = False,
                 stall_timeout_s: float = 60.0, extra_body: Mapping[str, Any] | None = None,
                 progress: ProgressFn | None = None, exporter_port: int | None = None,
                 **options: Any) -> ReplaySummary:
    """Replay ``plan`` against ``endpoints`` (base URLs); records go to
    ``out_dir/records.jsonl``. ``options``: router_params, connect_timeout_s, meta
    (extra meta.json entries, e.g. ``trace_meta(...)``)."""
    r = Replay(plan, endpoints, model, out_dir, router=router,
               closed_loop_concurrency=closed_loop_concurrency, force_close=force_close,
               stall_timeout_s=stall_timeout_s, extra_body=extra_body, progress=progress,
               exporter_port=exporter_port, **options)
    return await r.run()


def run_replay(plan: Sequence[PlannedRequest], endpoints: Sequence[str], model: str,
               out_dir: str | Path, **kwargs: Any) -> ReplaySummary:
    """``replay`` in its own event loop (asyncio's own: uvloop measured no faster with
    the aiohttp client, benchmarks/loadgen_capacity.py). On Ctrl-C the in-flight requests
    are recorded as cancelled and the summary says ``cancelled``."""
    r = Replay(plan, endpoints, model, out_dir, **kwargs)
    try:
        return asyncio.run(r.run())
    except KeyboardInterrupt:
        if r.summary is None:
            raise
        return r.summary
