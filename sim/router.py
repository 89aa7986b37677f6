"""Routers: which worker gets an arriving request.

A router is a class registered under a ``kind``; the scenario's
``router: {kind: ..., <params>}`` selects it and the cluster builds it as
``cls(num_workers, rng, **params)``. ``choose(req, engines) -> worker`` runs at the
request's arrival (so ``req.arrival_s`` is the routing time). Routers that read
engine state set ``state_dependent`` so the cluster brings every worker up to the
current time before asking. A router may define ``on_done(req, now)``: the cluster
calls it when a request finishes or is refused (routers keep their own in-flight
accounting with it; routers without it are fine).

With a planner the fleet changes: the cluster builds the router for the most
workers it may ever have and passes ``candidates`` (the ready workers' indices,
ascending) to ``choose``; a router must then pick one of them. Every built-in
router accepts ``candidates``; a user router that does not cannot run with a
planner (the cluster says so before the run).

Engine state is read only through ``worker_view`` (one branch per engine type).

Adding a router, and a KV-aware cost function (``router: {kind: kv_aware, cost: ...}``)::

    @ROUTERS.register("shortest_prompt_first_worker")
    class Mine:
        state_dependent = False
        def __init__(self, num_workers, rng, bias: float = 0.0): ...
        def choose(self, req, engines) -> int: ...

    @COST_FUNCTIONS.register("prefill_only")
    def prefill_only(c: CostInputs) -> np.ndarray:
        return c.overlap_score_weight * c.prefill_blocks
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

from .engines.sglang import SglangEngine
from .engines.vllm import VllmEngine
from .errors import ScenarioError
from .kv import KeyEventView, KeyPresence, PrefixLayout
from .radix import request_segments
from .registry import Registry
from .request import Request


class Router(Protocol):
    state_dependent: bool

    def choose(self, req: Request, engines: Sequence[Any],
               candidates: Sequence[int] | None = None) -> int: ...


ROUTERS: Registry[type] = Registry("router")


# ---------------------------------------------------------------- engine adapter
@dataclass(frozen=True, slots=True)
class WorkerView:
    """What a router may read of one worker's engine, whatever the engine type."""

    waiting: Sequence[Request]
    running: Sequence[Request]
    hash_block_tokens: int
    block_size: int
    # prompt tokens of a request that the worker's prefix cache holds now; the dict
    # memoises per-request work shared by workers of the same block size
    cached_tokens: Callable[[Request, dict[Any, Any]], int]


class _SyncedRunning(Sequence[Request]):
    """A vLLM engine's running list whose requests' counters are brought up to date
    (the engine's decode cohort advances them lazily) when a router reads them."""

    __slots__ = ("_engine",)

    def __init__(self, engine: VllmEngine) -> None:
        self._engine = engine

    def __len__(self) -> int:
        return len(self._engine.running)

    def __getitem__(self, i: Any) -> Any:
        self._engine.sync_requests()
        return self._engine.running[i]

    def __iter__(self) -> Iterator[Request]:
        self._engine.sync_requests()
        return iter(self._engine.running)


def worker_view(engine: Any) -> WorkerView:
    """The one place routers read engines. A new engine type adds one branch."""
    if isinstance(engine, VllmEngine):
        return WorkerView(engine.waiting, _SyncedRunning(engine), engine.hash_block_tokens,
                          engine.config.block_size,
                          lambda req, memo: _vllm_cached_tokens(engine, req, memo))
    if isinstance(engine, SglangEngine):
        chunked = engine.chunked  # the one request between chunks is outstanding too
        running = engine.running if chunked is None else [*engine.running, chunked]
        return WorkerView(engine.waiting, running, engine.hash_block_tokens,
                          engine.config.page_size,
                          lambda req, memo: _sglang_cached_tokens(engine, req, memo))
    raise TypeError(f"routers cannot read a {type(engine).__name__}: "
                    "add a branch to sim.router.worker_view")


def _vllm_cached_tokens(engine: VllmEngine, req: Request, memo: dict[Any, Any]) -> int:
    pool = engine.pool
    if not pool.enable_caching:
        return 0
    bs, hbt = engine.config.block_size, engine.hash_block_tokens
    keys = memo.get((bs, hbt))
    if keys is None:
        keys = memo[(bs, hbt)] = PrefixLayout(req.hash_ids, req.prompt_tokens, bs, hbt).keys
    return pool.num_cached_prefix(keys) * bs


def _sglang_cached_tokens(engine: SglangEngine, req: Request, memo: dict[Any, Any]) -> int:
    """Tokens of the prompt the radix cache holds (as SGLang's own match would find
    them, at most prompt - 1), read without touching the tree."""
    key = ("radix", engine.hash_block_tokens)
    segs = memo.get(key)
    if segs is None:
        segs = memo[key] = request_segments(req.hash_ids, req.prompt_tokens,
                                            engine.hash_block_tokens, req.rid)
    return engine.pool.peek(segs, req.prompt_tokens - 1)


def _same_layout_pools(engines: Sequence[Any]) -> tuple[list[Any], int, int] | None:
    """The block pools of vLLM engines that share block size and hash block size (so
    one request's keys fit all), with those sizes; None otherwise."""
    if not engines or not all(isinstance(e, VllmEngine) for e in engines):
        return None
    layouts = {(e.config.block_size, e.hash_block_tokens) for e in engines}
    if len(layouts) != 1:
        return None
    bs, hbt = layouts.pop()
    return [e.pool for e in engines], bs, hbt


def pools_engine_layout(engine: VllmEngine, req: Request) -> PrefixLayout:
    """The request's prefix layout as ``engine`` (and every pool of its layout) makes
    it, memoised on the request as the engine does."""
    return engine._layout(req)


def num_outstanding(view: WorkerView) -> int:
    return len(view.waiting) + len(view.running)


def outstanding_tokens(view: WorkerView) -> int:
    """Tokens still to compute: inputs not yet in the KV cache plus outputs to sample."""
    return sum(r.num_tokens - r.num_computed + r.max_output_tokens - r.num_output
               for reqs in (view.waiting, view.running) for r in reqs)


# --------------------------------------------------------------- simple routers
@ROUTERS.register("round_robin")
class RoundRobin:
    """Worker i, i+1, ... in turn, whatever their load."""

    state_dependent = False

    def __init__(self, num_workers: int, rng: np.random.Generator) -> None:
        self.num_workers = num_workers
        self._next = 0

    def choose(self, req: Request, engines: Sequence[Any],
               candidates: Sequence[int] | None = None) -> int:
        w = self._next
        if candidates is not None:  # the next ready worker at or after the pointer
            w = next((c for c in candidates if c >= w), candidates[0])
            self._next = w + 1  # a fleet's worker ids only grow: no modulo
            return w
        self._next = (w + 1) % self.num_workers
        return w


@ROUTERS.register("random")
class RandomRouter:
    """A uniformly random worker from the scenario's seeded generator."""

    state_dependent = False

    def __init__(self, num_workers: int, rng: np.random.Generator) -> None:
        self.num_workers = num_workers
        self.rng = rng

    def choose(self, req: Request, engines: Sequence[Any],
               candidates: Sequence[int] | None = None) -> int:
        if candidates is not None:
            return int(candidates[int(self.rng.integers(len(candidates)))])
        return int(self.rng.integers(self.num_workers))


def _argmin_first(values: Sequence[int]) -> int:
    """Lowest value; a tie goes to the lowest worker index (deterministic)."""
    return min(range(len(values)), key=values.__getitem__)


def _ids(engines: Sequence[Any], candidates: Sequence[int] | None) -> Sequence[int]:
    return range(len(engines)) if candidates is None else candidates


class _LeastLoaded:
    """The worker whose ``load`` (of its view) is lowest now (ties: lowest index)."""

    state_dependent = True
    load: Callable[[WorkerView], int]

    def __init__(self, num_workers: int, rng: np.random.Generator) -> None:
        self.num_workers = num_workers

    def choose(self, req: Request, engines: Sequence[Any],
               candidates: Sequence[int] | None = None) -> int:
        ids = _ids(engines, candidates)
        load = type(self).load
        return ids[_argmin_first([load(worker_view(engines[i])) for i in ids])]


@ROUTERS.register("least_outstanding_requests")
class LeastOutstandingRequests(_LeastLoaded):
    """Fewest queued + running requests on the worker now (ties: lowest index)."""

    load = staticmethod(num_outstanding)


@ROUTERS.register("least_outstanding_tokens")
class LeastOutstandingTokens(_LeastLoaded):
    """Fewest remaining prefill + decode tokens on the worker now (ties: lowest index)."""

    load = staticmethod(outstanding_tokens)


@ROUTERS.register("power_of_two")
class PowerOfTwo:
    """Two distinct random workers; the one with fewer queued + running requests
    wins (a tie goes to the first drawn). Mitzenmacher's power of two choices."""

    state_dependent = True

    def __init__(self, num_workers: int, rng: np.random.Generator) -> None:
        self.num_workers = num_workers
        self.rng = rng

    def choose(self, req: Request, engines: Sequence[Any],
               candidates: Sequence[int] | None = None) -> int:
        ids = _ids(engines, candidates) if candidates is not None else range(self.num_workers)
        if len(ids) == 1:
            return ids[0]
        a, b = (ids[int(x)] for x in self.rng.choice(len(ids), 2, replace=False))
        load_b = num_outstanding(worker_view(engines[b]))
        return b if load_b < num_outstanding(worker_view(engines[a])) else a


@ROUTERS.register("session_affinity")
class SessionAffinity:
    """A session sticks to the worker its first request went to.

    The session key is the request's ``session_id`` if the request carries one, else
    its first hash id: in the Mooncake trace that names the conversation's first
    512-token block (system prompt + first turn), so a conversation's turns share
    it. Requests with neither key, and new sessions, go to the worker with the
    fewest requests in flight by the router's own count (no engine reads, so
    ``state_dependent`` is False; ties: lowest index). Sessions sharing one system
    prompt block share a worker: that is the point (its prefix is cached there)
    and the risk (a hot prompt pins one worker).
    """

    state_dependent = False

    def __init__(self, num_workers: int, rng: np.random.Generator) -> None:
        self.num_workers = num_workers
        self.sessions: dict[int, int] = {}
        self.in_flight = [0] * num_workers
        self._worker_of: dict[int, int] = {}

    def choose(self, req: Request, engines: Sequence[Any],
               candidates: Sequence[int] | None = None) -> int:
        key = getattr(req, "session_id", None)
        if key is None and len(req.hash_ids):
            key = int(req.hash_ids[0])
        w = self.sessions.get(key) if key is not None else None
        if w is not None and candidates is not None and w not in candidates:
            w = None  # its worker left the fleet: the session moves
        if len(engines) > len(self.in_flight):  # the fleet grew
            self.in_flight += [0] * (len(engines) - len(self.in_flight))
        if w is None:
            ids = _ids(engines, candidates) if candidates is not None else range(self.num_workers)
            w = ids[_argmin_first([self.in_flight[i] for i in ids])]
            if key is not None:
                self.sessions[key] = w
        self.in_flight[w] += 1
        self._worker_of[req.rid] = w
        return w

    def on_done(self, req: Request, now: float) -> None:
        w = self._worker_of.pop(req.rid, None)
        if w is not None:
            self.in_flight[w] -= 1


# -------------------------------------------------------------------- kv aware
class CostInputs(NamedTuple):
    """Per-worker arrays (one entry per worker) a KV-aware cost function sees."""

    overlap_blocks: np.ndarray  # leading request blocks the worker has cached
    prefill_blocks: np.ndarray  # request blocks - overlap blocks
    decode_blocks: np.ndarray  # blocks of the worker's active requests (router's count)
    request_blocks: int
    overlap_score_weight: float


COST_FUNCTIONS: Registry[Callable[[CostInputs], np.ndarray]] = Registry("kv_aware cost")


@COST_FUNCTIONS.register("dynamo")
def dynamo_cost(c: CostInputs) -> np.ndarray:
    """``overlap_score_weight * prefill_blocks + decode_blocks``, lower is better.
    ai-dynamo/dynamo:lib/llm/src/kv_router/scheduler.rs @ 2025 (DefaultWorkerSelector);
    Dynamo adds the new request's own blocks to every worker's decode term, a
    constant shift that changes no argmin, so it is left out here."""
    return c.overlap_score_weight * c.prefill_blocks + c.decode_blocks


@COST_FUNCTIONS.register("overlap_only")
def overlap_only_cost(c: CostInputs) -> np.ndarray:
    """Pure cache affinity: the prefill blocks still to compute, load ignored (ties:
    the scenario's tie_break). The limit of a large overlap_score_weight."""
    return c.prefill_blocks.astype(np.float64)


@ROUTERS.register("kv_aware")
class KvAware:
    """NVIDIA Dynamo's KV-aware router: per worker,
    ``cost = overlap_score_weight * (request blocks - cached blocks) + active blocks``.

    Block unit: ``block_size`` tokens, by default the trace's hash block
    (``hash_block_tokens``, 512 for Mooncake: one hash id per block). A trace says
    nothing finer than its hash blocks, so a smaller router block adds keys but no
    information, and Dynamo's own unit (``--kv-cache-block-size``) is coarse too.
    Request blocks = ceil(prompt / block_size); cached blocks = leading full router
    blocks the worker holds (``view: exact``: the engine's prefix cache read now,
    converted from engine blocks to tokens to router blocks).

    ``view: events``: the router's own copy of the caches (sim.kv.KeyEventView), fed
    by the workers' block stored/removed events, each applied ``event_lag_ms`` after
    the step that caused it, as Dynamo's indexer receives KV events over its event
    plane. vLLM workers sharing one block layout only; lag 0 equals ``exact``.

    ``view: approx`` is Dynamo's ApproxKvIndexer (ai-dynamo/dynamo:
    lib/llm/src/kv_router/approx.rs @ 2025): no engine reads; the router assumes
    the blocks of a request it routed are cached on that worker for ``ttl_s``
    seconds after the routing (re-routing a block refreshes its timer). Stored as
    one expiry time per (worker, block key): memory is workers x keys x 8 bytes.

    Decode blocks are the router's own count, kept incrementally: a request's
    blocks are added when routed and removed at ``on_done`` (Dynamo also grows
    them per generated token; the router here does not see tokens).

    Choice: the costs are divided by their max (Dynamo normalises so). With
    ``temperature == 0`` the lowest cost wins; ties go to a random tied worker
    from the seeded generator, as Dynamo does (``tie_break: random``), or to the
    lowest index (``tie_break: first``). With ``temperature > 0`` the worker is
    sampled from ``softmax(-cost / ((max - min) * temperature))`` (Dynamo's
    softmax_sample; uniform when all costs are equal). ``last_costs`` keeps the
    last decision's per-worker figures.
    """

    def __init__(self, num_workers: int, rng: np.random.Generator,
                 overlap_score_weight: float = 1.0, temperature: float = 0.0,
                 view: str = "exact", ttl_s: float = 120.0, block_size: int | None = None,
                 cost: str = "dynamo", tie_break: str = "random",
                 event_lag_ms: float = 0.0) -> None:
        where = "cluster.router"
        if view not in ("exact", "approx", "events"):
            raise ScenarioError(f"{where}.view", f"view = {view!r}: unknown",
                                "use exact, events or approx")
        if tie_break not in ("random", "first"):
            raise ScenarioError(f"{where}.tie_break", f"tie_break = {tie_break!r}: unknown",
                                "use random or first")
        for name, value, ok in (("temperature", temperature, temperature >= 0),
                                ("ttl_s", ttl_s, ttl_s > 0),
                                ("event_lag_ms", event_lag_ms, event_lag_ms >= 0),
                                ("block_size", block_size, block_size is None or block_size >= 1)):
            if not ok:
                raise ScenarioError(f"{where}.{name}", f"{name} = {value}: out of range",
                                    "temperature >= 0, ttl_s > 0, event_lag_ms >= 0, "
                                    "block_size >= 1")
        self.num_workers = num_workers
        self.rng = rng
        self.overlap_score_weight = float(overlap_score_weight)
        self.temperature = float(temperature)
        self.view = view
        self.ttl_s = float(ttl_s)
        self.block_size = block_size
        self.cost_fn = COST_FUNCTIONS.get(cost, f"{where}.cost")
        self.tie_break = tie_break
        self.event_lag_s = float(event_lag_ms) / 1e3
        self._events: KeyEventView | None = None  # view: events
        self.state_dependent = view in ("exact", "events")
        self.reads_kv_only = True  # prefix caches only: the cluster need not commit tokens
        self.decode_blocks = np.zeros(num_workers, dtype=np.int64)
        self._routed: dict[int, tuple[int, int]] = {}  # rid -> (worker, blocks)
        self._expiry = np.full((num_workers, 0), -np.inf)  # approx view
        self._last: tuple[np.ndarray, ...] | None = None
        self._units: tuple[int, int] | None = None  # (router block tokens, hash block tokens)
        self._cached_tokens: list[Callable[[Request, dict[Any, Any]], int]] = []
        self._pools: tuple[list[Any], int, int] | None = None
        self._presence: KeyPresence | None = None

    # ----------------------------------------------------------------- decision
    def choose(self, req: Request, engines: Sequence[Any],
               candidates: Sequence[int] | None = None) -> int:
        if self._units is None:  # static configuration, read once
            v0 = worker_view(engines[0])
            self._units = (self.block_size or v0.hash_block_tokens or v0.block_size,
                           v0.hash_block_tokens)
        bs, hbt = self._units
        request_blocks = -(-req.prompt_tokens // bs)
        now = req.arrival_s
        if len(engines) > self.num_workers:  # a planner started workers: grow the state
            grow = len(engines) - self.num_workers
            self.decode_blocks = np.concatenate([self.decode_blocks,
                                                 np.zeros(grow, dtype=np.int64)])
            self._expiry = np.vstack([self._expiry,
                                      np.full((grow, self._expiry.shape[1]), -np.inf)])
            self.num_workers = len(engines)
        ids = np.arange(len(engines)) if candidates is None else np.asarray(candidates)
        keys: np.ndarray | None = None
        if self.view != "approx":
            if len(self._cached_tokens) != len(engines):  # built once (again as a fleet grows)
                self._cached_tokens = [worker_view(e).cached_tokens for e in engines]
                self._pools = _same_layout_pools(engines)
                self._presence = (KeyPresence(self._pools[0])
                                  if self._pools is not None
                                  and KeyPresence.fits(self._pools[0]) else None)
                if self.view == "events":
                    if self._presence is None or self._pools is None:
                        raise ScenarioError(
                            "cluster.router.view", "view = events needs vLLM workers that "
                            f"share one block layout, at most {KeyPresence.MAX_POOLS}",
                            "use view: exact (reads the caches now) or view: approx")
                    if self._events is not None:  # a grown fleet: keep what was seen
                        old = self._events
                        self._events = KeyEventView(self._presence, self._pools[0],
                                                    self.event_lag_s)
                        self._events.adopt(old)
                    else:
                        self._events = KeyEventView(self._presence, self._pools[0],
                                                    self.event_lag_s)
            if self._pools is not None:
                # every worker a vLLM pool with one block layout: one key array for all
                pools, ebs, ehbt = self._pools
                if req.layout is None:  # made here once, kept for the engine it goes to
                    keys = pools_engine_layout(engines[0], req).keys
                else:  # a layout of another pool (P/D's prefill side)
                    keys = PrefixLayout(req.hash_ids, req.prompt_tokens, ebs, ehbt).keys
                if self._events is not None:  # the router's lagging copy
                    overlap = self._events.leading_counts(keys, now)[ids] * ebs // bs
                elif self._presence is not None:  # one gather for the whole fleet
                    overlap = self._presence.leading_counts(keys)[ids] * ebs // bs
                else:
                    overlap = np.fromiter((pools[i].num_cached_prefix(keys) * ebs // bs
                                           for i in ids.tolist()), dtype=np.int64,
                                          count=len(ids))
                keys = None
            else:
                memo: dict[Any, Any] = {}
                fns = self._cached_tokens
                overlap = np.fromiter((fns[i](req, memo) // bs for i in ids.tolist()),
                                      dtype=np.int64, count=len(ids))
        else:
            keys = PrefixLayout(req.hash_ids, req.prompt_tokens, bs, hbt).keys
            overlap = self._approx_overlap(keys, now)[ids]
        overlap = np.minimum(overlap, request_blocks)
        prefill = request_blocks - overlap
        decode = self.decode_blocks[ids]
        costs = np.asarray(self.cost_fn(CostInputs(overlap, prefill, decode, request_blocks,
                                                   self.overlap_score_weight)), dtype=np.float64)
        w = int(ids[self._pick(costs)])
        self._last = (ids, overlap, prefill, decode, costs)
        self.decode_blocks[w] += request_blocks
        self._routed[req.rid] = (w, request_blocks)
        if keys is not None:
            self._approx_store(w, keys, now)
        return w

    def _pick(self, costs: np.ndarray) -> int:
        if self.temperature == 0:  # the lowest cost (Dynamo normalises first: same argmin)
            tied = np.flatnonzero(costs == costs.min())
            if tied.size == 1 or self.tie_break == "first":
                return int(tied[0])
            return int(tied[self.rng.integers(tied.size)])
        top = costs.max()
        norm = costs / top if top > 0 else costs
        lo, hi = norm.min(), norm.max()
        if hi == lo:
            return int(self.rng.integers(norm.size))
        z = -norm / ((hi - lo) * self.temperature)
        p = np.exp(z - z.max())
        cdf = np.cumsum(p)
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"),
                       norm.size - 1))

    def on_done(self, req: Request, now: float) -> None:
        routed = self._routed.pop(req.rid, None)
        if routed is not None:
            self.decode_blocks[routed[0]] -= routed[1]

    @property
    def last_costs(self) -> list[tuple[int, int, int, int, float]]:
        """(worker, overlap_blocks, prefill_blocks, decode_blocks, cost) of the last choice."""
        if self._last is None:
            return []
        ids, o, p, d, c = self._last
        return [(int(w), int(o[j]), int(p[j]), int(d[j]), float(c[j]))
                for j, w in enumerate(ids)]

    # ------------------------------------------------------------- approx view
    def _approx_overlap(self, keys: np.ndarray, now: float) -> np.ndarray:
        """Leading run of ``keys`` each worker is assumed to hold at ``now``."""
        n = keys.size
        if n == 0:
            return np.zeros(self.num_workers, dtype=np.int64)
        exp = self._expiry
        inside = keys < exp.shape[1]
        live = np.zeros((self.num_workers, n), dtype=bool)
        live[:, inside] = exp[:, keys[inside]] > now
        return np.where(live.all(axis=1), n, live.argmin(axis=1)).astype(np.int64)

    def _approx_store(self, w: int, keys: np.ndarray, now: float) -> None:
        if keys.size == 0:
            return
        need = int(keys.max()) + 1
        cap = self._expiry.shape[1]
        if need > cap:
            grown = np.full((self.num_workers, max(need, 2 * cap)), -np.inf)
            grown[:, :cap] = self._expiry
            self._expiry = grown
        self._expiry[w, keys] = now + self.ttl_s


def make_router(kind: str, params: dict[str, Any], num_workers: int,
                rng: np.random.Generator) -> Router:
    cls = ROUTERS.get(kind, "cluster.router.kind")
    router: Router = cls(num_workers, rng, **params)
    return router
