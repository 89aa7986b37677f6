"""Start an engine process, wait until it serves, and always take it down again.

Each engine runs in its own session (a new process group), so stopping it reaches the
children it spawns (vLLM's EngineCore and workers, SGLang's scheduler and detokenizer):
SIGTERM to the group, a grace period, then SIGKILL to whatever is left. `Deployment` is a
context manager, and `teardown_on_signals` turns SIGTERM into the same unwinding as
Ctrl-C, so an error, Ctrl-C or a kill of the harness leaves no engine holding a GPU.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import FrameType, TracebackType

from sim.errors import ServetwinError

from .engines import LaunchSpec


class DeployError(ServetwinError):
    """An engine that would not start or serve; the message carries its log's tail."""


def log_tail(path: Path, lines: int = 15) -> str:
    """The log's last lines, led by the first line that names an exception (an engine's
    root cause is usually far above the tail of its shutdown noise)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    all_lines = [ln for ln in text.splitlines() if ln.strip()]
    tail = all_lines[-lines:]
    cause = next((ln.strip() for ln in all_lines
                  if re.search(r"\b\w*(Error|Exception)\b: ", ln)), None)
    head = [f"first error: {cause}"] if cause else []
    return "\n    ".join(head + tail) if tail else "(log is empty)"


class Deployment:
    """One engine process (group) with a log file."""

    def __init__(self, spec: LaunchSpec, log_path: Path, ready_timeout_s: float = 300.0,
                 stop_grace_s: float = 20.0) -> None:
        self.spec = spec
        self.log_path = Path(log_path)
        self.ready_timeout_s = ready_timeout_s
        self.stop_grace_s = stop_grace_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s = float("nan")  # seconds from launch to a healthy /health

    @property
    def pgid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.spec.env}
        with open(self.log_path, "ab") as log:
            log.write(f"# {' '.join(self.spec.argv)}\n".encode())
            log.flush()
            try:
                self.proc = subprocess.Popen(self.spec.argv, stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)
            except OSError as e:
                raise DeployError(f"{self.spec.engine}: cannot start {self.spec.argv[0]!r} "
                                  f"({e.strerror or e}). Fix: install the engine or point "
                                  "--engine-python / --llama-server at it") from None
        if self.spec.cpus:
            # pinned like the nice value below: the leader before it forks its workers
            try:
                os.sched_setaffinity(self.proc.pid, self.spec.cpus)
                for pid in group_members(self.proc.pid):  # any it forked already
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(pid, self.spec.cpus)
            except OSError as e:
                self.stop()
                raise DeployError(f"{self.spec.engine}: cannot pin to CPU(s) "
                                  f"{list(self.spec.cpus)} ({e.strerror or e}). Fix: give "
                                  "--engine-cpus from this machine's processors") from None
        if self.spec.nice:
            # the leader is reniced before it forks its workers (they inherit the value)
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, self.proc.pid,
                               os.getpriority(os.PRIO_PROCESS, 0) + self.spec.nice)

    def wait_ready(self) -> float:
        """Block until /health answers 200; the seconds it took."""
        assert self.proc is not None
        t0 = time.monotonic()
        deadline = t0 + self.ready_timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise DeployError(f"{self.spec.engine} exited with code {code} before it "
                                  f"became healthy; log {self.log_path}:\n    "
                                  f"{log_tail(self.log_path)}")
            if health_ok(self.spec.health_url):
                self.ready_s = time.monotonic() - t0
                if self.spec.core_cpus:
                    self._pin_engine_core()
                return self.ready_s
            if time.monotonic() > deadline:
                raise DeployError(f"{self.spec.engine} did not become healthy at "
                                  f"{self.spec.health_url} within {self.ready_timeout_s:.0f} s; "
                                  f"log {self.log_path}:\n    {log_tail(self.log_path)}\n"
                                  "Fix: read the log; raise --ready-timeout for slow starts")
            time.sleep(0.25)

    def _pin_engine_core(self) -> None:
        """Every thread of vLLM's EngineCore process (its title ``VLLM::EngineCore``) onto
        spec.core_cpus: it serves, so its threads are up; a thread it starts later
        inherits the pin of the thread that starts it."""
        assert self.proc is not None
        cores = [p for p in group_members(self.proc.pid) if _comm(p).startswith(CORE_TITLE)]
        if not cores:
            self.stop()
            raise DeployError(f"{self.spec.engine}: no {CORE_TITLE} process to pin to CPU(s) "
                              f"{list(self.spec.core_cpus)} among the engine's processes. "
                              "Fix: --engine-core-cpus applies to vLLM V1, which runs its "
                              "engine loop in a process of that name; leave it out otherwise")
        try:
            for pid in cores:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with contextlib.suppress(ProcessLookupError):
                        os.sched_setaffinity(int(tid), self.spec.core_cpus)
        except OSError as e:
            self.stop()
            raise DeployError(f"{self.spec.engine}: cannot pin {CORE_TITLE} to CPU(s) "
                              f"{list(self.spec.core_cpus)} ({e.strerror or e}). Fix: give "
                              "--engine-core-cpus from this machine's processors") from None

    def stop(self) -> None:
        """SIGTERM the group, wait, SIGKILL what is left. Idempotent."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        _signal_group(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=self.stop_grace_s)
        # children may outlive the leader: wait for the whole group, then kill it
        deadline = time.monotonic() + self.stop_grace_s
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_members(pgid):
            _signal_group(pgid, signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5.0)

    def __enter__(self) -> Deployment:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def health_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# vLLM V1 names its engine loop's process so (setproctitle; /proc/PID/comm keeps 15 bytes)
CORE_TITLE = "VLLM::EngineCor"


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # fields after the ")" that ends the command name: state ppid pgrp ...
        rest = stat[stat.rfind(")") + 2:].split()
        if len(rest) >= 3 and rest[0] != "Z" and int(rest[2]) == pgid:
            out.append(int(entry))
    return out


@contextlib.contextmanager
def teardown_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM (and SIGHUP) raise KeyboardInterrupt, so `with Deployment`
    blocks unwind and stop their engines exactly as on Ctrl-C."""

    def raise_interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    old = {s: signal.signal(s, raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
