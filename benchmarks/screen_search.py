"""Search efficiency: Optuna's NSGA-II against the full grid, on a space small enough to grid.

    python benchmarks/screen_search.py                         # 3 seeds, 15 % of the grid each
    python benchmarks/screen_search.py --out /tmp/sb --seeds 0 1 2 3 4 --fraction 0.10

The claim measured: on a space of >= 2,000 configs, Optuna finds a frontier whose
hypervolume is within 5 % of the full grid's while evaluating <= 15 % of the configs.

Scenario (written by this script to ``<out>/scenario.yaml``; not bundled, because
every bundled scenario needs a golden summary): the first 300 requests of
``scenarios/traces/azure_conv_head.csv`` replayed 10x faster (``time_scale: 0.1``,
~47 req/s, ~12k output tok/s offered) on Llama-3.1-8B / H100-SXM, about 0.08 s of
simulation per config. The space is 4 worker counts x 3 TP sizes x 6 max_num_seqs x
5 max_num_batched_tokens x 4 gpu_memory_utilization x 2 block sizes = 2,880 configs,
under a budget of 8 GPUs (the 480 configs of 12 or 16 GPUs are infeasible). SLOs TTFT p90
<= 1 s and TPOT p90 <= 50 ms: one GPU meets them only with a large batch and enough KV
memory, so the frontier runs from 1 GPU (most tokens per GPU, slowest) to 8 GPUs.

Hypervolume (``sim.screen.analysis.hypervolume``) of each frontier in the minimised plane
(-throughput/GPU, TTFT p90), against one reference point for every frontier: 10 % worse
than the worst SLO-feasible config of the grid on each axis, i.e.
(-0.9 x min throughput/GPU, 1.1 x max TTFT p90) over the grid's feasible configs. Every
config Optuna can find is in the grid, so the reference bounds its frontiers too.

The grid runs on a local process pool and is checkpointed into ``<out>/grid``; each
Optuna seed into ``<out>/optuna-seed<N>``, so a rerun into the same ``--out`` reads the
checkpoints back (and reports the wall times measured when the configs were run).
Optuna really simulates its configs (nothing is looked up in the grid); its rows are
then compared with the grid's, column by column except ``wall_s``: the simulation is
deterministic, so they must be identical. ``trials`` counts distinct configs simulated
(see sim/screen/search.py). As a baseline, each seed also draws the same number of
configs uniformly from the grid, 20 times, and reports their hypervolume ratios.

This is a benchmark, never a test: it prints ratios and asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim.screen.analysis import analyze, frontier_points, hypervolume  # noqa: E402
from sim.screen.runner import Checkpoint, LocalExecutor, Row  # noqa: E402
from sim.screen.search import run_grid, run_optuna  # noqa: E402
from sim.screen.space import SearchSpec, parse_search  # noqa: E402

TRACE = ROOT / "scenarios" / "traces" / "azure_conv_head.csv"
RANDOM_DRAWS = 20  # uniform samples of the grid per seed, for the baseline

SCENARIO = """\
# written by benchmarks/screen_search.py
name: screen-search-bench
seed: 0
workload:
  trace: {trace}
  max_requests: 300
  time_scale: 0.1
model: meta-llama/Llama-3.1-8B
gpu: H100-SXM
dtype: bf16
engine:
  kind: vllm
  enable_chunked_prefill: true
cluster:
  num_workers: 1
  router:
    kind: round_robin
search:
  strategy: grid
  budget_gpus: 8
  space:
    cluster.num_workers: [1, 2, 3, 4]
    engine.tensor_parallel_size: [1, 2, 4]
    engine.max_num_seqs: [8, 16, 32, 64, 128, 256]
    engine.max_num_batched_tokens: [512, 1024, 2048, 4096, 8192]
    engine.gpu_memory_utilization: [0.25, 0.4, 0.6, 0.9]
    engine.block_size: [16, 32]
  slo:
    ttft_s: {{p90: 1.0}}
    tpot_s: {{p90: 0.05}}
  objective: ttft_s.p90
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder; rerunning into it resumes (default: a temp dir)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Optuna seeds")
    ap.add_argument("--fraction", type=float, default=0.15,
                    help="Optuna trials as a share of the grid (default 0.15)")
    ap.add_argument("--workers", type=int, default=None,
                    help="local processes (default: one per core)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="screen-search-"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scenario.yaml"
    path.write_text(SCENARIO.format(trace=json.dumps(str(TRACE))), encoding="utf-8")
    import yaml

    spec = parse_search(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))
    executor = LocalExecutor(args.workers)
    base_path = str(path.resolve())
    print(f"screen_search: {spec.grid_size:,} configs over {', '.join(spec.space)}; "
          f"{executor.max_workers} processes; results in {out}", flush=True)

    # ------------------------------------------------------------ the grid
    print("grid:", flush=True)
    grid_rows, grid_wall, grid_run = timed(out / "grid", lambda cp: run_grid(
        spec, base_path, executor, cp, progress=not args.quiet))
    grid_df = analyze(grid_rows, spec)
    feasible = grid_df[grid_df["slo_ok"]]
    lat = spec.objective
    ref = (-0.9 * float(feasible["throughput_per_gpu"].min()), 1.1 * float(feasible[lat].max()))
    grid_front = frontier_points(grid_df, spec)
    hv_grid = hypervolume(grid_front, ref)
    status = grid_df["status"].value_counts().to_dict()
    print(f"  {len(grid_df):,} configs: {status.get('ok', 0):,} simulated, "
          f"{status.get('infeasible', 0):,} infeasible, {status.get('error', 0):,} errors; "
          f"{len(feasible):,} meet the SLOs; {len(grid_front)} on the frontier")
    print(f"  wall {grid_wall:.1f} s for {grid_run:,} configs run "
          f"({60 * grid_run / grid_wall:,.0f} configs/min)" if grid_run else
          "  (nothing run)")
    print(f"  reference point (-tput/GPU, {lat}) = ({ref[0]:,.1f}, {ref[1]:.4f}); "
          f"grid hypervolume {hv_grid:,.2f}")
    front_df = grid_df[grid_df["pareto"]].sort_values("throughput_per_gpu", ascending=False)
    print(f"  frontier (GPUs, tok/s per GPU, {lat}): " + ", ".join(
        f"({int(g)}, {t:,.0f}, {1e3 * v:.0f} ms)" for g, t, v in zip(
            front_df["num_gpus"], front_df["throughput_per_gpu"], front_df[lat], strict=True)))

    # ------------------------------------------------------- optuna, per seed
    trials = max(1, math.floor(args.fraction * spec.grid_size))
    by_id = {r["config_id"]: r for r in grid_rows}
    results = []
    for seed in args.seeds:
        s = dataclasses.replace(spec, strategy="optuna", trials=trials, seed=seed)
        print(f"optuna seed {seed}: a budget of {trials:,} distinct configs", flush=True)
        rows, wall, run = timed(out / f"optuna-seed{seed}", lambda cp, s=s: run_optuna(
            s, base_path, executor, cp, batch=executor.max_workers,
            progress=not args.quiet))
        df = analyze(rows, s)
        front = frontier_points(df, s)
        hv = hypervolume(front, ref)
        grid_keys = set(map(tuple, grid_front))
        mismatched = [r["config_id"] for r in rows if strip(r) != strip(by_id[r["config_id"]])]
        res = {"seed": seed, "trials": trials, "distinct": len(rows),
               "share_of_grid": len(rows) / spec.grid_size, "wall_s": wall,
               "configs_run": run, "feasible": int(df["slo_ok"].sum()),
               "frontier": len(front), "on_grid_frontier": len(grid_keys & set(front)),
               "hypervolume": hv, "ratio": hv / hv_grid if hv_grid > 0 else math.nan,
               "rows_differing_from_grid": len(mismatched)}
        res.update(random_baseline(grid_rows, spec, len(rows), seed, ref, hv_grid))
        results.append(res)
        print(f"  {len(rows):,} distinct configs ({res['share_of_grid']:.1%} of the grid), "
              f"{res['feasible']} meet the SLOs, {len(front)} on its frontier "
              f"({res['on_grid_frontier']} of them on the grid's); hypervolume "
              f"{hv:,.2f} = {res['ratio']:.2%} of the grid's; wall {wall:.1f} s; "
              f"rows identical to the grid's: {'yes' if not mismatched else mismatched[:5]}")
        print(f"  random sampling, same {len(rows):,} evaluations, {RANDOM_DRAWS} draws: HV "
              f"ratio mean {res['random_ratio_mean']:.2%}, min {res['random_ratio_min']:.2%}; "
              f"{res['random_within_5pct']:.0%} of draws within 5 %")

    # ---------------------------------------------------------------- summary
    print("\nsummary")
    print(f"  grid: {spec.grid_size:,} configs, {grid_wall:.1f} s"
          + (f", {60 * grid_run / grid_wall:,.0f} configs/min ({executor.max_workers} "
             "processes)" if grid_run else ""))
    print("  seed  evaluations  % of grid  HV ratio  frontier (on grid's)  random: mean HV "
          "ratio, draws within 5 %")
    for r in results:
        print(f"  {r['seed']:>4}  {r['distinct']:>11,}  {r['share_of_grid']:>9.1%}  "
              f"{r['ratio']:>8.2%}  {r['frontier']:>8} ({r['on_grid_frontier']:>2})         "
              f"{r['random_ratio_mean']:>7.2%}, {r['random_within_5pct']:.0%}")
    ratios = [r["ratio"] for r in results]
    print(f"  HV ratio: min {min(ratios):.2%}, mean {sum(ratios) / len(ratios):.2%}; "
          f"within 5 %: {sum(x >= 0.95 for x in ratios)}/{len(ratios)} seeds")
    summary = {"grid_size": spec.grid_size, "grid_wall_s": grid_wall,
               "grid_configs_run": grid_run, "grid_hypervolume": hv_grid,
               "reference_point": ref, "grid_frontier": grid_front, "optuna": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"  wrote {out / 'summary.json'}")
    return 0


def timed(folder: Path, run: Any) -> tuple[list[Row], float, int]:
    """Run a strategy into its checkpoint folder: (rows, wall s, configs run). When the
    checkpoint already held everything, the wall time is the one stored when it ran."""
    folder.mkdir(parents=True, exist_ok=True)
    cp = Checkpoint(folder / "results.jsonl")
    before = len(cp.rows)
    t0 = time.perf_counter()
    rows = run(cp)
    wall = time.perf_counter() - t0
    ran = len(cp.rows) - before
    timing = folder / "timing.json"
    if ran:
        timing.write_text(json.dumps({"wall_s": wall, "configs_run": ran}) + "\n",
                          encoding="utf-8")
    elif timing.exists():
        stored = json.loads(timing.read_text(encoding="utf-8"))
        print(f"  (read back from {folder}; timing of the run that computed it)")
        wall, ran = stored["wall_s"], stored["configs_run"]
    return rows, wall, ran


def random_baseline(grid_rows: list[Row], spec: SearchSpec, k: int, seed: int,
                    ref: tuple[float, float], hv_grid: float) -> dict[str, float]:
    """Hypervolume ratio of ``k`` configs drawn uniformly from the grid (no repeats):
    what the same budget buys without a search strategy."""
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(RANDOM_DRAWS):
        pick = rng.choice(len(grid_rows), size=k, replace=False)
        df = analyze([grid_rows[i] for i in pick], spec)
        ratios.append(hypervolume(frontier_points(df, spec), ref) / hv_grid)
    return {"random_ratio_mean": float(np.mean(ratios)), "random_ratio_min": min(ratios),
            "random_within_5pct": float(np.mean([r >= 0.95 for r in ratios]))}


def strip(row: Row) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "wall_s"}


if __name__ == "__main__":
    sys.exit(main())
