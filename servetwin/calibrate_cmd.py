"""`servetwin calibrate`: fit a timing profile to measured forward passes, print k-fold errors."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    c = sub.add_parser("calibrate", help="fit a timing profile to measured forward passes "
                       "and write it as YAML")
    c.add_argument("measurements", nargs="*", metavar="MEASUREMENTS",
                   help="CSV / parquet files in the calibrate.measurements schema")
    c.add_argument("--from-aiconfigurator", nargs=2, metavar=("SYSTEM", "BACKEND"),
                   help="compose samples from AIConfigurator op tables, e.g. h100_sxm vllm")
    c.add_argument("--aic-dir", default=None,
                   help="AIConfigurator table root (default $SERVETWIN_AIC_DIR or "
                   "shared/data/timing/aiconfigurator)")
    c.add_argument("--model", required=True, help="model name or config.json")
    c.add_argument("--gpu", required=True, help="GPU name or spec file")
    c.add_argument("--tp", type=int, default=1)
    c.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp8"))
    c.add_argument("--loss", default="soft_l1", choices=("linear", "soft_l1", "huber", "cauchy"))
    c.add_argument("--k", type=int, default=5, help="folds of the held-out error")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True, help="profile YAML to write")
    c.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    import pandas as pd

    from calibrate import aiconfigurator as aic
    from calibrate import measurements
    from calibrate.fit import fit, kfold
    from calibrate.profile import profile_doc, write_profile
    from sim.catalog import load_gpu, load_model
    from sim.errors import ConfigError, InputError

    if not args.measurements and not args.from_aiconfigurator:
        raise InputError("calibrate", "no samples", "give MEASUREMENTS files or "
                         "--from-aiconfigurator SYSTEM BACKEND")
    model, gpu = load_model(args.model), load_gpu(args.gpu)
    try:
        model.check_tp(args.tp)
    except ConfigError as e:
        raise InputError("--tp", str(e), "pick a TP degree the model splits evenly") from None
    frames = [measurements.read(p) for p in args.measurements]
    if args.from_aiconfigurator:
        system, backend = args.from_aiconfigurator
        frames.append(aic.samples(model, gpu, args.tp, system, backend, args.dtype,
                                  args.aic_dir))
    df = pd.concat(frames, ignore_index=True)
    result = fit(df, model, gpu, args.tp, args.dtype, loss=args.loss)
    folds = kfold(df, model, gpu, args.tp, args.dtype, loss=args.loss, k=args.k,
                  seed=args.seed)
    first = df.iloc[0]
    doc = profile_doc(result, gpu=str(first["gpu"]) or gpu.name, engine=str(first["engine"]),
                      engine_version=str(first["engine_version"]), model=model.name,
                      dtype=args.dtype, tp=args.tp, sources=aic.sources(df), kfold=folds)
    path = write_profile(args.out, doc)
    print(f"servetwin calibrate: {model.name} on {gpu.name} TP {args.tp} {args.dtype}: "
          f"{len(df)} samples, loss {args.loss}")
    print(f"  {args.k}-fold held-out error |predicted / measured - 1|:")
    print(f"  {'regime':<8} {'samples':>7} {'median':>8} {'mean':>8} {'p90':>8}")
    for g, s in folds.by_regime.items():
        print(f"  {g:<8} {s['num_samples']:>7} {100 * s['median_ape']:>7.2f}% "
              f"{100 * s['mean_ape']:>7.2f}% {100 * s['p90_ape']:>7.2f}%")
    coeffs = ", ".join(f"{k} {v:.4g}" for k, v in result.profile.to_dict().items())
    print(f"  fitted: {coeffs}")
    if result.not_identified:
        print(f"  not identified (kept at prior): {', '.join(result.not_identified)}")
    if result.at_bound:
        print(f"  at a bound: {', '.join(result.at_bound)}")
    print(f"  wrote {path}")
    return 0
