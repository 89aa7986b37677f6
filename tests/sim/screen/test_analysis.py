import json
import math

import numpy as np
import pytest

from sim.screen.analysis import analyze, frontier_points, hypervolume, shortlist
from tests.sim.screen.factories import make_row, make_rows, make_spec


def by_id(df):
    return df.set_index("config_id")


def cid(rows, workers, tp):
    return next(r["config_id"] for r in rows if r["knob.cluster.num_workers"] == workers
                and r["knob.engine.tensor_parallel_size"] == tp)


# ------------------------------------------------------------- frontier
def test_frontier_and_rank_by_hand():
    rows = make_rows()
    df = by_id(analyze(rows, make_spec()))
    assert list(df["throughput_per_gpu"].fillna(-1)) == [1000, 800, 750, 700, 700, -1]
    assert list(df["slo_ok"]) == [False, True, True, True, True, False]
    assert list(df["pareto"]) == [False, True, True, False, True, False]
    ranks = df["rank"].to_numpy()
    assert ranks[1] == 1 and ranks[2] == 2 and np.isnan(ranks[[0, 3, 4, 5]]).all()
    assert df.loc[cid(rows, 1, 2), "rank"] == 1


def test_rows_keep_their_order_and_knobs_follow_the_space():
    rows = [json.loads(json.dumps(r, sort_keys=True)) for r in make_rows()]  # a checkpoint
    spec = make_spec(space={"engine.tensor_parallel_size": (1, 2),
                            "cluster.num_workers": (1, 2, 4)})
    df = analyze(rows, spec)
    assert list(df["config_id"]) == [r["config_id"] for r in rows]
    assert list(df.columns[:3]) == ["config_id", "knob.engine.tensor_parallel_size",
                                    "knob.cluster.num_workers"]
    assert df.columns[-1] == "note"


def test_exact_tie_keeps_fewer_gpus_whatever_the_row_order():
    rows = [make_row(2, 1, 0.5, 2000), make_row(1, 1, 0.5, 1000)]  # both 1000 tok/s/GPU
    for order in (rows, rows[::-1]):
        df = by_id(analyze(order, make_spec()))
        assert df.loc[rows[1]["config_id"], "pareto"]
        assert not df.loc[rows[0]["config_id"], "pareto"]
    (entry,) = shortlist(analyze(rows, make_spec()), make_spec())
    assert entry["why"] == ["1 worker instead of 2: identical throughput/GPU and TTFT p90; "
                            "listed by the tie-break (fewer GPUs, then config id)"]


def test_same_throughput_higher_latency_is_dominated():
    rows = [make_row(1, 1, 0.5, 1000), make_row(2, 1, 0.4, 2000)]
    df = analyze(rows, make_spec())
    assert list(df["pareto"]) == [False, True]


def test_nothing_feasible_and_no_rows():
    spec = make_spec()
    df = analyze([make_row(1, 1, 3.0), make_row(1, 2, status="error", reason="bad")], spec)
    assert not df["pareto"].any() and df["rank"].isna().all()
    assert shortlist(df, spec) == []
    empty = analyze([], spec)
    assert len(empty) == 0 and {"slo_ok", "pareto", "rank"} <= set(empty.columns)
    assert shortlist(empty, spec) == []


# ------------------------------------------------------------------ SLO
def test_slo_violation_names_bound_and_margin():
    spec = make_spec(slo={"ttft_s": {"p90": 2.0}, "tpot_s": {"p90": 0.008}})
    rows = [make_row(1, 1, 3.0), make_row(1, 2, 1.0),
            make_row(2, 1, status="infeasible", reason="too big"),
            {**make_row(2, 2), "ttft_s.p90": None}]
    df = analyze(rows, spec)
    assert list(df["slo_ok"]) == [False, False, False, False]
    assert list(df["slo_violation"]) == [
        "ttft_s.p90 = 3 s > 2 s (+1 s, +50%); tpot_s.p90 = 10 ms > 8 ms (+2 ms, +25%)",
        "tpot_s.p90 = 10 ms > 8 ms (+2 ms, +25%)",
        "not run to completion: infeasible",
        "ttft_s.p90 missing (bound 2 s); tpot_s.p90 = 10 ms > 8 ms (+2 ms, +25%)",
    ]


def test_bound_is_inclusive():
    df = analyze([make_row(1, 1, 2.0)], make_spec())
    assert df["slo_ok"].tolist() == [True] and df["slo_violation"].tolist() == [""]


# ----------------------------------------------------------------- cost
def test_cost_per_million_output_tokens():
    # $3.60/GPU-h x 2 GPUs = $0.002/s; / 1600 tok/s x 1e6 = $1.25 per M tokens
    df = analyze(make_rows(), make_spec())
    assert df["cost_per_m_output_tokens"].iloc[1] == pytest.approx(1.25)
    assert df["cost_per_m_output_tokens"].iloc[0] == pytest.approx(1.0)
    assert math.isnan(df["cost_per_m_output_tokens"].iloc[5])  # infeasible: nothing ran
    assert df["note"].iloc[5] == ""


def test_cost_without_a_price_or_tokens_is_nan_with_a_note():
    rows = [{**make_row(1, 1), "gpu": "MI300X"}, make_row(1, 2, out_tps=0.0)]
    df = analyze(rows, make_spec())
    assert df["cost_per_m_output_tokens"].isna().all()
    assert list(df["note"]) == ["no $/GPU-hour for MI300X: set search.cost_per_gpu_hour.MI300X",
                                "no output tokens: cost per token undefined"]


# ------------------------------------------------------------ shortlist
def test_shortlist_entries_by_hand():
    rows = make_rows()
    spec = make_spec()
    entries = shortlist(analyze(rows, spec), spec)
    assert [e["rank"] for e in entries] == [1, 2]
    first = entries[0]
    assert first["config_id"] == cid(rows, 1, 2)
    assert first["knobs"] == {"cluster.num_workers": 1, "engine.tensor_parallel_size": 2}
    assert all(type(v) is int for v in first["knobs"].values())
    assert first["metrics"] == {
        "num_gpus": 2, "gpu": "H100-SXM", "throughput_per_gpu": 800.0,
        "output_throughput_tokens_per_s": 1600.0, "goodput_per_s": 2.0,
        "cost_per_m_output_tokens": pytest.approx(1.25), "num_preemptions": 0,
        "ttft_s.p90": 1.0}
    # fields in the space's order, values in the space's order
    assert first["why"] == [
        "1 worker instead of 2: TTFT p90 600 ms → 1 s, throughput/GPU 700 → 800 tok/s",
        "1 worker instead of 4: 4 workers is infeasible (4 workers x TP 2 = 8 GPUs > budget 4)",
        "TP 2 instead of 1: TTFT p90 3 s → 1 s (SLO ≤ 2 s), throughput/GPU 1,000 → 800 tok/s",
    ]


def test_why_names_the_kv_mechanism_of_tp():
    # TP 2 doubles the KV cache (weights split over two GPUs): no preemptions, TTFT falls
    rows = [make_row(1, 1, 4.1, 400, num_gpu_blocks=28_654, num_preemptions=312),
            make_row(1, 2, 0.8, 800, num_gpu_blocks=61_000, num_preemptions=0)]
    spec = make_spec(space={"cluster.num_workers": (1,), "engine.tensor_parallel_size": (1, 2)})
    (entry,) = shortlist(analyze(rows, spec), spec)
    assert entry["why"] == ["TP 2 instead of 1: TTFT p90 4.1 s → 800 ms (SLO ≤ 2 s), "
                            "preemptions 312 → 0, KV capacity 2.1x (num_gpu_blocks 28,654 → "
                            "61,000)"]


def test_why_for_more_workers_names_latency_and_throughput_per_gpu():
    rows = [make_row(4, 1, 2.3, 720), make_row(8, 1, 0.4, 1368)]  # 180 vs 171 tok/s/GPU
    spec = make_spec(space={"cluster.num_workers": (4, 8), "engine.tensor_parallel_size": (1,)})
    (entry,) = shortlist(analyze(rows, spec), spec)
    assert entry["why"] == ["8 workers instead of 4: TTFT p90 2.3 s → 400 ms (SLO ≤ 2 s), "
                            "throughput/GPU 180 → 171 tok/s"]


def test_small_moves_are_not_reasons():
    rows = [make_row(1, 1, 0.50, 1000), make_row(1, 2, 0.49, 2000 * 0.99)]
    spec = make_spec(shortlist=1)
    (entry,) = shortlist(analyze(rows, spec), spec)
    assert entry["why"] == ["TP 1 instead of 2: every figure within 5% (throughput/GPU 990 → "
                            "1,000 tok/s, TTFT p90 490 ms → 500 ms)"]


def test_why_for_a_neighbour_that_failed():
    rows = [make_row(1, 1), make_row(1, 2, status="error", reason="trace: bad line 3")]
    spec = make_spec()
    (entry,) = shortlist(analyze(rows, spec), spec)
    assert entry["why"] == ["TP 1 instead of 2: TP 2 failed (trace: bad line 3)"]


def test_shortlist_is_deterministic():
    spec = make_spec(shortlist=5)
    a = shortlist(analyze(make_rows(), spec), spec)
    b = shortlist(analyze(make_rows()[::-1], spec), spec)
    assert a == b and len(a) == 3


# ---------------------------------------------------------- hypervolume
def test_hypervolume_by_hand():
    #  y
    #  4 +-----------+ ref (4, 4)
    #  3 *-----+     |   strips: (4-1)(4-3) = 3
    #  2 |     *--+  |           (4-2)(3-2) = 2
    #  1 |        *  |           (4-3)(2-1) = 1   -> 6
    #    1     2  3  4 x
    pts = [(1, 3), (2, 2), (3, 1)]
    assert hypervolume(pts, (4, 4)) == 6.0
    assert hypervolume([*pts, (2.5, 2.5), (5, 0), (0, 4)], (4, 4)) == 6.0  # no gain
    assert hypervolume(pts[::-1], (4, 4)) == 6.0
    assert hypervolume([], (4, 4)) == 0.0
    assert hypervolume([(0, 0)], (2, 3)) == 6.0


def test_hypervolume_of_the_frontier():
    df = analyze(make_rows(), make_spec())
    pts = frontier_points(df, make_spec())
    assert sorted(pts) == [(-800, 1.0), (-750, 0.5), (-700, 0.2)]
    # 800 x (3 - 1) + 750 x (1 - 0.5) + 700 x (0.5 - 0.2)
    assert hypervolume(pts, (0, 3)) == pytest.approx(1600 + 375 + 210)
