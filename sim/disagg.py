"""Disaggregated prefill/decode: a prefill pool, a decode pool, KV handoff over links.

A request arrives at the prefill pool's router and runs on a prefill worker
until it has its first token (``stop_at = 1``); that worker keeps its KV blocks
(``hold_kv``) until the handoff ends. The decode pool's router then picks a
decode worker, and the blocks that worker lacks (its prefix cache may already
hold part of the prompt) are sent over a link: bytes = tokens lacking x the
model's KV bytes per token. Transfers sharing a link share its bandwidth
(processor sharing, ``sim.links.Link``). When a transfer is delivered the
prefill worker frees the blocks and the request joins the decode worker's
queue with its prompt's KV present (``remote_kv_tokens``): admission there
waits for the transfer, allocates the prompt's blocks (caching the full ones)
and the request goes on decoding. This is the flow of vLLM's NixlConnector
behind NVIDIA Dynamo (vllm-project/vllm:vllm/distributed/kv_transfer/
kv_connector/v1/nixl_connector.py @ v0.33.0: the prefill side delays freeing
until the decode side has read; the decode side counts the transferred tokens
as computed), with the difference that the decode side allocates its blocks
when the transfer ends, not before it starts.

Link topologies (``LinkSpec.topology``): ``per_prefill`` — one link per prefill
worker (its NIC: everything it sends shares it), ``per_decode`` — one per
decode worker (its ingress), ``per_pair`` — one per (prefill, decode) pair,
``shared`` — one fabric for all. The bytes of a transfer are decided when it
starts; blocks the decode side evicts before admission are not sent again
(they are few: the transfer is short next to a cache's lifetime).

Timing of the handoff joins the cluster's event order at priority
``TRANSFER_PRIORITY``: after arrivals, before scheduling decisions, so a
delivery at time t is seen by the decode worker's decision at t, in both
step-by-step and fast-forward mode.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import simpy

from .cluster import Cluster, _at
from .engines.vllm import VllmEngine
from .links import Link, Transfer
from .request import Request
from .router import Router
from .workload import ClosedLoop, Trace

TRANSFER_PRIORITY = 1.5
TOPOLOGIES = ("per_prefill", "per_decode", "per_pair", "shared")


@dataclass(frozen=True)
class LinkSpec:
    bandwidth_bytes_per_s: float
    latency_s: float = 0.0
    topology: str = "per_prefill"

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"link topology {self.topology!r}: one of {', '.join(TOPOLOGIES)}")


@dataclass
class Handoff:
    request_id: int
    prefill_worker: int
    decode_worker: int
    link: str
    nbytes: float
    start_s: float
    end_s: float = float("nan")


class DisaggCluster(Cluster):
    """Workers 0..P-1 prefill, P..P+D-1 decode; ``engines`` in that order. Arrivals,
    closed loops, progress and the run itself are the ``Cluster``'s; routing and
    completion are per phase."""

    def __init__(self, prefill_engines: Sequence[VllmEngine],
                 decode_engines: Sequence[VllmEngine], prefill_router: Router,
                 decode_router: Router, trace: Trace, dense_hash_ids: np.ndarray,
                 link: LinkSpec, kv_bytes_per_token: float,
                 closed_loop: ClosedLoop | None = None,
                 progress: Callable[[int, int], None] | None = None) -> None:
        super().__init__([*prefill_engines, *decode_engines], prefill_router, trace,
                         dense_hash_ids, closed_loop, progress)
        self.num_prefill = len(prefill_engines)
        self.num_decode = len(decode_engines)
        self.prefill_router = prefill_router
        self.decode_router = decode_router
        self.link_spec = link
        self.kv_bytes_per_token = float(kv_bytes_per_token)
        self.handoffs: list[Handoff] = []
        self.links: dict[str, Link] = {}
        self._link_gen: dict[str, int] = {}
        self._gens = itertools.count(1)

    def _pick(self, router: Router, req: Request, lo: int, hi: int, now: float) -> int:
        workers = self.workers[lo:hi]
        if router.state_dependent:
            for w in workers:
                w.sync(now)
        return lo + router.choose(req, self.engines[lo:hi])

    def _route(self, req: Request, now: float, parked: bool = False) -> None:
        req.stop_at = 1
        req.hold_kv = True
        w = self._pick(self.prefill_router, req, 0, self.num_prefill, now)
        self.workers[w].submit(req, now)

    # ------------------------------------------------------------- handoff
    def on_done(self, req: Request, now: float) -> None:
        """A worker finished (or refused) a request: a prefill ends in a handoff."""
        if req.hold_kv and not req.reject_reason and req.worker_id < self.num_prefill:
            self._handoff(req, now)
            return
        self._finished(req, now)

    def _handoff(self, req: Request, now: float) -> None:
        p = req.worker_id
        req.hold_kv = False
        self._router_done(self.prefill_router, req, now)  # its prefill load is gone
        # the first token came from the prefill worker: keep its time, not its step
        req.pre_token_times = [req.first_token_s]
        req.token_steps = []
        # the decode pool may use another block size: its own layout and lookup
        req.layout = None
        req.hashed_end = 0
        req.prev_blocks = req.prev_stamps = None
        if req.num_output >= req.max_output_tokens:
            cast(VllmEngine, self.engines[p]).release(req)  # one output token: no decode
            req.finish_s = now
            self._finished(req, now)
            return
        d = self._pick(self.decode_router, req, self.num_prefill, self.num_workers, now)
        # the decode worker's cache as of now (a fast-forward run takes its blocks late)
        self.workers[d].sync_kv(now)
        lacking = cast(VllmEngine, self.engines[d]).lacking_tokens(req)  # P/D: vLLM pools
        nbytes = lacking * self.kv_bytes_per_token
        name = self._link_name(p, d)
        link = self.links.get(name)
        if link is None:
            link = self.links[name] = Link(self.link_spec.bandwidth_bytes_per_s,
                                           self.link_spec.latency_s)
        hand = Handoff(req.rid, p, d, name, nbytes, now)
        self.handoffs.append(hand)
        link.start(now, nbytes, (req, hand))
        self._arm_link(name, now)

    def _link_name(self, p: int, d: int) -> str:
        topo = self.link_spec.topology
        if topo == "per_prefill":
            return f"prefill{p}"
        if topo == "per_decode":
            return f"decode{d - self.num_prefill}"
        if topo == "per_pair":
            return f"prefill{p}->decode{d - self.num_prefill}"
        return "fabric"

    def _arm_link(self, name: str, now: float) -> None:
        nxt = self.links[name].next_completion()
        if nxt is None:
            return
        gen = next(self._gens)
        self._link_gen[name] = gen
        _at(self.env, max(nxt[0], now), TRANSFER_PRIORITY, self._on_link, (name, gen))

    def _on_link(self, ev: simpy.Event) -> None:
        name, gen = ev._value
        if self._link_gen.get(name) != gen:
            return  # a later start re-armed this link
        self.counter.events += 1
        now = self.env.now
        for tr in self.links[name].advance(now):
            self._deliver(tr, now)
        self._arm_link(name, now)

    def _deliver(self, tr: Transfer, now: float) -> None:
        req, hand = tr.tag
        hand.end_s = now
        self.engines[hand.prefill_worker].release(req)
        req.remote_kv_tokens = req.prompt_tokens
        req.stop_at = req.max_output_tokens
        self.workers[hand.decode_worker].submit(req, now)

    # ----------------------------------------------------------------- end
    def _finished(self, req: Request, now: float) -> None:
        # the prefill router's hook runs in Cluster.on_done (self.router); routers
        # forget requests they never saw
        self._router_done(self.decode_router, req, now)
        super().on_done(req, now)

    @staticmethod
    def _router_done(router: Router, req: Request, now: float) -> None:
        hook = getattr(router, "on_done", None)
        if hook is not None:
            hook(req, now)

    # -------------------------------------------------------------- report
    def link_summary(self, t0: float, t1: float) -> dict[str, Any]:
        """Per link: busy fraction and bytes over [t0, t1], transfers and their times."""
        out: dict[str, Any] = {}
        by_link: dict[str, list[Handoff]] = {}
        for h in self.handoffs:
            by_link.setdefault(h.link, []).append(h)
        for name, link in sorted(self.links.items()):
            hs = by_link.get(name, [])
            dur = np.array([h.end_s - h.start_s for h in hs])
            end = min(t1, link.now)
            util = link.utilisation(t0, end) if end > t0 else None
            out[name] = {
                "num_transfers": len(hs),
                "bytes": float(sum(h.nbytes for h in hs)),
                "busy_fraction": util.busy_fraction if util else 0.0,
                "transfer_s_mean": float(dur.mean()) if dur.size else float("nan"),
                "transfer_s_p99": float(np.percentile(dur, 99)) if dur.size else float("nan"),
            }
        return out
