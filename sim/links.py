"""Shared links with processor sharing: KV transfers between nodes.

A ``Link`` has a bandwidth and a latency. Transfers start at arbitrary times and
the ones sending at once share the bandwidth equally (processor sharing, the
fluid model of fair TCP/RDMA flows). Progress is piecewise linear, so completion
times are exact: they are recomputed at every start and every send end.

Virtual time. ``V(t)`` is the bytes one transfer has been sent since some origin:
dV/dt = bandwidth / (number sending). A transfer of ``n`` bytes started at V0
ends sending when V = V0 + n; the transfers' order never changes, so a heap of
end-V values gives the next one, and its wall time is
``t_now + (V_end - V_now) * num_sending / bandwidth``::

    10 GB/s, A = 10 GB at t=0, B = 5 GB at t=0.5
    t  0 ------ 0.5 ------------ 1.5
    A  10 GB/s  |  5 GB/s          |  A: 5 GB + 1.0 s x 5 GB/s = 10 GB
    B           |  5 GB/s          |  B: 1.0 s x 5 GB/s = 5 GB

Latency is propagation: a transfer is delivered ``latency_s`` after its last
byte is sent, and it stops taking bandwidth when sending ends.

Use from a simpy process: after each ``start`` (and after each completion) ask
``next_completion()`` and wait until that time, then ``advance(t)``, which returns
the transfers delivered by ``t``. A start at an earlier time than a pending
completion simply moves that completion later; a process that waits on a stale
time calls ``advance`` and gets nothing, then asks again. No simpy needed here.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple


@dataclass(slots=True)
class Transfer:
    transfer_id: int
    tag: Any
    nbytes: float
    start_s: float
    send_end_s: float = float("nan")
    finish_s: float = float("nan")  # delivered: send end + latency


class Utilisation(NamedTuple):
    busy_fraction: float  # time with at least one transfer sending / (t1 - t0)
    bytes_moved: float


class Link:
    def __init__(self, bandwidth_bytes_per_s: float, latency_s: float = 0.0) -> None:
        if not bandwidth_bytes_per_s > 0:
            raise ValueError(f"bandwidth_bytes_per_s = {bandwidth_bytes_per_s}: must be > 0")
        if not latency_s >= 0:
            raise ValueError(f"latency_s = {latency_s}: must be >= 0")
        self.bandwidth_bytes_per_s = float(bandwidth_bytes_per_s)
        self.latency_s = float(latency_s)
        self.now = 0.0
        self._v = 0.0  # virtual time at self.now
        self._sending: list[tuple[float, int]] = []  # heap of (end V, id)
        self._in_flight: list[tuple[float, int]] = []  # heap of (finish_s, id): sent, not delivered
        self.transfers: dict[int, Transfer] = {}
        self._ids = itertools.count()
        self._busy: list[list[float]] = []  # [start, end] intervals with something sending

    # ------------------------------------------------------------------- api
    def start(self, t: float, nbytes: float, tag: Any = None) -> int:
        """Begin sending ``nbytes`` at time ``t`` (not before the link's clock)."""
        if nbytes < 0:
            raise ValueError(f"nbytes = {nbytes}: must be >= 0")
        self._run_to(t)
        tid = next(self._ids)
        tr = Transfer(tid, tag, float(nbytes), t)
        self.transfers[tid] = tr
        if nbytes == 0:
            self._sent(tr, t)
        else:
            if not self._sending:
                self._busy.append([t, t])
            heapq.heappush(self._sending, (self._v + nbytes, tid))
        return tid

    def next_completion(self) -> tuple[float, int] | None:
        """(time, id) of the next delivery not handed over by ``advance``, if nothing
        else starts, or None (the time may precede the clock: see ``advance``)."""
        best: tuple[float, int] | None = self._in_flight[0] if self._in_flight else None
        if self._sending:
            v_end, tid = self._sending[0]
            t = self._send_end_time(v_end) + self.latency_s
            if best is None or (t, tid) < best:
                best = (t, tid)
        return best

    def advance(self, t: float) -> list[Transfer]:
        """Move the clock to ``t`` (if later) and hand over the transfers delivered by
        ``t`` not handed over yet, in delivery order. Deliveries that fell due while
        ``start`` moved the clock are kept until asked for, so ``t`` may lie before
        the clock (it then only hands over)."""
        if t > self.now:
            self._run_to(t)
        out = []
        while self._in_flight and self._in_flight[0][0] <= t:
            out.append(self.transfers[heapq.heappop(self._in_flight)[1]])
        return out

    @property
    def num_sending(self) -> int:
        return len(self._sending)

    def utilisation(self, t0: float, t1: float) -> Utilisation:
        """Busy fraction and bytes sent over [t0, t1] (``t1`` not past the clock).
        Processor sharing is work-conserving: busy means the full bandwidth is used."""
        if not t0 < t1 <= self.now:
            raise ValueError(f"utilisation({t0}, {t1}): need t0 < t1 <= now ({self.now})")
        busy = 0.0
        for a, b in self._busy:  # the open interval already ends at self.now
            busy += max(0.0, min(b, t1) - max(a, t0))
        return Utilisation(busy / (t1 - t0), busy * self.bandwidth_bytes_per_s)

    # -------------------------------------------------------------- internals
    def _send_end_time(self, v_end: float) -> float:
        return self.now + (v_end - self._v) * len(self._sending) / self.bandwidth_bytes_per_s

    def _run_to(self, t: float) -> None:
        """Process send ends up to ``t`` (each changes the share), then move to ``t``."""
        if t < self.now:
            raise ValueError(f"time {t} is before the link's clock {self.now}")
        while self._sending:
            v_end, tid = self._sending[0]
            t_end = self._send_end_time(v_end)
            if t_end > t:
                break
            heapq.heappop(self._sending)
            self.now, self._v = t_end, v_end
            self._sent(self.transfers[tid], t_end)
            if not self._sending:
                self._busy[-1][1] = t_end
        if self._sending:
            self._v += (t - self.now) * self.bandwidth_bytes_per_s / len(self._sending)
            self._busy[-1][1] = t
        self.now = t

    def _sent(self, tr: Transfer, t: float) -> None:
        tr.send_end_s = t
        tr.finish_s = t + self.latency_s
        heapq.heappush(self._in_flight, (tr.finish_s, tr.transfer_id))


class Topology:
    """Named links: one per (source, destination) pair, or one shared fabric that
    several pairs map onto. ``route[(src, dst)]`` names the link a pair uses."""

    def __init__(self) -> None:
        self.links: dict[str, Link] = {}
        self.route: dict[tuple[str, str], str] = {}

    def add_link(self, name: str, bandwidth_bytes_per_s: float, latency_s: float = 0.0,
                 pairs: Iterable[tuple[str, str]] = ()) -> Link:
        if name in self.links:
            raise ValueError(f"link {name!r} already exists")
        link = self.links[name] = Link(bandwidth_bytes_per_s, latency_s)
        for pair in pairs:
            self.route[pair] = name
        return link

    @classmethod
    def per_pair(cls, sources: Iterable[str], destinations: Iterable[str],
                 bandwidth_bytes_per_s: float, latency_s: float = 0.0) -> Topology:
        topo = cls()
        dsts = list(destinations)
        for s in sources:
            for d in dsts:
                topo.add_link(f"{s}->{d}", bandwidth_bytes_per_s, latency_s, [(s, d)])
        return topo

    @classmethod
    def shared_fabric(cls, sources: Iterable[str], destinations: Iterable[str],
                      bandwidth_bytes_per_s: float, latency_s: float = 0.0) -> Topology:
        topo = cls()
        dsts = list(destinations)
        topo.add_link("fabric", bandwidth_bytes_per_s, latency_s,
                      [(s, d) for s in sources for d in dsts])
        return topo

    def start(self, t: float, src: str, dst: str, nbytes: float,
              tag: Any = None) -> tuple[str, int]:
        name = self.route[(src, dst)]
        return name, self.links[name].start(t, nbytes, tag)

    def next_completion(self) -> tuple[float, str, int] | None:
        best: tuple[float, str, int] | None = None
        for name, link in self.links.items():
            nxt = link.next_completion()
            if nxt is not None and (best is None or (nxt[0], name, nxt[1]) < best):
                best = (nxt[0], name, nxt[1])
        return best

    def advance(self, t: float) -> list[tuple[str, Transfer]]:
        out = [(name, tr) for name, link in self.links.items() for tr in link.advance(t)]
        out.sort(key=lambda x: (x[1].finish_s, x[0], x[1].transfer_id))
        return out
