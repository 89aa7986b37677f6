"""The load generator against a misbehaving server: every fault is a real twin server
process (--fault-* flags) or a real kill. Each test checks the per-request reasons,
that every finished record is on disk, that the summary counts them, and that no child
process is left behind."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from verify.loadgen import PlannedRequest, ReplaySummary, run_replay
from verify.records import read_records
from verify.twin_server import TwinProcess, is_faulty


def live_children() -> list[int]:
    """Pids of this process's children that are still running (zombies excluded)."""
    me = os.getpid()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == me and state != "Z":
            out.append(int(d.name))
    return out


def plan(n: int = 8, max_tokens: int = 6, gap_s: float = 0.005) -> list[PlannedRequest]:
    return [PlannedRequest(i, i * gap_s, list(range(50 + i, 80 + i)), max_tokens)
            for i in range(n)]


@pytest.fixture(params=["raw", "aiohttp"])
def client(request: pytest.FixtureRequest) -> str:
    """Each fault through both of the load generator's HTTP clients."""
    return str(request.param)


def replay_against(flags: list[str], tmp_path: Path, client: str, **kwargs: object
                   ) -> tuple[ReplaySummary, dict[int, dict]]:
    with TwinProcess("--step-ms", "2", *flags) as tw:
        summary = run_replay(plan(), [tw.url], "twin", tmp_path, client=client,
                             **kwargs)  # type: ignore[arg-type]
    assert tw.proc.returncode == 0
    assert live_children() == []
    rows = {r["request_id"]: r for r in read_records(summary.records_path)}
    assert len(rows) == summary.num_sent == summary.num_planned == 8
    assert summary.num_ok + summary.num_error == 8
    assert summary.num_ok == sum(r["status"] == "ok" for r in rows.values())
    # odd request ids (fault fraction 0.5 on their x-request-id) fail, even ones are fine
    for rid, r in rows.items():
        if is_faulty(rid, 0.5):
            assert r["status"] == "error" and r["error"], r
        else:
            assert r["status"] == "ok" and r["num_events"] == 6 and r["error"] is None, r
    return summary, rows


def failed(rows: dict[int, dict]) -> list[dict]:
    return [r for rid, r in sorted(rows.items()) if is_faulty(rid, 0.5)]


def test_connection_reset_mid_stream(tmp_path, client):
    summary, rows = replay_against(["--fault-reset-after-events", "3"], tmp_path, client)
    assert summary.errors_by_kind == {"connection reset": 4}
    for r in failed(rows):
        assert r["error"].startswith("connection reset: after 3 events")
        assert r["num_events"] == 3 and len(r["event_times_s"]) == 3


def test_stalled_stream_times_out(tmp_path, client):
    t = time.perf_counter()
    summary, rows = replay_against(["--fault-stall-after-events", "2"], tmp_path, client,
                                   stall_timeout_s=0.3)
    assert time.perf_counter() - t < 5
    assert summary.errors_by_kind == {"timeout": 4}
    for r in failed(rows):
        assert r["error"] == "timeout: no event for 0.3 s (after 2 events)"
        assert r["num_events"] == 2
        assert 0.3 <= r["finish_s"] - r["event_times_s"][-1] < 1.0


def test_malformed_sse_line(tmp_path, client):
    summary, rows = replay_against(["--fault-malformed-sse"], tmp_path, client)
    assert summary.errors_by_kind == {"malformed SSE": 4}
    for r in failed(rows):
        assert r["error"].startswith("malformed SSE: event 2: ")
        assert '"te' in r["error"] and r["num_events"] == 1


@pytest.mark.parametrize("code", [503, 429])
def test_http_error_status(tmp_path, code, client):
    summary, rows = replay_against(["--fault-status", str(code)], tmp_path, client)
    assert summary.errors_by_kind == {f"HTTP {code}": 4}
    for r in failed(rows):
        assert r["http_status"] == code and r["num_events"] == 0
        assert r["error"].startswith(f"HTTP {code}: ")
        assert f"fault injection: HTTP {code}" in r["error"]


def test_usage_mismatch_keeps_the_timings(tmp_path, client):
    summary, rows = replay_against(["--fault-wrong-usage"], tmp_path, client)
    assert summary.errors_by_kind == {"usage mismatch": 4}
    for r in failed(rows):
        assert r["error"] == "usage mismatch: completion_tokens 5 != 6 expected"
        assert r["num_events"] == 6 and r["first_token_s"] is not None


def test_never_healthy(tmp_path):
    with TwinProcess("--fault-never-healthy") as tw:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(tw.url + "/health", timeout=10)
        assert e.value.code == 503
        assert "fault injection" in json.loads(e.value.read())["status"]
    assert live_children() == []


def test_server_killed_mid_replay(tmp_path, client):
    """SIGKILL while streams are open: finished records stay, open streams end as
    connection resets, later requests as refused connections, and the replay returns."""
    tw = TwinProcess("--step-ms", "5")
    # two quick requests, then long ones (100 tokens x 5 ms), then more after the kill
    reqs = [PlannedRequest(i, 0.01 * i, list(range(10, 40)), 2 if i < 2 else 100)
            for i in range(6)]
    reqs += [PlannedRequest(6 + i, 0.8 + 0.05 * i, list(range(10, 40)), 5) for i in range(4)]
    killer = threading.Timer(0.4, tw.kill)
    killer.start()
    t = time.perf_counter()
    summary = run_replay(reqs, [tw.url], "twin", tmp_path, stall_timeout_s=10,
                         client=client)
    killer.join()
    tw.stop()
    assert time.perf_counter() - t < 5
    assert tw.proc.returncode == -9 and live_children() == []
    rows = {r["request_id"]: r for r in read_records(summary.records_path)}
    assert len(rows) == summary.num_sent == 10
    assert [rows[i]["status"] for i in (0, 1)] == ["ok", "ok"]
    for i in range(2, 6):
        assert rows[i]["error"].startswith("connection reset: "), rows[i]
        assert 0 < rows[i]["num_events"] < 100
    for i in range(6, 10):
        assert rows[i]["error"].startswith("connect: "), rows[i]
    assert summary.num_ok == 2
    assert summary.errors_by_kind == {"connection reset": 4, "connect": 4}
