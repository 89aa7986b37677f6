"""Search strategies: the full grid, or Optuna's multi-objective NSGA-II.

Both return one row per *distinct* config evaluated, through the same executor
and checkpoint, so a sweep can mix them and a rerun skips what is done.

Optuna sees every swept field as a categorical choice (the index of its value,
so any YAML value works) and two objectives: maximise output throughput per
GPU, minimise the chosen latency percentile. SLO violations and infeasible
configs are constraints (NSGA-II prefers feasible points), never silently
dropped: their rows are kept like any other. Trials are asked in batches as
wide as the executor, evaluated in parallel, and told in the order asked, so a
seed reproduces the study whatever finishes first.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import ServetwinError
from .runner import Checkpoint, LocalExecutor, RayExecutor, Row, run_points
from .space import SearchSpec, config_id


def run_grid(spec: SearchSpec, base_path: str | None, executor: LocalExecutor | RayExecutor,
             checkpoint: Checkpoint, progress: bool = True) -> list[Row]:
    return run_points(spec, base_path, spec.grid(), executor, checkpoint, progress)


def objectives(row: Row, spec: SearchSpec) -> tuple[float, float, float]:
    """(throughput per GPU, latency, constraint violation >= 0; 0 = feasible)."""
    if row.get("status") != "ok":
        return 0.0, math.inf, 1e9
    tput = row["output_throughput_tokens_per_s"] / max(row["num_gpus"], 1)
    latency = row.get(spec.objective)
    latency = math.inf if latency is None or not math.isfinite(latency) else float(latency)
    violation = 0.0
    for metric, bounds in spec.slo.items():
        for pct, bound in bounds.items():
            v = row.get(f"{metric}.{pct}")
            if v is None or not math.isfinite(v):
                violation += 1e6
            elif v > bound:
                violation += (v - bound) / bound
    return tput, latency, violation


def run_optuna(spec: SearchSpec, base_path: str | None, executor: LocalExecutor | RayExecutor,
               checkpoint: Checkpoint, batch: int = 2, progress: bool = True) -> list[Row]:
    try:
        import optuna
    except ImportError:
        raise ServetwinError("search.strategy optuna needs Optuna: pip install "
                             "'servetwin[screen]' (or pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    keys = list(spec.space)

    sampler = optuna.samplers.NSGAIISampler(seed=spec.seed,
                                            population_size=max(8, min(50, spec.trials // 5)))
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    seen: dict[str, Row] = {}
    order: list[str] = []
    asked = 0
    while asked < spec.trials:
        trials = [study.ask() for _ in range(min(batch, spec.trials - asked))]
        asked += len(trials)
        points = []
        for t in trials:
            idx = [t.suggest_categorical(k, list(range(len(spec.space[k])))) for k in keys]
            points.append({k: spec.space[k][i] for k, i in zip(keys, idx, strict=True)})
        rows = run_points(spec, base_path, points, executor, checkpoint, progress=False)
        for t, p, row in zip(trials, points, rows, strict=True):
            cid = config_id(p)
            if cid not in seen:
                seen[cid] = row
                order.append(cid)
            tput, lat, viol = objectives(row, spec)
            t.set_constraint("slo_and_feasibility", viol)  # <= 0: feasible (Optuna >= 5)
            t.set_user_attr("config_id", cid)
            study.tell(t, [tput, lat if math.isfinite(lat) else 1e9])
        if progress:
            print(f"\r  optuna: {asked}/{spec.trials} trials, {len(seen)} distinct configs",
                  end="", flush=True)
    if progress:
        print()
    return [seen[c] for c in order]


def run_search(spec: SearchSpec, base_path: str | None, executor: LocalExecutor | RayExecutor,
               out_dir: Path, progress: bool = True) -> list[Row]:
    checkpoint = Checkpoint(out_dir / "results.jsonl")
    if spec.strategy == "grid":
        return run_grid(spec, base_path, executor, checkpoint, progress)
    width = getattr(executor, "max_workers", 4)
    return run_optuna(spec, base_path, executor, checkpoint, batch=max(1, width), progress=progress)
