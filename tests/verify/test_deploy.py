"""Engine processes: readiness, errors with the log's tail, and no orphan left behind.

The "engines" here are real processes serving real HTTP on loopback (a few lines of
http.server), with children of their own, so process-group teardown is exercised for real.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from verify.deploy import DeployError, Deployment, group_members
from verify.engines import LaunchSpec

SERVER = textwrap.dedent("""
    import http.server, os, signal, subprocess, sys
    status = int(sys.argv[2])
    if sys.argv[3] == "stubborn-child":
        # a child that ignores SIGTERM, as a hung worker would
        subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    elif sys.argv[3] == "child":
        subprocess.Popen(["sleep", "600"])
    elif sys.argv[3] == "core-child":
        # named as vLLM V1 names its engine loop's process, with a second thread
        subprocess.Popen([sys.executable, "-c",
            "import threading, time; open('/proc/self/comm', 'w').write('VLLM::EngineCore'); "
            "threading.Thread(target=time.sleep, args=(600,), daemon=True).start(); "
            "time.sleep(600)"])
        import time; time.sleep(0.5)  # named before /health answers
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass
    print("engine starting", flush=True)
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spec(tmp_path: Path, status: int = 200, mode: str = "child", argv: list[str] | None = None
         ) -> LaunchSpec:
    script = tmp_path / "engine.py"
    script.write_text(SERVER)
    port = free_port()
    return LaunchSpec("vllm", argv or [sys.executable, str(script), str(port), str(status), mode],
                      {}, "127.0.0.1", port, "m")


def test_ready_engine_and_its_children_are_gone_after_the_block(tmp_path: Path) -> None:
    d = Deployment(spec(tmp_path), tmp_path / "e.log", ready_timeout_s=30)
    with d:
        assert d.ready_s < 30
        pgid = d.pgid
        assert pgid is not None
        assert len(group_members(pgid)) == 2  # the server and its sleep child
    assert group_members(pgid) == []
    assert "engine starting" in (tmp_path / "e.log").read_text()


def test_a_child_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    d = Deployment(spec(tmp_path, mode="stubborn-child"), tmp_path / "e.log", stop_grace_s=1.0)
    with d:
        pgid = d.pgid
        assert pgid is not None
        time.sleep(0.3)  # let the child install its handler
    assert group_members(pgid) == []


def test_never_healthy_engine_times_out_with_log_tail_and_is_stopped(tmp_path: Path) -> None:
    d = Deployment(spec(tmp_path, status=503), tmp_path / "e.log", ready_timeout_s=2.0)
    with pytest.raises(DeployError) as e, d:
        pass
    msg = str(e.value)
    assert "did not become healthy" in msg and "within 2 s" in msg
    assert "engine starting" in msg  # the log's tail
    assert "Fix:" in msg
    assert d.pgid is not None and group_members(d.pgid) == []


def test_engine_that_exits_reports_code_and_log(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('CUDA out of memory'); sys.exit(3)"]
    d = Deployment(spec(tmp_path, argv=argv), tmp_path / "e.log", ready_timeout_s=30)
    with pytest.raises(DeployError, match=r"(?s)exited with code 3.*CUDA out of memory"), d:
        pass


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    d = Deployment(spec(tmp_path, argv=["/nonexistent/llama-server"]), tmp_path / "e.log")
    with pytest.raises(DeployError, match=r"cannot start '/nonexistent/llama-server'.*Fix"), d:
        pass


def test_sigterm_to_the_harness_tears_the_engine_down(tmp_path: Path) -> None:
    engine = spec(tmp_path)
    harness = tmp_path / "harness.py"
    harness.write_text(textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from verify.deploy import Deployment, teardown_on_signals
        from verify.engines import LaunchSpec
        spec = LaunchSpec("vllm", {engine.argv!r}, {{}}, "127.0.0.1", {engine.port}, "m")
        try:
            with teardown_on_signals(), Deployment(spec, Path({str(tmp_path / 'h.log')!r})) as d:
                print(d.pgid, flush=True)
                time.sleep(600)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """))
    p = subprocess.Popen([sys.executable, str(harness)], stdout=subprocess.PIPE, text=True,
                         cwd=Path(__file__).resolve().parents[2],
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert p.stdout is not None
    pgid = int(p.stdout.readline())
    assert group_members(pgid)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert "interrupted" in out
    assert group_members(pgid) == []


def test_nice_engine_runs_at_lower_priority_children_included(tmp_path: Path) -> None:
    s = spec(tmp_path)
    s = LaunchSpec(s.engine, s.argv, s.env, s.host, s.port, s.served_model_name, nice=7)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    with Deployment(s, tmp_path / "e.log") as d:
        assert d.pgid is not None
        members = group_members(d.pgid)
        assert len(members) == 2
        assert {os.getpriority(os.PRIO_PROCESS, p) for p in members} == {base + 7}


def test_pinned_engine_runs_on_its_processors_children_included(tmp_path: Path) -> None:
    cpu = min(os.sched_getaffinity(0))
    s = spec(tmp_path)
    s = LaunchSpec(s.engine, s.argv, s.env, s.host, s.port, s.served_model_name, cpus=(cpu,))
    with Deployment(s, tmp_path / "e.log") as d:
        assert d.pgid is not None
        members = group_members(d.pgid)
        assert len(members) == 2
        assert all(os.sched_getaffinity(p) == {cpu} for p in members)


def test_engine_core_moves_to_its_own_processors_once_serving(tmp_path: Path) -> None:
    """--engine-core-cpus: every thread of the process titled VLLM::EngineCore goes to
    its processors once the engine serves; the other processes keep the engine's."""
    have = sorted(os.sched_getaffinity(0))
    main, core = have[0], have[-1]
    s = spec(tmp_path, mode="core-child")
    s = LaunchSpec(s.engine, s.argv, s.env, s.host, s.port, s.served_model_name,
                   cpus=(main,), core_cpus=(core,))
    with Deployment(s, tmp_path / "e.log") as d:
        assert d.pgid is not None
        members = group_members(d.pgid)
        assert len(members) == 2
        titled = [p for p in members if Path(f"/proc/{p}/comm").read_text().strip()
                  == "VLLM::EngineCor"]
        assert len(titled) == 1
        threads = os.listdir(f"/proc/{titled[0]}/task")
        assert len(threads) == 2
        assert all(os.sched_getaffinity(int(t)) == {core} for t in threads)
        assert os.sched_getaffinity(d.pgid) == {main}
    assert group_members(d.pgid) == []


def test_engine_core_pin_without_an_engine_core_is_a_clear_error(tmp_path: Path) -> None:
    s = spec(tmp_path)
    cpu = min(os.sched_getaffinity(0))
    s = LaunchSpec(s.engine, s.argv, s.env, s.host, s.port, s.served_model_name,
                   core_cpus=(cpu,))
    d = Deployment(s, tmp_path / "e.log")
    with pytest.raises(DeployError, match="no VLLM::EngineCor process"), d:
        pass
    assert d.pgid is not None and group_members(d.pgid) == []


def test_processor_lists() -> None:
    from servetwin.verify_cmd import cpu_list
    from sim.errors import InputError

    have = sorted(os.sched_getaffinity(0))
    assert cpu_list(None, "--engine-cpus") == ()
    assert cpu_list(str(have[0]), "--engine-cpus") == (have[0],)
    assert cpu_list(f"{have[0]}-{have[-1]}", "--engine-cpus") == tuple(range(have[0],
                                                                             have[-1] + 1))
    with pytest.raises(InputError, match="not a processor list"):
        cpu_list("one", "--engine-cpus")
    with pytest.raises(InputError, match="not among"):
        cpu_list(str(max(have) + 1000), "--loadgen-cpus")
