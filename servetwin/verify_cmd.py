"""`servetwin verify`: deploy a shortlist on real engines, replay, compare with the twin."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    v = sub.add_parser(
        "verify", help="deploy shortlisted configs on a real engine, replay the same trace, "
        "and compare measured with predicted")
    v.add_argument("shortlist", help="shortlist.yaml from `servetwin screen`, a list of "
                   "scenarios, or one scenario")
    v.add_argument("--engine", choices=("vllm", "sglang", "llamacpp"), default="vllm")
    v.add_argument("--model-path", default="",
                   help="weights the engine serves (HF folder for vllm/sglang, .gguf for "
                   "llamacpp); not needed with --endpoints")
    v.add_argument("--served-model-name", default="servetwin")
    v.add_argument("--endpoints", nargs="+", default=[], metavar="URL",
                   help="attach to engines that already run instead of deploying")
    v.add_argument("--trace", default=None,
                   help="replay this trace instead of each config's workload.trace")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of every config, e.g. --set workload.max_requests=100")
    v.add_argument("--profile", default=None, metavar="PROFILE.yaml",
                   help="predict with this timing profile (from `servetwin calibrate`)")
    v.add_argument("--calibrate-first", nargs="?", const="default", default=None,
                   choices=("default", "served", "small"), metavar="PLAN",
                   help="vLLM: start each config's engine with its step log, profile it with "
                   "calibrate.profiling's plan (default, ~45 s on a CPU engine; served: "
                   "batches decode as they churn in service; small: seconds) "
                   "right before the replay, and predict the config with the profile fitted "
                   "from those steps (written to CONFIG/calibration/)")
    v.add_argument("--recheck-after", action="store_true",
                   help="with --calibrate-first: profile each engine again after its replay "
                   "and report how far its step times moved from the profile the prediction "
                   "used (CONFIG/calibration/after/drift.txt; ~45 s more per config)")
    v.add_argument("--engine-python", default=sys.executable,
                   help="python with vllm / sglang installed (default: this one)")
    v.add_argument("--llama-server", default="llama-server", help="llama-server binary")
    v.add_argument("--engine-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for every engine launch (repeat)")
    v.add_argument("--engine-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment variable for the engine (repeat)")
    v.add_argument("--engine-nice", type=int, default=0, metavar="N",
                   help="run the engine at nice +N (small hosts: keeps the load generator's "
                   "schedule when the engine's server shares its core)")
    v.add_argument("--engine-cpus", default=None, metavar="LIST",
                   help="pin the engine's processes to these processors, e.g. 0 or 0-3 "
                   "(small hosts: with --loadgen-cpus, keeps them off the load generator's)")
    v.add_argument("--engine-core-cpus", default=None, metavar="LIST",
                   help="vLLM: once the engine serves, move its EngineCore process to these "
                   "processors, apart from the model worker (its loop spins while it waits "
                   "for the worker; on a CPU host it would take the worker's core), e.g. 1")
    v.add_argument("--loadgen-cpus", default=None, metavar="LIST",
                   help="pin this process (load generator, scraper, predictions) to these "
                   "processors, e.g. 1")
    v.add_argument("--port", type=int, default=8100, help="first port (one per worker)")
    v.add_argument("--ready-timeout", type=float, default=600.0, metavar="S")
    v.add_argument("--stall-timeout", type=float, default=120.0, metavar="S",
                   help="a stream with no event for this long is recorded as an error")
    v.add_argument("--scrape-interval", type=float, default=0.5, metavar="S")
    v.add_argument("--http-client", choices=("raw", "aiohttp"), default="raw",
                   help="the load generator's HTTP client: raw (its own HTTP/1.1 on asyncio "
                   "transports, ~4x less CPU per request) or aiohttp")
    v.add_argument("--warmup", type=int, default=2, metavar="N",
                   help="warm-up requests per endpoint before each replay")
    v.add_argument("--seed", type=int, default=0, help="seed of the prompts' token content")
    v.add_argument("--out", default=None, help="output folder (default reports/verify-<time>)")
    v.add_argument("--only", nargs="+", default=[], metavar="CONFIG_ID",
                   help="verify only these configs of the shortlist")
    v.add_argument("--force", action="store_true",
                   help="measure configs again even if their folder says done")
    v.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    from sim.errors import InputError
    from verify.engines import EngineInstall
    from verify.run import VerifyOptions, verify

    from .cli import _run_dir

    env = {}
    for kv in args.engine_env:
        k, sep, val = kv.partition("=")
        if not sep or not k:
            raise InputError("--engine-env", f"{kv!r} is not KEY=VALUE", "write e.g. "
                             "--engine-env VLLM_CPU_KVCACHE_SPACE=1")
        env[k] = val
    overrides = list(args.set)
    if args.trace:
        overrides.append(f"workload.trace={Path(args.trace).resolve()}")
    if args.recheck_after and not args.calibrate_first:
        raise InputError("--recheck-after", "given without --calibrate-first: there is no "
                         "in-place profile to recheck against", "add --calibrate-first")
    if args.profile and args.calibrate_first:
        raise InputError("--profile", "given with --calibrate-first, which fits each config's "
                         "profile on its own engine", "drop one of the two")
    if args.profile:
        from calibrate.profile import load_profile

        profile, _ = load_profile(args.profile)
        overrides += [f"timing.profile.{k}={v!r}" for k, v in profile.to_dict().items()]
    engine_cpus = cpu_list(args.engine_cpus, "--engine-cpus")
    loadgen_cpus = cpu_list(args.loadgen_cpus, "--loadgen-cpus")
    core_cpus = cpu_list(args.engine_core_cpus, "--engine-core-cpus")
    if loadgen_cpus:
        if not engine_cpus:  # an engine started from here would inherit the pin
            engine_cpus = tuple(sorted(os.sched_getaffinity(0)))
        os.sched_setaffinity(0, loadgen_cpus)
    if not args.endpoints and not args.model_path:
        raise InputError("--model-path", "missing", "give the weights the engine should "
                         "serve, or --endpoints of engines that already run")
    opts = VerifyOptions(
        engine=args.engine, model_path=args.model_path, served_model_name=args.served_model_name,
        endpoints=args.endpoints,
        install=EngineInstall(python=args.engine_python, llama_server=args.llama_server,
                              env=env, extra_args=tuple(args.engine_arg),
                              nice=args.engine_nice, cpus=engine_cpus,
                              core_cpus=core_cpus),
        base_port=args.port, ready_timeout_s=args.ready_timeout,
        stall_timeout_s=args.stall_timeout, scrape_interval_s=args.scrape_interval,
        warmup_requests=args.warmup, overrides=overrides, seed=args.seed, force=args.force,
        only=args.only, http_client=args.http_client, calibrate_plan=args.calibrate_first,
        recheck_after=args.recheck_after)
    out = _run_dir(Path("reports"), "verify", args.out)
    result = verify(Path(args.shortlist), out, opts)
    print(format_comparison(result.comparison))
    for name, path in result.report.items():
        print(f"  wrote {name}: {path}")
    return 0


def cpu_list(text: str | None, flag: str) -> tuple[int, ...]:
    """'0', '0,2' or '0-3' as processor numbers this process may use; () for None."""
    from sim.errors import InputError

    if text is None:
        return ()
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            cpus.update(range(int(lo), int(hi if sep else lo) + 1))
    except ValueError:
        raise InputError(flag, f"{text!r} is not a processor list",
                         "write e.g. 0, 0,2 or 0-3") from None
    allowed = os.sched_getaffinity(0)
    if not cpus or not cpus <= allowed:
        raise InputError(flag, f"{text!r}: not among this machine's processors "
                         f"{sorted(allowed)}", "pick processors this machine has")
    return tuple(sorted(cpus))


def format_comparison(comparison: Any) -> str:
    """Predicted / measured / error of the headline figures, config by config."""
    t = comparison.table()
    shown = [("ttft_s", "p50"), ("ttft_s", "p90"), ("tpot_s", "p50"), ("tpot_s", "p90"),
             ("e2e_s", "p50"), ("output_throughput_tokens_per_s", "value"),
             ("prefix_cache_hit_rate", "value")]
    lines = []
    for cid, g in t.groupby("config_id", sort=False):
        lines.append(f"\n{cid}  ({g['label'].iloc[0]}; {int(g['num_compared'].iloc[0])} "
                     f"requests compared, {int(g['num_excluded'].iloc[0])} excluded)")
        lines.append(f"  {'figure':<28}{'predicted':>12}{'measured':>12}{'error':>9}")
        for metric, stat in shown:
            row = g[(g.metric == metric) & (g.stat == stat)]
            if row.empty:
                continue
            r = row.iloc[0]
            ms = metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s")
            name = f"{metric.removesuffix('_s')} {stat} (ms)" if ms else metric
            scale = 1e3 if ms else 1.0
            err = "" if r.rel_error != r.rel_error else f"{100 * r.rel_error:+.0f} %"
            lines.append(f"  {name:<28}{r.predicted * scale:>12,.3f}{r.measured * scale:>12,.3f}"
                         f"{err:>9}")
    for ra in comparison.ranks:
        if ra.metric in ("ttft_s", "output_throughput_tokens_per_s") and ra.stat in ("p90",
                                                                                   "value"):
            lines.append(f"\nrank {ra.metric} {ra.stat}: predicted best {ra.predicted_best}, "
                         f"measured best {ra.measured_best}"
                         + (f", Spearman {ra.spearman_rho:.2f}" if ra.spearman_rho ==
                            ra.spearman_rho else f" ({ra.reason})"))
    return "\n".join(lines)
