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
import re
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web

from sim.engines.vllm import cdiv
from sim.errors import InputError
from sim.request import Request

from .twin_engine import (
    NOTE,
    Faults,
    FixedTiming,
    Stream,
    Twin,
    TwinConfig,
    is_faulty,
)


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


__all__ = ["NOTE", "Faults", "FixedTiming", "TwinApp", "TwinConfig", "TwinProcess",
           "is_faulty", "serve"]
