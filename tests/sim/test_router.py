"""Routers on hand-made workers, decisions computed by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sim.errors import ScenarioError
from sim.router import COST_FUNCTIONS, ROUTERS, CostInputs, KvAware, make_router
from sim.scenario import load_scenario, validate_scenario
from sim.simulate import resolve, simulate
from tests.sim.factories import drive, make_engine, make_request

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "scenarios" / "default.yaml"

# engine blocks of 4 tokens; one hash id per 8 tokens, so the kv_aware router's
# default block is 8 tokens (one hash id)
BS, HBT = 4, 8


def engines(n: int = 3) -> list[Any]:
    return [make_engine(num_blocks=64, block_size=BS, max_num_batched_tokens=64,
                        hash_block_tokens=HBT) for _ in range(n)]


def warm(engine: Any, hash_ids: list[int]) -> None:
    """Run one request through the engine so its prompt blocks stay in the prefix cache."""
    drive(engine, [make_request(900, len(hash_ids) * HBT, 1, hash_ids=hash_ids)])


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ------------------------------------------------------------------ kv_aware
def kv_setup(weight: float) -> tuple[KvAware, list[Any]]:
    """Worker 0 caches hash ids [1 2 3 4], worker 1 [1 2], worker 2 nothing; then
    three requests are routed and stay active (no on_done):
      X: ids [1 2 3 4], 32 tokens = 4 blocks -> worker 0 (all 4 cached there: cost 0)
      Y: no ids, 40 tokens = 5 blocks: costs w*5 + (4, 0, 0) -> worker 1 (tie, lowest)
      Z: no ids, 16 tokens = 2 blocks: costs w*2 + (4, 5, 0) -> worker 2
    leaving decode blocks (4, 5, 2)."""
    es = engines()
    warm(es[0], [1, 2, 3, 4])
    warm(es[1], [1, 2])
    router = make_router("kv_aware", {"overlap_score_weight": weight, "tie_break": "first"},
                         3, rng())
    assert isinstance(router, KvAware)
    got = [router.choose(make_request(i, p, 1, hash_ids=h), es)
           for i, (p, h) in enumerate([(32, [1, 2, 3, 4]), (40, []), (16, [])])]
    assert got == [0, 1, 2]
    assert router.decode_blocks.tolist() == [4, 5, 2]
    return router, es


def test_kv_aware_hand_computed_decision() -> None:
    # R: ids [1..6], 48 tokens = 6 router blocks; cached 4 / 2 / 0 blocks.
    # weight 1:   w0 = 1*(6-4) + 4 = 6;  w1 = 1*(6-2) + 5 = 9;  w2 = 1*(6-0) + 2 = 8  -> w0
    router, es = kv_setup(1.0)
    r = make_request(10, 48, 1, hash_ids=[1, 2, 3, 4, 5, 6])
    assert router.choose(r, es) == 0
    assert router.last_costs == [(0, 4, 2, 4, 6.0), (1, 2, 4, 5, 9.0), (2, 0, 6, 2, 8.0)]
    assert router.decode_blocks.tolist() == [10, 5, 2]
    router.on_done(r, 1.0)
    assert router.decode_blocks.tolist() == [4, 5, 2]


def test_kv_aware_low_overlap_weight_lets_load_win() -> None:
    # weight 0.25: w0 = 0.25*2 + 4 = 4.5;  w1 = 0.25*4 + 5 = 6;  w2 = 0.25*6 + 2 = 3.5 -> w2
    router, es = kv_setup(0.25)
    assert router.choose(make_request(10, 48, 1, hash_ids=[1, 2, 3, 4, 5, 6]), es) == 2
    assert [c[4] for c in router.last_costs] == [4.5, 6.0, 3.5]


def test_kv_aware_router_block_size_is_a_parameter() -> None:
    # block_size 16 tokens: R (48 tokens) is 3 blocks; w0 caches 32 tokens = 2 blocks,
    # w1 16 tokens = 1 block. No load: costs 1, 2, 3 -> w0.
    es = engines()
    warm(es[0], [1, 2, 3, 4])
    warm(es[1], [1, 2])
    router = make_router("kv_aware", {"block_size": 16}, 3, rng())
    assert router.choose(make_request(10, 48, 1, hash_ids=[1, 2, 3, 4, 5, 6]), es) == 0
    assert [c[1:] for c in router.last_costs] == [(2, 1, 0, 1.0), (1, 2, 0, 2.0),  # type: ignore[attr-defined]
                                                  (0, 3, 0, 3.0)]


def test_kv_aware_ties_random_with_the_seeded_generator() -> None:
    # three empty workers; each request finishes before the next, so every decision
    # is a 3-way tie at cost 3 (3 blocks to prefill, no load): the seeded rng picks
    es = engines()

    def picks(seed: int) -> list[int]:
        router = make_router("kv_aware", {}, 3, rng(seed))
        out = []
        for i in range(30):
            req = make_request(i, 24, 1)
            out.append(router.choose(req, es))
            router.on_done(req, 0.0)  # type: ignore[attr-defined]
        return out

    assert picks(1) == picks(1)
    assert set(picks(1)) == {0, 1, 2}


def test_kv_aware_approx_view_forgets_after_ttl() -> None:
    es = engines()  # empty caches: only the router's own guesses matter
    router = make_router("kv_aware", {"view": "approx", "ttl_s": 10.0, "tie_break": "first"},
                         3, rng())
    assert router.state_dependent is False
    assert make_router("kv_aware", {}, 3, rng()).state_dependent is True

    def route(rid: int, t: float) -> tuple[int, list[int]]:
        req = make_request(rid, 24, 1, arrival_s=t, hash_ids=[1, 2, 3])
        w = router.choose(req, es)
        router.on_done(req, t)  # type: ignore[attr-defined]
        return w, [c[1] for c in router.last_costs]  # type: ignore[attr-defined]

    assert route(0, 0.0) == (0, [0, 0, 0])  # nothing known: 3-way tie -> w0
    assert route(1, 5.0) == (0, [3, 0, 0])  # assumed cached on w0 until 10; refreshed to 15
    assert route(2, 14.9) == (0, [3, 0, 0])  # still alive thanks to the refresh
    assert route(3, 30.0) == (0, [0, 0, 0])  # expired at 24.9


def test_kv_aware_temperature_sampling_is_seeded() -> None:
    # w0 caches the whole prompt (cost 0), w1 and w2 nothing (cost 3): normalised
    # costs 0, 1, 1; p ~ softmax(-c / T): w0 most often, the others sometimes
    es = engines()
    warm(es[0], [1, 2, 3])

    def picks(seed: int) -> list[int]:
        router = make_router("kv_aware", {"temperature": 1.0}, 3, rng(seed))
        out = []
        for i in range(200):
            req = make_request(i, 24, 1, hash_ids=[1, 2, 3])
            out.append(router.choose(req, es))
            router.on_done(req, 0.0)  # type: ignore[attr-defined]
        return out

    a = picks(7)
    assert a == picks(7) and a != picks(8)
    counts = np.bincount(a, minlength=3)
    # expected 200 * e / (e + 2) = 115.3 for w0, 42.3 each for w1, w2
    assert counts[0] > counts[1] and counts[0] > counts[2] and counts[1] > 0 and counts[2] > 0


def test_kv_aware_rejects_bad_parameters() -> None:
    with pytest.raises(ScenarioError, match="view"):
        make_router("kv_aware", {"view": "psychic"}, 2, rng())
    with pytest.raises(ScenarioError, match="cost"):
        make_router("kv_aware", {"cost": "nope"}, 2, rng())
    with pytest.raises(ScenarioError, match="temperature"):
        make_router("kv_aware", {"temperature": -1}, 2, rng())
    with pytest.raises(ScenarioError, match="event_lag_ms"):
        make_router("kv_aware", {"view": "events", "event_lag_ms": -5}, 2, rng())


# ------------------------------------------------------------ other routers
def test_round_robin_and_random() -> None:
    es = engines()
    rr = make_router("round_robin", {}, 3, rng())
    assert [rr.choose(make_request(i, 8, 1), es) for i in range(4)] == [0, 1, 2, 0]
    a = make_router("random", {}, 3, rng(3))
    b = make_router("random", {}, 3, rng(3))
    got = [a.choose(make_request(i, 8, 1), es) for i in range(20)]
    assert got == [b.choose(make_request(i, 8, 1), es) for i in range(20)]
    assert set(got) <= {0, 1, 2} and len(set(got)) > 1


def test_least_outstanding_requests_counts_queued_and_running() -> None:
    es = engines()
    for w, n in ((0, 2), (1, 1), (2, 1)):
        for i in range(n):
            es[w].add_request(make_request(100 + 10 * w + i, 8, 4))
    es[1].schedule(0.0)  # w1's request is now running, still outstanding
    router = make_router("least_outstanding_requests", {}, 3, rng())
    assert router.state_dependent
    assert router.choose(make_request(0, 8, 1), es) == 1  # loads 2, 1, 1: lowest index


def test_least_outstanding_tokens_counts_prefill_and_decode() -> None:
    # w0: 100 prompt + 10 out = 110; w1: 2 x (20 + 5) = 50; w2: 50 + 10 = 60 -> w1
    es = engines()
    es[0].add_request(make_request(1, 100, 10))
    es[1].add_request(make_request(2, 20, 5))
    es[1].add_request(make_request(3, 20, 5))
    es[2].add_request(make_request(4, 50, 10))
    router = make_router("least_outstanding_tokens", {}, 3, rng())
    assert router.choose(make_request(0, 8, 1), es) == 1


def test_power_of_two_takes_the_less_loaded_of_two_draws() -> None:
    es = engines(4)
    loads = [3, 0, 2, 1]
    for w, n in enumerate(loads):
        for i in range(n):
            es[w].add_request(make_request(100 + 10 * w + i, 8, 4))
    router = make_router("power_of_two", {}, 4, rng(5))
    mirror = rng(5)  # the same draws, made here
    for i in range(20):
        a, b = mirror.choice(4, 2, replace=False)
        want = b if loads[b] < loads[a] else a
        assert router.choose(make_request(i, 8, 1), es) == want


def test_session_affinity_sticks_and_balances_new_sessions() -> None:
    es = engines()
    router = make_router("session_affinity", {}, 3, rng())
    r = [make_request(0, 16, 1, hash_ids=[7, 8]), make_request(1, 8, 1, hash_ids=[9]),
         make_request(2, 16, 1, hash_ids=[7, 10]), make_request(3, 8, 1)]
    # r0: new session 7 -> least in flight (0,0,0) -> w0; r1: session 9 -> w1;
    # r2: session 7 again -> w0; r3: no key -> in flight (2, 1, 0) -> w2
    assert [router.choose(q, es) for q in r] == [0, 1, 0, 2]
    for q in r[:3]:
        router.on_done(q, 1.0)  # type: ignore[attr-defined]
    # in flight (0, 0, 1): a new session goes to w0, session 9 stays on w1
    assert router.choose(make_request(4, 8, 1, hash_ids=[11]), es) == 0
    assert router.choose(make_request(5, 8, 1, hash_ids=[9]), es) == 1


# ------------------------------------------------------- plug-ins, scenarios
class AlwaysLast:
    state_dependent = False

    def __init__(self, num_workers: int, rng: np.random.Generator, offset: int = 0) -> None:
        self.num_workers = num_workers
        self.offset = offset

    def choose(self, req: Any, engines: Any) -> int:
        return self.num_workers - 1 - self.offset


COST_CALLS: list[int] = []


def load_only(c: CostInputs) -> np.ndarray:
    COST_CALLS.append(c.request_blocks)
    return c.decode_blocks.astype(np.float64)


def scenario_dict(router: dict[str, Any], num_requests: int) -> dict[str, Any]:
    return {"workload": {"trace": str(ROOT / "scenarios/traces/mooncake_conversation.jsonl.gz"),
                         "max_requests": num_requests},
            "model": "meta-llama/Llama-3.1-8B", "gpu": "H100-SXM",
            "cluster": {"num_workers": 3, "router": router}}


@pytest.fixture
def plugins():
    """Register the test plug-ins for one test only: the registries are global, and a
    module-level registration would change what other tests see (valid kinds)."""
    ROUTERS.register("test_always_last")(AlwaysLast)
    COST_FUNCTIONS.register("test_load_only")(load_only)
    yield
    ROUTERS.unregister("test_always_last")
    COST_FUNCTIONS.unregister("test_load_only")


def test_custom_router_and_cost_function_through_a_scenario(plugins) -> None:
    loaded = validate_scenario(scenario_dict({"kind": "test_always_last", "offset": 1}, 12),
                               {}, None, [])
    result = simulate(resolve(loaded))
    assert set(result.records.columns["worker_id"].tolist()) == {1}

    COST_CALLS.clear()
    loaded = validate_scenario(scenario_dict({"kind": "kv_aware", "cost": "test_load_only"}, 12),
                               {}, None, [])
    result = simulate(resolve(loaded))
    assert len(COST_CALLS) == 12
    with pytest.raises(ScenarioError, match="router"):
        validate_scenario(scenario_dict({"kind": "kv_aware", "wieght": 1}, 12), {}, None, [])


def test_kv_aware_beats_round_robin_on_prefix_hits() -> None:
    # head of the Mooncake conversation trace on the default 8 workers
    rates = {}
    for kind in ("round_robin", "kv_aware"):
        loaded = load_scenario(DEFAULT, ["workload.max_requests=300",
                                         f"cluster.router.kind={kind}"])
        rates[kind] = simulate(resolve(loaded)).summary["prefix_cache_hit_rate"]
    assert rates["kv_aware"] > 1.5 * rates["round_robin"] > 0
