"""Start-up delays, planner policies and the fleet's bookkeeping, computed by hand."""

import math
from dataclasses import dataclass

import numpy as np
import pytest

from sim.errors import InputError, ScenarioError
from sim.planner import (
    PLANNER_POLICIES,
    STARTUP_DELAYS,
    Decision,
    EmpiricalDelay,
    Fleet,
    LoadPolicy,
    Observation,
    Planner,
    PlannerLimits,
    SlaPolicy,
    TimingCapacity,
    WorkerState,
    make_policy,
    make_startup_delay,
    predicted_ttft_s,
)
from tests.sim.factories import LinearTiming

N = 40_000  # samples for the moment checks: standard errors well under the tolerances


def draws(spec: dict, seed: int = 1, n: int = N) -> np.ndarray:
    delay = make_startup_delay(spec)
    rng = np.random.default_rng(seed)
    return np.array([delay.sample(rng) for _ in range(n)])


# ------------------------------------------------------------------ delays


def test_fixed_delay_is_constant() -> None:
    assert draws({"kind": "fixed", "delay_s": 45.0}, n=5).tolist() == [45.0] * 5


def test_same_seed_same_delays() -> None:
    for spec in ({"kind": "uniform", "lo_s": 10, "hi_s": 20},
                 {"kind": "lognormal", "median_s": 60, "sigma": 0.5},
                 {"kind": "gamma", "mean_s": 90, "cv": 0.5},
                 {"kind": "empirical", "values_s": [30, 60, 90]}):
        a, b = draws(spec, seed=7, n=50), draws(spec, seed=7, n=50)
        assert a.tolist() == b.tolist()
        assert (a >= 0).all()
        assert draws(spec, seed=8, n=50).tolist() != a.tolist()


def test_uniform_moments() -> None:
    x = draws({"kind": "uniform", "lo_s": 10, "hi_s": 20})
    assert x.min() >= 10 and x.max() <= 20
    assert x.mean() == pytest.approx(15.0, abs=0.1)
    assert x.var() == pytest.approx(100 / 12, rel=0.03)


def test_lognormal_median_and_mean() -> None:
    delay = make_startup_delay({"kind": "lognormal", "median_s": 60, "sigma": 0.5})
    x = draws({"kind": "lognormal", "median_s": 60, "sigma": 0.5})
    assert np.median(x) == pytest.approx(60.0, rel=0.02)
    assert delay.expected_s() == pytest.approx(60 * math.exp(0.125))  # 67.99
    assert x.mean() == pytest.approx(60 * math.exp(0.125), rel=0.02)
    assert np.log(x).std() == pytest.approx(0.5, rel=0.02)


def test_gamma_mean_and_cv() -> None:
    x = draws({"kind": "gamma", "mean_s": 90, "cv": 0.5})
    assert x.mean() == pytest.approx(90.0, rel=0.02)
    assert x.std() / x.mean() == pytest.approx(0.5, rel=0.03)


def test_empirical_resamples_the_table_evenly() -> None:
    x = draws({"kind": "empirical", "values_s": [30, 60, 90]})
    values, counts = np.unique(x, return_counts=True)
    assert values.tolist() == [30.0, 60.0, 90.0]
    assert (np.abs(counts / N - 1 / 3) < 0.01).all()


def test_empirical_from_csv(tmp_path) -> None:
    path = tmp_path / "cold.csv"
    path.write_text("node,startup_s\na,30\nb,90.5\n\nc,60\n")
    delay = make_startup_delay({"kind": "empirical", "path": str(path)})
    assert isinstance(delay, EmpiricalDelay)
    assert delay.values_s == (30.0, 90.5, 60.0)


@pytest.mark.parametrize(("text", "where", "words"), [
    ("node,boot_s\na,30\n", "cold.csv:1", "no startup_s column"),
    ("startup_s\n30\nslow\n", "cold.csv:3", "startup_s = 'slow': must be a number >= 0"),
    ("startup_s\n30\n-5\n", "cold.csv:3", "startup_s = '-5'"),
    ("startup_s\nnan\n", "cold.csv:2", "startup_s = 'nan'"),
    ("a,startup_s\nx\n", "cold.csv:2", "startup_s = ''"),
    ("startup_s\n", "cold.csv", "no rows"),
    ("", "cold.csv:1", "no startup_s column"),
])
def test_empirical_table_errors_name_file_line_value_and_fix(tmp_path, text, where,
                                                             words) -> None:
    path = tmp_path / "cold.csv"
    path.write_text(text)
    with pytest.raises(InputError) as e:
        make_startup_delay({"kind": "empirical", "path": str(path)})
    msg = str(e.value)
    assert e.value.where.endswith(where), msg
    assert words in msg and "Fix:" in msg


def test_missing_table_file(tmp_path) -> None:
    with pytest.raises(InputError, match=r"nope\.csv: cannot read the start-up table"):
        make_startup_delay({"kind": "empirical", "path": str(tmp_path / "nope.csv")})


def test_bad_delay_specs() -> None:
    with pytest.raises(ScenarioError, match=r"unknown startup delay kind 'weibull'.*empirical"):
        make_startup_delay({"kind": "weibull"})
    with pytest.raises(ScenarioError, match=r"startup\.lo_s"):
        make_startup_delay({"kind": "uniform", "lo_s": 20, "hi_s": 10})
    with pytest.raises(ScenarioError, match="bad parameters"):
        make_startup_delay({"kind": "fixed", "seconds": 3})


def test_users_register_a_delay() -> None:
    @dataclass(frozen=True)
    class Shifted:
        base_s: float

        def sample(self, rng: np.random.Generator) -> float:
            return self.base_s + float(rng.exponential(1.0))

        def expected_s(self) -> float:
            return self.base_s + 1.0

    STARTUP_DELAYS.register("test_shifted")(Shifted)
    try:
        assert make_startup_delay({"kind": "test_shifted", "base_s": 10}).expected_s() == 11.0
        with pytest.raises(ValueError, match="already registered"):
            STARTUP_DELAYS.register("test_shifted")(Shifted)
    finally:
        STARTUP_DELAYS.unregister("test_shifted")
    assert {"load", "sla"} <= set(PLANNER_POLICIES.kinds())


# ------------------------------------------------------------------ policies


def obs(ready: int = 2, **kw) -> Observation:
    return Observation(time_s=kw.pop("time_s", 60.0), interval_s=kw.pop("interval_s", 60.0),
                       num_workers_ready=ready, **kw)


def load_planner(**limits) -> Planner:
    return Planner(LoadPolicy(), PlannerLimits(**limits), interval_s=60.0)


def test_load_scales_up_when_kv_crosses_the_threshold() -> None:
    p = load_planner(max_workers=8)
    assert p.decide(obs(mean_kv_usage=0.9)).num_workers == 2  # not above 0.9
    d = p.decide(obs(mean_kv_usage=0.91, time_s=120))
    assert d.num_workers == 3 and d.reason.startswith("up")
    assert d.inputs["mean_kv_usage"] == 0.91


def test_load_scales_up_on_queue_per_worker() -> None:
    # 1.2 queued over 2 ready workers = 0.6 per worker > 0.5
    d = load_planner().decide(obs(mean_kv_usage=0.7, mean_num_waiting=1.2))
    assert d.num_workers == 3
    assert d.inputs["queue_per_worker"] == pytest.approx(0.6)


def test_load_scales_down_only_when_both_signals_are_low() -> None:
    p = load_planner()
    # kv low but queue 0.3/worker is between 0.2 and 0.5: hold
    assert p.decide(obs(mean_kv_usage=0.4, mean_num_waiting=0.6)).num_workers == 2
    d = p.decide(obs(mean_kv_usage=0.4, mean_num_waiting=0.2, time_s=120))
    assert d.num_workers == 1 and d.reason.startswith("down")
    # never below min_workers
    assert p.decide(obs(ready=1, mean_kv_usage=0.0, time_s=180)).num_workers == 1


def test_load_holds_while_a_worker_starts() -> None:
    d = load_planner().decide(obs(num_workers_starting=1, mean_kv_usage=0.99))
    assert d.num_workers == 3 and "still starting" in d.reason  # 2 ready + 1 starting


def test_gpu_budget_caps_and_counts_draining_workers() -> None:
    # 2 GPUs per worker, 8 GPUs: at most 4 workers; a draining one still holds 2 GPUs
    p = load_planner(gpus_per_worker=2, max_gpus=8)
    assert p.decide(obs(ready=3, mean_kv_usage=0.95)).num_workers == 4
    d = p.decide(obs(ready=3, num_workers_draining=1, mean_kv_usage=0.95, time_s=120))
    assert d.num_workers == 3 and "capped at 3" in d.reason
    d = p.decide(obs(ready=4, mean_kv_usage=0.95, time_s=180))
    assert d.num_workers == 4 and "capped" in d.reason


def test_scale_down_cooldown_after_a_scale_up() -> None:
    p = Planner(LoadPolicy(), PlannerLimits(), interval_s=30.0, scale_down_cooldown_s=90.0)
    assert p.decide(obs(time_s=30, mean_kv_usage=0.95)).num_workers == 3
    d = p.decide(obs(ready=3, time_s=60, mean_kv_usage=0.1))
    assert d.num_workers == 3 and "scale-down cooldown" in d.reason
    assert p.decide(obs(ready=3, time_s=120, mean_kv_usage=0.1)).num_workers == 2
    assert [x.num_workers for x in p.decisions] == [3, 3, 2]


class StubCapacity:
    """Prefill 0.5 ms per prompt token; 8 decodes fit the ITL target."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []

    def prefill_time_s(self, prompt_tokens: float) -> float:
        return 0.0005 * prompt_tokens

    def max_decode_seqs(self, itl_target_s: float, context_tokens: float) -> float:
        self.calls.append((itl_target_s, context_tokens))
        return 8.0


def sla_obs(**kw) -> Observation:
    # 120 arrivals in 60 s = 2 req/s, ISL 1000 (prefill 0.5 s), OSL 200
    return obs(num_arrivals=120, mean_prompt_tokens=1000.0, mean_output_tokens=200.0, **kw)


def test_sla_worker_count_by_hand() -> None:
    # TTFT, rho = 2 * 0.5 / n: n=1 rho=1 (unstable); n=2 rho=0.5 -> 0.5 (1 + 0.5/1) = 0.75
    #   <= 1.0 -> 2 workers for TTFT.
    # ITL: L = 2 req/s * 200 tokens * 0.05 s = 20 decodes; 8 per worker -> ceil(2.5) = 3.
    cap = StubCapacity()
    policy = SlaPolicy(ttft_target_s=1.0, itl_target_s=0.05, capacity=cap)
    d = Planner(policy, PlannerLimits(), 60.0).decide(sla_obs())
    assert d.num_workers == 3
    assert d.inputs["workers_for_ttft"] == 2 and d.inputs["workers_for_itl"] == 3
    assert d.inputs["rate_per_s"] == 2.0
    assert cap.calls == [(0.05, 1100.0)]  # context = ISL + OSL / 2


def test_sla_tighter_ttft_needs_more_workers() -> None:
    # target 0.7: n=2 gives 0.75 > 0.7; n=3 rho=1/3 -> 0.5 (1 + (1/3)/(4/3)) = 0.625
    assert predicted_ttft_s(2.0, 0.5, 3) == pytest.approx(0.625)
    # ITL target 0.01 s: L = 2 * 200 * 0.01 = 4 decodes -> 1 worker
    policy = SlaPolicy(ttft_target_s=0.7, itl_target_s=0.01, capacity=StubCapacity())
    want, _, used = policy.desired(sla_obs())
    assert used["workers_for_ttft"] == 3 and used["workers_for_itl"] == 1
    assert want == 3


def test_sla_itl_term_alone() -> None:
    # itl target 1.0: L = 2 * 200 * 1.0 = 400 concurrent decodes / 8 = 50 workers
    policy = SlaPolicy(ttft_target_s=10.0, itl_target_s=1.0, capacity=StubCapacity())
    assert policy.desired(sla_obs())[2]["workers_for_itl"] == 50


def test_sla_capped_by_gpu_budget_and_floor_when_idle() -> None:
    policy = SlaPolicy(ttft_target_s=10.0, itl_target_s=1.0, capacity=StubCapacity())
    p = Planner(policy, PlannerLimits(min_workers=1, gpus_per_worker=4, max_gpus=32), 60.0)
    d = p.decide(sla_obs())
    assert d.num_workers == 8 and "capped at 8" in d.reason and d.inputs["wanted"] == 50
    assert p.decide(obs(ready=8, time_s=120)).num_workers == 1  # no arrivals: the floor


def test_sla_unreachable_ttft_holds() -> None:
    policy = SlaPolicy(ttft_target_s=0.4, itl_target_s=0.05, capacity=StubCapacity())
    want, reason, _ = policy.desired(sla_obs())  # prefill alone takes 0.5 s
    assert want == 2 and "unreachable" in reason


def test_timing_capacity_from_a_timing_model() -> None:
    # step = 0.25 + 0.125 * decodes: <= 1.25 s for at most 8 decodes
    timing = LinearTiming(base=0.25, per_prefill_token=0.001, per_decode_seq=0.125)
    cap = TimingCapacity(timing, max_num_seqs=64)
    assert cap.max_decode_seqs(1.25, 500) == 8
    assert cap.max_decode_seqs(0.1, 500) == 0
    assert TimingCapacity(timing, max_num_seqs=5).max_decode_seqs(1.25, 500) == 5
    assert cap.prefill_time_s(1000) == pytest.approx(1.25)


def test_make_policy() -> None:
    assert isinstance(make_policy({"kind": "load", "kv_scale_up": 0.8}), LoadPolicy)
    with pytest.raises(ScenarioError, match="needs a worker capacity"):
        make_policy({"kind": "sla", "ttft_target_s": 1, "itl_target_s": 0.05})
    sla = make_policy({"kind": "sla", "ttft_target_s": 1, "itl_target_s": 0.05},
                      capacity=StubCapacity())
    assert isinstance(sla, SlaPolicy)
    with pytest.raises(ScenarioError, match="unknown planner policy kind 'pid'"):
        make_policy({"kind": "pid"})
    with pytest.raises(ScenarioError, match="kv_scale_down"):
        make_policy({"kind": "load", "kv_scale_up": 0.4, "kv_scale_down": 0.5})
    with pytest.raises(ScenarioError, match="max_gpus"):
        PlannerLimits(min_workers=3, gpus_per_worker=2, max_gpus=4)


# ------------------------------------------------------------------ fleet


def example_fleet(gpus: int = 1) -> Fleet:
    fleet = Fleet(gpus_per_worker=gpus)
    assert fleet.add_ready(0.0) == 0
    assert fleet.start(10.0, "up") == 1
    fleet.mark_ready(1, 40.0)
    fleet.drain(1, 70.0, "down")
    fleet.stop(1, 80.0)
    return fleet


def test_gpu_seconds_by_hand() -> None:
    # worker 0 ready 0..100: 100; worker 1 booked from its start at 10 (starting counts:
    # the GPUs are held while it loads) to its stop at 80: 70. Total 170.
    assert example_fleet().gpu_seconds(100.0) == 170.0
    assert example_fleet(gpus=2).gpu_seconds(100.0) == 340.0
    # until 50: worker 0 for 50, worker 1 from 10 to 50 (starting 10..40, ready 40..50)
    assert example_fleet().gpu_seconds(50.0) == 90.0
    assert example_fleet().gpu_seconds(5.0) == 5.0


def test_fleet_states_and_events() -> None:
    fleet = example_fleet()
    w = fleet.workers[1]
    assert (w.start_s, w.ready_s, w.drain_s, w.stop_s) == (10.0, 40.0, 70.0, 80.0)
    assert w.state is WorkerState.STOPPED
    assert [(e.time_s, e.worker_id, e.kind) for e in fleet.events] == [
        (0.0, 0, "start"), (0.0, 0, "ready"), (10.0, 1, "start"), (40.0, 1, "ready"),
        (70.0, 1, "drain"), (80.0, 1, "stop")]
    assert fleet.ids(WorkerState.READY) == [0] and fleet.num_gpus_booked == 1
    with pytest.raises(ValueError, match="worker 1 is stopped; cannot ready"):
        fleet.mark_ready(1, 90.0)
    with pytest.raises(ValueError, match="worker 0 is ready; cannot stop"):
        fleet.stop(0, 90.0)  # a ready worker is drained first


def test_draining_a_starting_worker_stops_it_at_once() -> None:
    fleet = Fleet()
    fleet.add_ready(0.0)
    fleet.start(10.0)
    fleet.drain(1, 20.0)
    assert fleet.workers[1].state is WorkerState.STOPPED
    assert fleet.gpu_seconds(30.0) == 30.0 + 10.0


def test_fleet_apply_starts_and_drains_idle_first() -> None:
    fleet = Fleet()
    for _ in range(3):
        fleet.add_ready(0.0)
    started, drained = fleet.apply(Decision(10.0, 5, "up"), 10.0, {})
    assert started == [3, 4] and drained == []
    # to 2: the starting ones go first (newest first), then the least loaded ready one
    started, drained = fleet.apply(Decision(20.0, 2, "down"), 20.0, {0: 5, 1: 0, 2: 3})
    assert started == [] and drained == [4, 3, 1]
    assert fleet.ids(WorkerState.DRAINING) == [1]
    assert fleet.ids(WorkerState.STOPPED) == [3, 4]
    assert fleet.ids(WorkerState.READY) == [0, 2]
    fleet.stop(1, 25.0)  # the cluster stops it once its requests are done
    assert fleet.num_gpus_booked == 2
