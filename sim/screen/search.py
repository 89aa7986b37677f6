"""Search strategies: the full grid, or Optuna's multi-objective NSGA-II.

Both return one row per *distinct* config evaluated, through the same executor
and checkpoint, so a sweep can mix them and a rerun skips what is done.

Optuna sees every swept field as a categorical choice (the index of its value,
so any YAML value works) and two objectives: maximise output throughput per
GPU, minimise the chosen latency percentile. SLO violations and infeasible
configs are constraints (NSGA-II prefers feasible points), never silently
dropped: their rows are kept like any other. Trials are asked in batches as
wide as the executor, evaluated in parallel, and told in the order asked, so a
seed reproduces the study whatever finishes first. ``trials`` counts distinct
configs simulated, the cost that matters: NSGA-II re-proposes configs it has seen
(about 40 % of its asks on the benchmark's space), and a repeat is told its known
row without counting.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from ..errors import ServetwinError
from .runner import Checkpoint, LocalExecutor, RayExecutor, Row, run_points
from .space import SearchSpec, config_id

# a converged population mostly re-proposes configs it has seen; stop asking at this
# many trials per config wanted (the benchmark's searches needed under 2.3)
MAX_ASKS_PER_TRIAL = 10


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
    budget = min(spec.trials, spec.grid_size)
    sampler = optuna.samplers.NSGAIISampler(seed=spec.seed, population_size=population_size(
        spec.trials))
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    seen: dict[str, Row] = {}  # config id -> row, in the order first asked
    asked = 0
    while len(seen) < budget and asked < MAX_ASKS_PER_TRIAL * spec.trials:
        trials = [study.ask() for _ in range(min(batch, budget - len(seen)))]
        asked += len(trials)
        points = []
        for t in trials:
            idx = [t.suggest_categorical(k, list(range(len(spec.space[k])))) for k in keys]
            points.append({k: spec.space[k][i] for k, i in zip(keys, idx, strict=True)})
        # simulate each config once: a repeat (in this batch or asked before) is told
        # the row it already has, costs nothing and does not count against `trials`
        new = {config_id(p): p for p in points if config_id(p) not in seen}
        seen.update(zip(new, run_points(spec, base_path, list(new.values()), executor,
                                        checkpoint, progress=False), strict=True))
        for t, p in zip(trials, points, strict=True):
            cid = config_id(p)
            tput, lat, viol = objectives(seen[cid], spec)
            t.set_constraint("slo_and_feasibility", viol)  # <= 0: feasible (Optuna >= 5)
            t.set_user_attr("config_id", cid)
            study.tell(t, [tput, lat if math.isfinite(lat) else 1e9])
        if progress:
            # stderr, like the grid's progress line: stdout carries the summary
            print(f"\r  optuna: {len(seen)}/{budget} configs, {asked} trials asked",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    if len(seen) < budget:
        print(f"  optuna: stopped after {asked:,} trials with {len(seen):,} distinct configs of "
              f"the {budget:,} asked for: NSGA-II kept proposing configs it had seen. Fix: "
              "lower search.trials or use strategy: grid", file=sys.stderr, flush=True)
    return list(seen.values())


def population_size(trials: int) -> int:
    """About 20 generations whatever the budget. Measured with
    benchmarks/screen_search.py (2,880 configs, 432 simulations, 100 seeds): trials // 20
    lands within 5 % of the grid's hypervolume in 99 seeds of 100, the former
    min(50, trials // 5) in 37 of 40 (and in 31 of 40 before repeats stopped counting)."""
    return max(8, min(50, trials // 20))


def run_search(spec: SearchSpec, base_path: str | None, executor: LocalExecutor | RayExecutor,
               out_dir: Path, progress: bool = True) -> list[Row]:
    checkpoint = Checkpoint(out_dir / "results.jsonl")
    if spec.strategy == "grid":
        return run_grid(spec, base_path, executor, checkpoint, progress)
    width = getattr(executor, "max_workers", 4)
    return run_optuna(spec, base_path, executor, checkpoint, batch=max(1, width), progress=progress)
