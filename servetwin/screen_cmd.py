"""`servetwin screen`: sweep a scenario's search space and report the frontier."""

from __future__ import annotations

import argparse
import re
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sim.errors import ScenarioError


def add_parser(sub: Any) -> None:
    s = sub.add_parser("screen", help="sweep a search space; Pareto frontier and shortlist")
    s.add_argument("scenario", help="scenario YAML with a `search:` section")
    s.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local process pool (default) or Ray")
    s.add_argument("--address", default=None,
                   help="Ray cluster address (default: start a local Ray instance)")
    s.add_argument("--workers", type=int, default=None,
                   help="local processes (default: one per core)")
    s.add_argument("--budget", type=int, default=None,
                   help="override search.budget_gpus (max GPUs per config)")
    s.add_argument("--reports", default="reports", help="folder for run folders")
    s.add_argument("--out", default=None,
                   help="exact output folder; rerunning into the same folder resumes the sweep")
    s.add_argument("--quiet", action="store_true", help="no progress line")
    s.set_defaults(func=cmd_screen)


def _read(path: Path) -> tuple[dict[str, Any], str]:
    from sim.scenario import load_scenario

    # the base scenario must validate on its own: YAML and field errors come from the
    # scenario loader with the file's line, not blamed on the first swept field
    loaded = load_scenario(path)
    return loaded.raw, path.read_text(encoding="utf-8")


def _terminate(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_screen(args: argparse.Namespace) -> int:
    from sim.screen.analysis import analyze, shortlist
    from sim.screen.report import write_outputs
    from sim.screen.runner import Checkpoint, make_executor
    from sim.screen.search import run_search
    from sim.screen.space import parse_search

    path = Path(args.scenario)
    raw, text = _read(path)
    spec = parse_search(raw, str(path))
    if args.workers is not None and args.workers < 1:
        raise ScenarioError("--workers", f"{args.workers}: must be >= 1",
                            "give a process count, or leave it out for one per core")
    if args.budget is not None:
        if args.budget < 1:
            raise ScenarioError("--budget", f"{args.budget}: must be >= 1", "give a GPU count")
        spec = type(spec)(**{**spec.__dict__, "budget_gpus": args.budget})
    name = str(raw.get("name", path.stem))
    if args.out:
        out = Path(args.out)
    else:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        out = Path(args.reports) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}-screen-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    n = spec.grid_size if spec.strategy == "grid" else spec.trials
    print(f"servetwin screen: {name}: {spec.strategy}, {n:,} "
          f"{'configs' if spec.strategy == 'grid' else 'configs to sample'} over "
          f"{', '.join(spec.space)}; executor {args.executor}; results in {out}",
          file=sys.stderr, flush=True)
    # SIGTERM stops the sweep like Ctrl-C; the caller's handler is back afterwards (an
    # in-process caller, e.g. a test or a notebook, keeps its own)
    previous = signal.signal(signal.SIGTERM, _terminate)
    checkpoint = out / "results.jsonl"
    resumed = len(Checkpoint(checkpoint).rows) if checkpoint.exists() else 0
    try:
        t0 = time.perf_counter()
        executor = make_executor(args.executor, args.address, args.workers)
        rows = run_search(spec, str(path.resolve()), executor, out, progress=not args.quiet)
        wall = time.perf_counter() - t0
    finally:
        signal.signal(signal.SIGTERM, previous)
    df = analyze(rows, spec)
    entries = shortlist(df, spec)
    paths = write_outputs(out, df, spec, entries, text, base_dir=path.resolve().parent)
    _print_summary(df, entries, spec, wall, resumed)
    print("  wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _print_summary(df: Any, entries: list[dict[str, Any]], spec: Any, wall: float,
                   resumed: int) -> None:
    counts = df["status"].value_counts().to_dict()
    ok = int(counts.get("ok", 0))
    feasible = int(df["slo_ok"].sum())
    fresh = len(df) - min(resumed, len(df))
    rate = f"{fresh} evaluated in {wall:.1f} s, {60 * fresh / wall:.1f}/min" if fresh else \
        "all from the checkpoint"
    print(f"\n  {len(df):,} configs ({rate}"
          + (f"; {resumed} from the checkpoint" if fresh and resumed else "") + "): "
          f"{ok} simulated, {counts.get('infeasible', 0)} infeasible, "
          f"{counts.get('error', 0)} errors; {feasible} meet the SLOs; "
          f"{int(df['pareto'].sum())} on the frontier")
    if spec.slo:
        print("  SLOs: " + ", ".join(f"{m} {p} <= {1000 * b:g} ms"
                                     for m, bs in spec.slo.items() for p, b in bs.items()))
    for e in entries:
        knobs = ", ".join(f"{k.removeprefix('knob.')}={v}" for k, v in e["knobs"].items())
        print(f"  #{e['rank']} {e['config_id']}: {knobs}")
        for sentence in e.get("why", [])[:3]:
            print(f"       - {sentence}")
