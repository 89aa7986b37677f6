"""`servetwin` command line. Thin: parse, call the packages, print, write files."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sim.errors import InputError, ServetwinError

if TYPE_CHECKING:
    from sim.simulate import SimResult

DEFAULT_SCENARIO = Path(__file__).resolve().parent.parent / "scenarios" / "default.yaml"


def _run_dir(root: Path, name: str, out: str | None) -> Path:
    if out:
        d = Path(out)
    else:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:80] or "run"
        d = root / f"{safe}-{stamp}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _write_run(out: Path, csv: bool, result: SimResult,
               resolved_doc: dict[str, Any]) -> list[Path]:
    """Records, resolved scenario, then the summary: a folder with summary.json holds a
    whole run. A failed write removes what this run wrote and says why."""
    from .output import write_records, write_summary, write_yaml

    written: list[Path] = []
    try:
        written.extend(write_records(out / ("records.csv" if csv else "records.parquet"),
                                     result.records))
        records_files = list(written)
        written.append(out / "scenario.resolved.yaml")
        write_yaml(written[-1], resolved_doc)
        if result.resolved.loaded.scenario.simulation.timeline:
            from sim.simulate import build_timeline

            written.append(out / "timeline.json.gz")
            build_timeline(result).write(written[-1])
        written.append(out / "summary.json")
        write_summary(written[-1], result.summary)
    except OSError as e:
        from .output import STEPS_FILE

        for f in [*written, out / STEPS_FILE]:
            f.unlink(missing_ok=True)
        raise InputError(str(e.filename or out), f"cannot write ({e.strerror or e})",
                         "choose a writable --out folder") from None
    return records_files


def cmd_simulate(args: argparse.Namespace) -> int:
    from sim.scenario import load_scenario, scenario_to_dict
    from sim.simulate import resolve, simulate

    from .output import format_summary

    sets = [*args.set, *(["simulation.intervals=true"] if args.intervals else [])]
    loaded = load_scenario(args.scenario, sets)
    sc = loaded.scenario
    t0 = time.perf_counter()
    resolved = resolve(loaded)
    mode = "step-by-step" if args.step_by_step else "fast-forward"
    d = sc.disaggregation
    if d is not None and resolved.pools is not None:
        fleet = " + ".join(
            f"{getattr(d, n).num_workers} {n} (TP "
            f"{getattr(d, n).engine.get('tensor_parallel_size', sc.engine.tensor_parallel_size)})"
            for n in ("prefill", "decode"))
        fleet += f" x {resolved.model.name} on {resolved.gpu.name}"
    else:
        fleet = (f"{sc.cluster.num_workers} x {resolved.model.name} on {resolved.gpu.name} "
                 f"TP {sc.engine.tensor_parallel_size}")
        if sc.cluster.planner is not None:
            fleet += " (initial fleet; planner on)"
    print(f"servetwin: {sc.name}: {len(resolved.trace):,} requests, {fleet} ({mode})",
          file=sys.stderr, flush=True)
    print(f"  KV cache: {resolved.kv_capacity_note}", file=sys.stderr, flush=True)
    print(f"  timing: {resolved.timing_note}", file=sys.stderr, flush=True)
    result = simulate(resolved, fast_forward=False if args.step_by_step else None,
                      progress=_progress_line(t0) if sys.stderr.isatty() else None)
    wall = time.perf_counter() - t0
    try:
        out = _run_dir(Path(args.reports), sc.name, args.out)
    except OSError as e:
        raise InputError(str(e.filename or args.out or args.reports),
                         f"cannot create the output folder ({e.strerror or e})",
                         "choose a writable --out or --reports folder") from None
    resolved_doc = {"scenario": scenario_to_dict(sc), "resolved": resolved.as_dict()}
    rec_paths = _write_run(out, args.csv, result, resolved_doc)
    print(format_summary(result.summary))
    sim_s = result.summary["duration_s"]
    from sim._native import describe

    print(f"\n  simulated {sim_s:,.1f} s in {wall:.2f} s wall"
          + (f" ({sim_s / wall:,.0f}x real time)" if wall > 0 else "") + f"; {describe()}")
    timeline = (f", {out / 'timeline.json.gz'} (open in ui.perfetto.dev)"
                if sc.simulation.timeline else "")
    files = [*rec_paths, out / "summary.json", out / "scenario.resolved.yaml"]
    print(f"  wrote {', '.join(map(str, files))}" + timeline)
    return 0


def _progress_line(t0: float) -> Callable[[int, int], None]:
    """A one-line progress display on a terminal: requests done, wall time, ETA."""

    def show(done: int, total: int) -> None:
        elapsed = time.perf_counter() - t0
        eta = elapsed * (total - done) / done if done else 0.0
        end = "\n" if done >= total else ""
        print(f"\r  simulating: {done:,}/{total:,} requests done ({100 * done // total} %), "
              f"{elapsed:.1f} s, ETA {eta:.0f} s   ", end=end, file=sys.stderr, flush=True)

    return show


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="servetwin",
                                description="Simulate-then-verify harness for LLM serving")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("simulate", help="replay a scenario's trace through the twin")
    s.add_argument("scenario", nargs="?", default=str(DEFAULT_SCENARIO),
                   help="scenario YAML (default: the bundled default scenario)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario field, e.g. --set cluster.num_workers=4")
    s.add_argument("--reports", default="reports", help="folder for run folders")
    s.add_argument("--out", default=None, help="exact output folder (default reports/<run-id>)")
    s.add_argument("--csv", action="store_true", help="write records.csv instead of parquet")
    s.add_argument("--intervals", action="store_true",
                   help="carry the timing profile's 90 %% prediction intervals into the "
                   "latencies (two more runs; same as --set simulation.intervals=true)")
    s.add_argument("--step-by-step", action="store_true",
                   help="disable fast-forward (one event per forward pass)")
    s.set_defaults(func=cmd_simulate)
    from .screen_cmd import add_parser as add_screen

    add_screen(sub)
    from .twin_cmd import add_parser as add_twin_serve

    add_twin_serve(sub)
    from .verify_cmd import add_parser as add_verify

    add_verify(sub)
    from .calibrate_cmd import add_parser as add_calibrate
    add_calibrate(sub)
    r = sub.add_parser("refit", add_help=False,
                       help="end-to-end refit: adjust a profile so the simulated replays of a "
                       "verify run match its measured latencies (python -m calibrate.refit -h)")
    r.add_argument("rest", nargs=argparse.REMAINDER)
    r.set_defaults(func=_cmd_refit)
    from .validate_cmd import add_parser as add_validate
    add_validate(sub)
    from .native_cmd import add_parser as add_native
    add_native(sub)
    return p


def _cmd_refit(args: argparse.Namespace) -> int:
    from calibrate.refit import main as refit_main

    return refit_main(args.rest, prog="servetwin refit")


def _small_pages() -> None:
    """Ask numpy not to back large arrays with transparent huge pages. Where the kernel
    compacts memory on such a fault (THP defrag "madvise", as on this project's CI
    machines) the first touch of a fresh 330 MB array took 0.7-1.0 s instead of 0.14 s:
    the records of an output-x10 replay (41 M token times) were built in 0.6-0.9 s
    instead of 0.26 s (benchmarks/replay_speed.py --growth)."""
    import numpy as np

    setter = getattr(getattr(np, "_core", None), "multiarray", None)
    setter = getattr(setter, "_set_madvise_hugepage", None)
    if setter is not None:
        setter(False)


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["refit"]:  # its own parser (calibrate.refit), options included
        from calibrate.refit import main as refit_main

        return refit_main(given[1:], prog="servetwin refit")
    from sim.scenario import one_line

    _small_pages()
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except ServetwinError as e:
        print(f"servetwin: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("servetwin: interrupted", file=sys.stderr)
        return 130
