"""verify.loadgen against a real twin server process: real HTTP, real streaming."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sim.errors import InputError
from sim.metrics import summarize
from sim.workload import synthesize
from tests.verify.test_twin_server import metrics
from verify import loadgen
from verify.loadgen import (
    PlannedRequest,
    Replay,
    plan_from_trace,
    replay,
    run_replay,
    trace_meta,
)
from verify.prompts import PromptBuilder
from verify.records import read_records, to_sim_records
from verify.sse import DONE, OTHER, TOKEN
from verify.sse import parse_event as _parse_event
from verify.twin_server import TwinProcess

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def twin():
    with TwinProcess("--step-ms", "2") as tw:
        yield tw


def make_plan(n: int, max_tokens: int, gap_s: float = 0.0, prompt_tokens: int = 20,
              first_id: int = 0) -> list[PlannedRequest]:
    return [PlannedRequest(first_id + i, i * gap_s,
                           list(range(1000 + i * 7, 1000 + i * 7 + prompt_tokens)), max_tokens)
            for i in range(n)]


def expected_hits(rows: list[dict], prompts: dict[int, list[int]], block: int = 16) -> int:
    """Prefix-cache hits a vLLM-like engine must report: full blocks already computed by
    an earlier request (in send order), at most (n - 1) // block blocks."""
    seen: set[tuple[int, ...]] = set()
    total = 0
    for r in sorted(rows, key=lambda r: r["send_s"]):
        toks = prompts[r["request_id"]]
        full = len(toks) // block
        keys = [tuple(toks[:(j + 1) * block]) for j in range(full)]
        hit = 0
        for key in keys[:(len(toks) - 1) // block]:
            if key not in seen:
                break
            hit += 1
        total += hit * block
        seen.update(keys)
    return total


@pytest.mark.parametrize(("client", "prebuild", "seed"),
                         [("raw", True, 101), ("raw", False, 202), ("aiohttp", True, 303)],
                         ids=["raw-bodies-prebuilt", "raw-bodies-staged", "aiohttp"])
def test_replay_of_a_trace_matches_the_servers_own_counters(twin, tmp_path, monkeypatch,
                                                            client, prebuild, seed):
    # bodies built before the replay (a small plan) or each while it is staged (a plan
    # over the size limit), through either HTTP client: the same prompts reach the
    # server. Each case its own seed: other token ids, so nothing of one is cached for
    # another
    if not prebuild:
        monkeypatch.setattr(loadgen, "PREBUILD_MAX_TOKENS", 0)
    trace = synthesize({"rate_per_s": 100, "num_requests": 60,
                        "input_tokens": {"kind": "uniform", "min_tokens": 5, "max_tokens": 120},
                        "output_tokens": {"kind": "uniform", "min_tokens": 1, "max_tokens": 12},
                        "prefix": {"num_groups": 3, "prefix_tokens": 64},
                        "hash_block_tokens": 16}, np.random.default_rng(4))
    builder = PromptBuilder(seed=seed, block_tokens=16)
    plan = plan_from_trace(trace, builder)
    before = metrics(twin.url)
    summary = run_replay(plan, [twin.url], "twin", tmp_path, stall_timeout_s=10,
                         meta=trace_meta(trace, builder, 1.0), client=client)
    after = metrics(twin.url)
    rows = read_records(summary.records_path)
    assert summary.num_ok == len(rows) == 60 and summary.num_error == 0
    for r in rows:
        assert r["status"] == "ok" and r["error"] is None and r["http_status"] == 200
        assert r["num_events"] == r["expected_output_tokens"] == r["num_output_tokens"]
        assert len(r["event_times_s"]) == r["num_events"]
        assert r["num_prompt_tokens"] == r["expected_prompt_tokens"]
        assert r["send_s"] <= r["first_token_s"] <= r["finish_s"]
        assert r["event_times_s"] == sorted(r["event_times_s"])
        assert r["finish_reason"] == "length"

    def delta(name: str) -> float:
        return after[name] - before[name]

    assert delta("vllm:prompt_tokens_total") == sum(int(x) for x in trace.input_tokens)
    assert delta("vllm:generation_tokens_total") == sum(int(x) for x in trace.output_tokens)
    assert summary.num_tokens_streamed == sum(int(x) for x in trace.output_tokens)
    prompts = {p.request_id: p.prompt.token_ids() for p in plan}
    hits = expected_hits(rows, prompts)
    assert hits >= 16 * 40  # most requests reuse their group's four 16-token blocks
    assert delta("vllm:prefix_cache_hits_total") == hits
    assert sum(r["num_cached_tokens"] for r in rows) == hits
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["seed"] == seed and meta["endpoints"] == [twin.url] and meta["t0_iso"]
    assert meta["body_fields"]["ignore_eos"] is True
    s = summarize(to_sim_records(rows))
    assert s["num_completed"] == 60 and s["ttft_s"]["p50"] > 0


def test_open_loop_keeps_its_schedule(twin, tmp_path):
    """200 req/s for 2 s against a server that keeps up: every request leaves at its
    intended time plus a lag, and the schedule (not the server) sets the pace. The lag's
    size is a performance figure (benchmarks/loadgen_capacity.py), not asserted here
    beyond a bound that only a broken dispatcher (relative sleeps, a blocked loop) would
    exceed on any machine."""
    plan = make_plan(400, 4, gap_s=0.005, first_id=10_000)
    summary = run_replay(plan, [twin.url], "twin", tmp_path)
    assert summary.num_ok == 400
    rows = read_records(summary.records_path)
    lags = [r["send_s"] - r["intended_s"] for r in rows]
    assert min(lags) >= 0  # never early
    sends = sorted(r["send_s"] for r in rows)
    assert sends[-1] - sends[0] == pytest.approx(399 * 0.005, abs=0.05)
    assert summary.schedule_lag_s["p50"] < 0.05


def test_a_burst_is_staged_before_its_deadline_and_written_at_it(tmp_path):
    """A raw HTTP server notes when each connection opens and when its first request
    byte arrives: the burst's connections open before the deadline (staged), no byte
    arrives before it, and every record's send_s is the write, at or after it."""
    seen: list[tuple[float, float]] = []  # (connected, first byte), perf_counter
    body = (b'data: {"choices":[{"index":0,"text":"x","finish_reason":"length"}]}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":20,"completion_tokens":1}}\n\n'
            b"data: [DONE]\n\n")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected = time.perf_counter()
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append((connected, time.perf_counter()))
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    async def main() -> Replay:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        plan = [PlannedRequest(i, 0.2, list(range(100, 120)), 1) for i in range(6)]
        r = Replay(plan, [f"http://127.0.0.1:{port}"], "raw", tmp_path, force_close=True)
        async with server:
            await r.run()
        return r

    r = asyncio.run(main())
    assert r.summary is not None and r.summary.num_ok == 6
    deadline = r.t0 + 0.2
    assert len(seen) == 6
    assert all(c < deadline for c, _ in seen)  # staged: connected ahead
    assert all(b >= deadline for _, b in seen)  # nothing on the wire before the deadline
    for row in read_records(r.summary.records_path):
        assert row["intended_s"] == 0.2 <= row["send_s"] < 0.2 + 0.1


def test_closed_loop_keeps_n_requests_in_flight(twin, tmp_path):
    summary = run_replay(make_plan(24, 8), [twin.url], "twin", tmp_path,
                         closed_loop_concurrency=4)
    rows = read_records(summary.records_path)
    assert summary.num_ok == 24
    events = sorted([(r["send_s"], 1) for r in rows] + [(r["finish_s"], -1) for r in rows])
    level, peak = 0, 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    assert peak == 4
    for r in rows:  # a user sends the moment its slot frees
        assert 0 <= r["send_s"] - r["intended_s"] < 0.005


def test_round_robin_over_endpoints_and_progress(twin, tmp_path):
    calls = []
    urls = [twin.url, twin.url + "/"]
    summary = run_replay(make_plan(6, 2, gap_s=0.01), urls, "twin", tmp_path,
                         progress=lambda *a: calls.append(a))
    rows = sorted(read_records(summary.records_path), key=lambda r: r["request_id"])
    assert [r["worker_id"] for r in rows] == [0, 1, 0, 1, 0, 1]
    assert [r["endpoint"] for r in rows[:2]] == urls
    assert calls[-1] == (6, 6, 0) and len(calls) == 6


def test_exporter_serves_the_load_generators_metrics(twin, tmp_path):
    async def main() -> str:
        r = Replay(make_plan(30, 20, gap_s=0.01), [twin.url], "twin", tmp_path,
                   exporter_port=0)
        task = asyncio.get_running_loop().create_task(r.run())
        while r._exporter is None or not r._exporter.url:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        import aiohttp

        async with aiohttp.ClientSession() as s, s.get(r._exporter.url) as resp:
            text = await resp.text()
        summary = await task
        assert summary.exporter_url == r._exporter.url
        return text

    text = asyncio.run(main())
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("servetwin_loadgen_requests", "servetwin_loadgen_inflight",
                 "servetwin_loadgen_tokens", "servetwin_loadgen_schedule_lag_seconds",
                 "servetwin_loadgen_ttft_seconds"):
        assert name in fams
    ok = [s.value for s in fams["servetwin_loadgen_requests"].samples
          if s.name.endswith("_total") and s.labels == {"status": "ok"}]
    assert ok and 0 < ok[0] < 30  # scraped mid-run


def test_cancelling_a_replay_records_the_requests_in_flight(twin, tmp_path):
    async def main() -> None:
        task = asyncio.get_running_loop().create_task(
            replay(make_plan(5, 400), [twin.url], "twin", tmp_path))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    rows = read_records(tmp_path / "records.jsonl")
    assert len(rows) == 5
    assert {r["error"] for r in rows} == {"cancelled"}
    assert all(0 < r["num_events"] < 400 for r in rows)  # streams were cut mid-way
    summary = json.loads((tmp_path / "replay_summary.json").read_text())
    assert summary["cancelled"] is True and summary["errors_by_kind"] == {"cancelled": 5}


CTRL_C_SCRIPT = """
import json, signal, sys
# a shell without job control starts background commands with SIGINT ignored, and the
# child inherits that (pytest launched with `&`, e.g. a CI script run in the background):
# Ctrl-C is what is tested here, so SIGINT gets Python's own handler back
signal.signal(signal.SIGINT, signal.default_int_handler)
from verify.loadgen import PlannedRequest, run_replay
# a request every 0.2 s, each streaming ~0.2 s: one is nearly always in flight; the
# replay would run 30 s, far past the interrupt
plan = [PlannedRequest(i, i * 0.2, list(range(100, 130)), 100) for i in range(150)]
s = run_replay(plan, [sys.argv[1]], "twin", sys.argv[2])
print(json.dumps(s.to_dict()))
"""


def test_ctrl_c_keeps_every_finished_record(twin, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT, twin.url, str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    records = tmp_path / "records.jsonl"
    seen = 0
    while time.monotonic() < t0 + 20 and seen < 3:  # wait until a few requests have finished
        seen = len(records.read_text().splitlines()) if records.exists() else 0
        time.sleep(0.02)
    waited = time.monotonic() - t0
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert seen >= 3, f"only {seen} records after {waited:.1f} s; stderr: {err[-2000:]}"
    summary = json.loads(out)
    rows = read_records(records)
    assert summary["cancelled"] is True, (summary, f"SIGINT after {waited:.1f} s", err[-2000:])
    assert summary["num_sent"] == len(rows) < 150
    ok = [r for r in rows if r["status"] == "ok"]
    cut = [r for r in rows if r["error"] == "cancelled"]
    assert len(ok) >= 3 and cut and len(ok) + len(cut) == len(rows)
    assert all(r["num_events"] == 100 for r in ok)


def test_replay_refuses_a_folder_that_holds_records(twin, tmp_path):
    (tmp_path / "records.jsonl").write_text("")
    with pytest.raises(InputError, match="already wrote records"):
        run_replay(make_plan(1, 1), [twin.url], "twin", tmp_path)


def test_an_unknown_client_or_a_url_that_is_not_http_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"client = 'curl': unknown.*raw, aiohttp"):
        Replay(make_plan(1, 1), ["http://127.0.0.1:1"], "m", tmp_path, client="curl")
    with pytest.raises(InputError, match="not an http"):
        Replay(make_plan(1, 1), ["unix:///tmp/sock"], "m", tmp_path)


def test_meta_names_the_http_client(twin, tmp_path):
    run_replay(make_plan(2, 2), [twin.url], "twin", tmp_path / "raw")
    run_replay(make_plan(2, 2), [twin.url], "twin", tmp_path / "aio", client="aiohttp")
    raw = json.loads((tmp_path / "raw" / "meta.json").read_text())["client"]
    aio = json.loads((tmp_path / "aio" / "meta.json").read_text())["client"]
    assert "verify/http1.py" in raw and "aiohttp" in aio


def test_extra_body_sets_and_drops_fields(twin, tmp_path):
    with pytest.raises(InputError, match="max_tokens"):
        run_replay(make_plan(1, 1), [twin.url], "twin", tmp_path, extra_body={"max_tokens": 3})
    summary = run_replay(make_plan(2, 3), [twin.url], "twin", tmp_path,
                         extra_body={"temperature": None, "cache_prompt": False})
    assert summary.num_ok == 2
    body = json.loads((tmp_path / "meta.json").read_text())["body_fields"]
    assert "temperature" not in body and body["cache_prompt"] is False


def test_connection_refused_is_a_record_not_a_crash(tmp_path):
    tw = TwinProcess("--step-ms", "1")
    url = tw.url
    tw.stop()
    summary = run_replay(make_plan(3, 2), [url], "twin", tmp_path)
    rows = read_records(summary.records_path)
    assert summary.num_error == 3 and summary.errors_by_kind == {"connect": 3}
    assert all(r["error"].startswith("connect: ") and r["http_status"] is None for r in rows)


@pytest.mark.parametrize(("event", "kind"), [
    (b'data: {"choices":[{"index":0,"text":"","finish_reason":null}]}', TOKEN),
    (b'data: {"choices": [{"index": 0, "text": "x"}]}', TOKEN),  # not compact JSON
    (b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}', OTHER),
    # llama-server's last chunk: empty text, finish_reason and usage, not a token
    (b'data: {"choices":[{"text":"","index":0,"finish_reason":"length"}],'
     b'"usage":{"completion_tokens":2}}', OTHER),
    (b": keep-alive\nevent: message\ndata: [DONE]", DONE),
])
def test_sse_events_are_classified_like_vllm_bench(event, kind):
    assert _parse_event(event)[0] == kind
