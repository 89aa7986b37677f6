"""Small hand-computable screening rows: the runner's row format, made up."""

from __future__ import annotations

from typing import Any

from sim.screen.space import SearchSpec, config_id

BASE = {"name": "tiny", "seed": 0,
        "workload": {"trace": "traces/azure_conv_head.csv", "max_requests": 50},
        "model": "meta-llama/Llama-3.1-8B", "gpu": "H100-SXM"}


def make_spec(**kw: Any) -> SearchSpec:
    args: dict[str, Any] = {
        "strategy": "grid",
        "space": {"cluster.num_workers": (1, 2, 4), "engine.tensor_parallel_size": (1, 2)},
        "budget_gpus": None,
        "slo": {"ttft_s": {"p90": 2.0}},
        "objective": "ttft_s.p90",
        "cost_per_gpu_hour": {"H100-SXM": 3.6},
        "shortlist": 2,
        "trials": 100,
        "seed": 0,
        "base": BASE,
    }
    args.update(kw)
    return SearchSpec(**args)


def make_row(workers: int, tp: int, ttft_p90: float = 0.5, out_tps: float = 1000.0,
             status: str = "ok", reason: str = "", **figures: Any) -> dict[str, Any]:
    """One config; every figure not given is the same in all rows, so a comparison
    names only what a test moved."""
    knobs = {"cluster.num_workers": workers, "engine.tensor_parallel_size": tp}
    row: dict[str, Any] = {"config_id": config_id(knobs)}
    row.update({f"knob.{k}": v for k, v in knobs.items()})
    row.update(num_gpus=workers * tp, gpu="H100-SXM")
    if status == "ok":
        row.update({"ttft_s.p50": 0.1, "ttft_s.p90": ttft_p90, "ttft_s.p99": 3.0,
                    "tpot_s.p90": 0.01, "itl_s.p90": 0.01, "e2e_s.p90": 5.0,
                    "output_throughput_tokens_per_s": out_tps, "goodput_per_s": 2.0,
                    "num_preemptions": 0, "num_rejected": 0, "num_gpu_blocks": 30_000,
                    "kv_usage_max": 0.5, "prefix_cache_hit_rate": 0.0})
        row.update(figures)
    row.update(status=status, reason=reason, wall_s=0.1)
    return row


def make_rows() -> list[dict[str, Any]]:
    """The 2 x 3 grid of the docs, by hand (SLO: TTFT p90 <= 2 s)::

        workers TP  GPUs  tok/s  tok/s/GPU  TTFT p90  verdict
        1       1   1     1000   1000       3.0 s     misses the SLO
        1       2   2     1600    800       1.0 s     frontier, rank 1
        2       1   2     1500    750       0.5 s     frontier, rank 2
        2       2   4     2800    700       0.6 s     dominated by (2, 1)
        4       1   4     2800    700       0.2 s     frontier, unranked (shortlist 2)
        4       2   8     -       -         -         infeasible
    """
    return [make_row(1, 1, 3.0, 1000), make_row(1, 2, 1.0, 1600), make_row(2, 1, 0.5, 1500),
            make_row(2, 2, 0.6, 2800), make_row(4, 1, 0.2, 2800),
            make_row(4, 2, status="infeasible", reason="4 workers x TP 2 = 8 GPUs > budget 4")]
