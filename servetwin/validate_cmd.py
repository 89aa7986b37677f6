"""`servetwin validate`: predict measured serving rows with the twin, score the predictions."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    v = sub.add_parser("validate", help="simulate measured serving benchmarks (silicon-sample "
                       "CSV) and report prediction errors")
    v.add_argument("rows", metavar="ROWS.csv", help="measured rows (AIConfigurator "
                   "silicon-sample columns)")
    v.add_argument("--out", required=True, help="folder for predictions.csv and summary.json")
    v.add_argument("--profiles", default=None,
                   help="folder of profile YAMLs (default: the bundled sim/data/profiles)")
    v.add_argument("--num-requests", type=int, default=None,
                   help="requests per row (default max(K x concurrency, 64), K below)")
    v.add_argument("--requests-per-client", type=int, default=4, metavar="K",
                   help="closed loop length in requests per client (default 4)")
    v.add_argument("--count-first-wave", action="store_true",
                   help="average over every request, the first wave (all clients starting "
                   "together on an idle engine) included; default: the requests after it")
    v.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                   help="the engine's token budget per step (default: vLLM's start-up "
                   "default for the GPU)")
    v.add_argument("--range-ratio", type=float, default=1.0, metavar="R",
                   help="draw each request's isl and osl uniformly from [int(R x L), L] "
                   "(benchmark clients' --random-range-ratio, lower bound form); default 1: "
                   "the rows' lengths exactly")
    v.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    from calibrate import validate as val
    from sim.errors import InputError

    for flag, value in (("--num-requests", args.num_requests),
                        ("--requests-per-client", args.requests_per_client),
                        ("--max-num-batched-tokens", args.max_num_batched_tokens)):
        if value is not None and value < 1:
            raise InputError(flag, f"{value}: must be at least 1", f"give {flag} >= 1")
    if not 0 < args.range_ratio <= 1:
        raise InputError("--range-ratio", f"{args.range_ratio}: must be in (0, 1]",
                         "give e.g. 0.8 for lengths in [0.8 L, L], or 1 for fixed lengths")
    protocol = val.LoopProtocol(args.requests_per_client, args.num_requests,
                                args.count_first_wave, args.max_num_batched_tokens,
                                args.range_ratio)
    rows = val.read_rows(args.rows)
    profiles = val.bundled_profiles(Path(args.profiles) if args.profiles else val.PROFILE_DIR)
    try:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(args.out, f"cannot create ({e.strerror or e})",
                         "choose a writable --out folder") from None
    t0 = time.perf_counter()
    preds = []
    for i, row in enumerate(rows, 1):
        preds.append(val.predict_row(row, profiles, protocol=protocol))
        if sys.stderr.isatty():
            print(f"\r  {i}/{len(rows)} rows, {time.perf_counter() - t0:.0f} s", end="",
                  file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    wall = time.perf_counter() - t0
    summary = val.summarize(preds, protocol)
    summary["wall_s"] = round(wall, 2)
    try:
        val.write_csv(out / "predictions.csv", preds)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    except OSError as e:
        raise InputError(str(e.filename or out), f"cannot write ({e.strerror or e})",
                         "choose a writable --out folder") from None
    print(f"servetwin validate: {args.rows}: {len(rows)} rows in {wall:.1f} s")
    print(val.format_summary(summary))
    print(f"  wrote {out / 'predictions.csv'}, {out / 'summary.json'}")
    return 0
