"""Screening throughput: configs per minute, full Mooncake conversation trace per config,
on the local process pool and on a local Ray cluster, whose results must be identical.

    python benchmarks/screen_throughput.py                  # 16 configs, local then Ray
    python benchmarks/screen_throughput.py -n 32 --out /tmp/st --no-ray

Each config replays all 12,031 requests (59 min of traffic) of
``scenarios/traces/mooncake_conversation.jsonl.gz`` with the base scenario of
``scenarios/screen/llama8b_h100x8.yaml`` (Llama-3.1-8B, H100-SXM, prefix caching,
round robin). Its own space, chosen so that every config simulates (none exceeds the
8-GPU budget or runs out of KV cache): 2 or 4 workers x TP 1 or 2 x max_num_batched_tokens
2,048 .. 16,384 x max_num_seqs 64 .. 512 at gpu_memory_utilization 0.92, 64 configs, of
which ``-n`` drawn at random (seed 0, the same every run) are swept, so a small N still
mixes light and heavy loads on every axis (evenly spaced grid indices would have kept the
fastest-varying axis at one value: 16 of 64 picked max_num_seqs 64 only).

The sweep runs twice through ``sim.screen.runner.run_points``, the path `servetwin screen`
takes: ``--executor local`` (a process pool, ``--workers``, default one per core) and
then Ray (``ray.init()`` on this machine, one task per config; skipped with a note when
Ray is not installed). Reported per executor: the sweep's wall time (the process pool's
start-up included; Ray's ``ray.init`` is timed and printed apart, once per session),
configs per minute, the projected time for 1,000 configs at that rate, and the mean
simulation time of one config. The Ray rows are compared with the local rows on every
column except ``wall_s``. Results are written to ``<out>/local`` and ``<out>/ray`` (each
run starts them afresh: this measures, it does not resume) and ``<out>/summary.json``.

This is a benchmark, never a test: it prints ratios and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim.errors import ServetwinError  # noqa: E402
from sim.screen.runner import Checkpoint, LocalExecutor, RayExecutor, Row, run_points  # noqa: E402
from sim.screen.space import SearchSpec, parse_search  # noqa: E402

BASE = ROOT / "scenarios" / "screen" / "llama8b_h100x8.yaml"
SPACE = {
    "cluster.num_workers": [2, 4],
    "engine.tensor_parallel_size": [1, 2],
    "engine.max_num_batched_tokens": [2048, 4096, 8192, 16384],
    "engine.max_num_seqs": [64, 128, 256, 512],
}
TARGET_CONFIGS, TARGET_MIN = 1000, 15.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--num-configs", type=int, default=16,
                    help="configs to sweep, 1..64 (default 16)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: a temp dir)")
    ap.add_argument("--workers", type=int, default=None,
                    help="local processes (default: one per core)")
    ap.add_argument("--no-ray", action="store_true", help="local executor only")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="screen-throughput-"))
    out.mkdir(parents=True, exist_ok=True)
    import yaml

    raw = yaml.safe_load(BASE.read_text(encoding="utf-8"))
    raw["search"] = {**raw["search"], "space": SPACE}
    spec = parse_search(raw, str(BASE))
    grid = spec.grid()
    if not 1 <= args.num_configs <= len(grid):
        ap.error(f"--num-configs {args.num_configs}: must be 1..{len(grid)}")
    pick = np.random.default_rng(0).choice(len(grid), args.num_configs, replace=False)
    points = [grid[int(i)] for i in sorted(pick)]
    print(f"screen_throughput: {len(points)} configs of {len(grid)} over {', '.join(SPACE)}; "
          f"full trace per config; results in {out}", flush=True)

    local = LocalExecutor(args.workers)
    results = {"local": sweep(f"local ({local.max_workers} processes)", spec, points, local,
                              out / "local", not args.quiet)}
    bad = [r["config_id"] for r in results["local"]["rows"] if r["status"] != "ok"]
    if bad:
        print(f"  note: {len(bad)} configs did not simulate: {bad}")
    if args.no_ray:
        print("ray: skipped (--no-ray)")
    else:
        t0 = time.perf_counter()
        try:
            ray_ex = RayExecutor()
        except ServetwinError as e:
            print(f"ray: skipped ({e})")
        else:
            start_s = time.perf_counter() - t0
            cpus = int(ray_ex.ray.cluster_resources().get("CPU", 0))
            print(f"ray: local cluster started in {start_s:.1f} s (not in the sweep's wall time)")
            results["ray"] = sweep(f"ray (local cluster, {cpus} CPUs)", spec, points, ray_ex,
                                   out / "ray", not args.quiet)
            results["ray"]["start_s"] = start_s
            ray_ex.ray.shutdown()

    print("\nsummary")
    print(f"  {len(points)} configs x {results['local']['rows'][0].get('num_requests', '?')} "
          "requests each")
    print(f"  {'executor':<34} {'wall s':>7} {'configs/min':>11} {'1,000 configs':>13} "
          f"{'sim s/config':>12}")
    for r in results.values():
        print(f"  {r['label']:<34} {r['wall_s']:>7.1f} {r['configs_per_min']:>11.1f} "
              f"{r['projected_1000_min']:>10.1f} min {r['mean_sim_s']:>12.2f}")
    best = max(r["configs_per_min"] for r in results.values())
    print(f"  target: {TARGET_CONFIGS:,} configs in <= {TARGET_MIN:.0f} min = "
          f"{TARGET_CONFIGS / TARGET_MIN:.1f} configs/min; best here {best:.1f}/min "
          f"({best / (TARGET_CONFIGS / TARGET_MIN):.2f}x the target)")
    summary: dict[str, Any] = {"num_configs": len(points), "points": points,
                               **{k: {kk: vv for kk, vv in v.items() if kk != "rows"}
                                  for k, v in results.items()}}
    if "ray" in results:
        diff = differing(results["local"]["rows"], results["ray"]["rows"])
        summary["ray_identical"] = not diff
        print("  Ray rows identical to local rows (all columns but wall_s): "
              + ("yes" if not diff else f"NO, {len(diff)} differ: {diff[:5]}"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"  wrote {out / 'summary.json'}")
    return 0


def sweep(label: str, spec: SearchSpec, points: list[dict[str, Any]],
          executor: LocalExecutor | RayExecutor, folder: Path, progress: bool) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.jsonl").unlink(missing_ok=True)  # measure, never resume
    print(f"{label}:", flush=True)
    t0 = time.perf_counter()
    rows = run_points(spec, str(BASE), points, executor, Checkpoint(folder / "results.jsonl"),
                      progress)
    wall = time.perf_counter() - t0
    rate = 60 * len(rows) / wall
    res = {"label": label, "wall_s": wall, "configs_per_min": rate,
           "projected_1000_min": TARGET_CONFIGS / rate,
           "mean_sim_s": statistics.fmean(r["wall_s"] for r in rows), "rows": rows}
    print(f"  {len(rows)} configs in {wall:.1f} s: {rate:.1f} configs/min; 1,000 configs "
          f"would take {res['projected_1000_min']:.1f} min; one config simulates in "
          f"{res['mean_sim_s']:.2f} s on average", flush=True)
    return res


def differing(a: list[Row], b: list[Row]) -> list[str]:
    def strip(r: Row) -> dict[str, Any]:
        return {k: v for k, v in r.items() if k != "wall_s"}
    by_id = {r["config_id"]: strip(r) for r in b}
    return [r["config_id"] for r in a if by_id.get(r["config_id"]) != strip(r)]


if __name__ == "__main__":
    sys.exit(main())
