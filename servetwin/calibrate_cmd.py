"""`servetwin calibrate`: fit a timing profile to measured forward passes, print k-fold errors;
with --against OLD.yaml, say how far new measurements sit from that profile (calibrate.drift).

    servetwin calibrate MEASUREMENTS... --model M --gpu G --out PROFILE.yaml
    servetwin calibrate --against OLD.yaml MEASUREMENTS... [--out DIR | --out FILE.json]

--against writes the report to stdout; --out DIR adds DIR/drift.json, drift.csv (one row
per regime), drift_samples.csv (one row per sample) and drift.txt (the stdout report);
--out FILE.json writes FILE.json, FILE.csv and FILE_samples.csv instead. The exit status is
0 whether or not anything moved; 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any


def add_parser(sub: Any) -> None:
    c = sub.add_parser("calibrate", help="fit a timing profile to measured forward passes "
                       "and write it as YAML")
    c.add_argument("measurements", nargs="*", metavar="MEASUREMENTS",
                   help="measured forward passes: measurement CSV / parquet, Splitwise "
                   "perf_model.csv, a Vidur profiling folder, SGLang forward-pass metrics "
                   "or server log, llama-server timings (format told from the file)")
    c.add_argument("--format", default=None, dest="fmt", metavar="FMT",
                   help="the MEASUREMENTS format when it cannot be told: measurements, "
                   "splitwise, vidur, sglang-metrics, sglang-log, llama-timings")
    c.add_argument("--from-aiconfigurator", nargs=2, metavar=("SYSTEM", "BACKEND"),
                   help="compose samples from AIConfigurator op tables, e.g. h100_sxm vllm")
    c.add_argument("--aic-dir", default=None,
                   help="AIConfigurator table root (default $SERVETWIN_AIC_DIR or "
                   "shared/data/timing/aiconfigurator)")
    c.add_argument("--aic-version", default=None, metavar="V",
                   help="backend version folder of the op tables (default: the newest per "
                   "table); a table V lacks comes from the newest version that has it")
    c.add_argument("--aic-max-tokens", type=int, default=16384, metavar="N",
                   help="largest prefill batch (tokens) composed from the op tables")
    c.add_argument("--against", default=None, metavar="OLD.yaml",
                   help="do not fit: report how far the samples sit from this profile's "
                   "predictions, per regime")
    c.add_argument("--threshold", type=float, default=5.0, metavar="PCT",
                   help="with --against, for a profile without stored intervals: a regime "
                   "moved when |median error| exceeds PCT %% (default 5)")
    c.add_argument("--model", default=None, help="model name or config.json (with "
                   "--against: default the profile's)")
    c.add_argument("--gpu", default=None, help="GPU name or spec file (with --against: "
                   "default the profile's)")
    c.add_argument("--tp", type=int, default=None, help="TP degree (default 1, or the "
                   "profile's with --against)")
    c.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp8"),
                   help="default bf16, or the profile's with --against")
    c.add_argument("--loss", default="soft_l1", choices=("linear", "soft_l1", "huber", "cauchy"))
    c.add_argument("--level", default="robust", choices=("robust", "mean"),
                   help="mean: scale the robust fit's step times so the samples' total time "
                   "matches (a noisy engine's latency includes its slow steps)")
    c.add_argument("--k", type=int, default=5, help="folds of the held-out error")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default=None, help="profile YAML to write (required to fit); "
                   "with --against, a report folder or FILE.json")
    c.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    import pandas as pd

    from calibrate import aiconfigurator as aic
    from calibrate.fit import fit, kfold
    from calibrate.profile import profile_doc, write_profile
    from sim.catalog import load_gpu, load_model
    from sim.errors import ConfigError, InputError

    if not args.measurements and not args.from_aiconfigurator:
        raise InputError("calibrate", "no samples", "give MEASUREMENTS files or "
                         "--from-aiconfigurator SYSTEM BACKEND")
    if args.against:
        return cmd_drift(args)
    for flag in ("model", "gpu", "out"):
        if getattr(args, flag) is None:
            raise InputError("calibrate", f"--{flag} is missing", f"give --{flag} (or "
                             "--against OLD.yaml to compare instead of fitting)")
    args.tp = 1 if args.tp is None else args.tp
    args.dtype = args.dtype or "bf16"
    model, gpu = load_model(args.model), load_gpu(args.gpu)
    try:
        model.check_tp(args.tp)
    except ConfigError as e:
        raise InputError("--tp", str(e), "pick a TP degree the model splits evenly") from None
    frames = [_load(args, p, model.name, gpu.name) for p in args.measurements]
    if args.from_aiconfigurator:
        frames.append(_aic_samples(args, model, gpu))
    df = pd.concat(frames, ignore_index=True)
    result = fit(df, model, gpu, args.tp, args.dtype, loss=args.loss, level=args.level)
    folds = kfold(df, model, gpu, args.tp, args.dtype, loss=args.loss, k=args.k,
                  seed=args.seed, level=args.level)
    first = df.iloc[0]
    doc = profile_doc(result, gpu=str(first["gpu"]) or gpu.name, engine=str(first["engine"]),
                      engine_version=str(first["engine_version"]), model=model.name,
                      dtype=args.dtype, tp=args.tp, sources=aic.sources(df), kfold=folds)
    if args.level == "mean":
        doc["provenance"]["level"] = "mean"
        doc["provenance"]["level_factor"] = result.level_factor
    path = write_profile(args.out, doc)
    print(f"servetwin calibrate: {model.name} on {gpu.name} TP {args.tp} {args.dtype}: "
          f"{len(df)} samples, loss {args.loss}"
          + (f", level mean (x {result.level_factor:.3f})" if args.level == "mean" else ""))
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


def _aic_samples(args: argparse.Namespace, model: Any, gpu: Any) -> Any:
    """Samples composed from op tables; says which version each table came from when a
    requested --aic-version lacks some (those tables are held at another version)."""
    from calibrate import aiconfigurator as aic

    system, backend = args.from_aiconfigurator
    df = aic.samples(model, gpu, args.tp, system, backend, args.dtype, args.aic_dir,
                     max_tokens=args.aic_max_tokens, version=args.aic_version)
    used = aic.table_versions(df)
    held = {t: v for t, v in used.items() if args.aic_version and v != args.aic_version}
    if held:
        print(f"  note: {system}/{backend} {args.aic_version} has no "
              f"{', '.join(sorted(held))}; held fixed at "
              f"{', '.join(f'{t} {v}' for t, v in sorted(held.items()))}")
    return df


def _from_profile(flag: str | None, stored: Any, field: str, path: str,
                  load: Callable[[str], Any]) -> Any:
    """The catalog entry (model or GPU) named by --FIELD if given, else by the profile's
    provenance; an unknown provenance name is the profile's fault, named as such."""
    from sim.errors import InputError

    if flag is not None:
        return load(flag)
    if not isinstance(stored, str) or not stored:
        raise InputError(f"{path}: provenance.{field}", f"{stored!r}: missing",
                         f"give --{field}")
    try:
        return load(stored)
    except InputError as e:
        raise InputError(f"{path}: provenance.{field}", f"{stored!r}: {e.message}",
                         f"give --{field}") from None


def _against_setup(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, int, str]:
    """(profile, meta, model, gpu, tp, dtype): flags where given, else the profile's
    provenance; a flag that contradicts the provenance's model, TP or dtype is an error."""
    from calibrate.profile import load_profile
    from sim.catalog import load_gpu, load_model
    from sim.errors import ConfigError, InputError

    path = args.against
    profile, meta = load_profile(path)
    prov = meta["provenance"]
    model = _from_profile(args.model, prov.get("model"), "model", path, load_model)
    stored_model = prov.get("model")
    if args.model is not None and stored_model and stored_model != model.name:
        try:
            stored_name = load_model(str(stored_model)).name
        except InputError:
            stored_name = str(stored_model)
        if stored_name != model.name:
            raise InputError(f"{path}: provenance.model", f"{stored_model!r}, --model "
                             f"{args.model!r}", "compare a profile of the same model (drop "
                             "--model)")
    gpu = _from_profile(args.gpu, prov.get("gpu"), "gpu", path, load_gpu)
    stored_tp = prov.get("tp", 1 if args.tp is None else args.tp)
    if isinstance(stored_tp, bool) or not isinstance(stored_tp, int) or stored_tp < 1:
        raise InputError(f"{path}: provenance.tp", f"{stored_tp!r}: not a TP degree",
                         "an integer >= 1; re-run `servetwin calibrate`")
    if args.tp is not None and args.tp != stored_tp:
        raise InputError(f"{path}: provenance.tp", f"{stored_tp}, --tp {args.tp}",
                         "compare samples of the profile's TP degree (drop --tp)")
    stored_dtype = prov.get("dtype") or args.dtype or "bf16"
    if args.dtype is not None and args.dtype != stored_dtype:
        raise InputError(f"{path}: provenance.dtype", f"{stored_dtype!r}, --dtype "
                         f"{args.dtype}", "compare samples of the profile's dtype")
    if stored_dtype not in ("bf16", "fp16", "fp8"):
        raise InputError(f"{path}: provenance.dtype", f"{stored_dtype!r}: unknown",
                         "use bf16, fp16 or fp8")
    try:
        model.check_tp(stored_tp)
    except ConfigError as e:
        raise InputError(f"{path}: provenance.tp", str(e), "refit the profile") from None
    return profile, meta, model, gpu, stored_tp, str(stored_dtype)


def _load(args: argparse.Namespace, path: str, model: str, gpu: str) -> Any:
    """One MEASUREMENTS file in any format calibrate.importers reads; its warnings
    (rows dropped, an engine version not known) printed as one line each."""
    import warnings

    from calibrate import importers

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = importers.load_any(path, args.fmt, tp=args.tp, model=model, gpu=gpu)
    for w in caught:  # (dropped rows are in the notes too)
        if not issubclass(w.category, importers.DroppedRowsWarning):
            print(f"  warning: {path}: {w.message}", file=sys.stderr)
    for note in df.attrs.get("notes", []):
        print(f"  note: {path}: {note}", file=sys.stderr)
    return df


def cmd_drift(args: argparse.Namespace) -> int:
    import pandas as pd

    from calibrate import drift as dr

    profile, meta, model, gpu, tp, dtype = _against_setup(args)
    args.tp, args.dtype = tp, dtype
    frames = [dr.check_samples(_load(args, p, model.name, gpu.name), model.name, tp, p)
              for p in args.measurements]
    if args.from_aiconfigurator:
        frames.append(_aic_samples(args, model, gpu))
    df = pd.concat(frames, ignore_index=True)
    result = dr.drift(df, profile, meta, model, gpu, tp, dtype,
                      threshold=args.threshold / 100, where=args.against)
    text = format_drift(result, args.against, meta, df)
    print(text)
    if args.out:
        for path in _write_drift(result, args.out, text, args.against):
            print(f"  wrote {path}")
    return 0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{round(100 * x, 1) + 0.0:+.1f} %"


def _ape(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _who(prov: Any) -> str:
    bits = [str(prov.get(k)) for k in ("engine", "engine_version", "gpu", "model", "dtype")
            if prov.get(k)]
    return " ".join(bits) + (f" TP {prov['tp']}" if prov.get("tp") else "")


def format_drift(result: Any, path: str, meta: Any, df: Any) -> str:
    first = df.iloc[0]
    new = {k: ", ".join(sorted(set(df[k]) - {""})) for k in ("engine", "engine_version",
                                                            "gpu")}
    lines = [f"servetwin calibrate --against {path}",
             f"  profile: {_who(meta['provenance'])}",
             f"  samples: {len(df)} ({new['engine']} {new['engine_version']} {new['gpu']} "
             f"{first['model']} TP {first['tp']})",
             "  error = measured / predicted - 1 (+: slower than the profile predicts); "
             "APE = |predicted / measured - 1|",
             f"  90 % interval: {result.intervals_from or 'none stored'}",
             f"  {'regime':<8} {'samples':>7} {'median':>8} {'p10':>8} {'p90':>8} "
             f"{'med APE':>8} {'old APE':>8} {'outside':>8}  verdict"]
    for r in result.regimes:
        out = "-" if r.fraction_outside is None else f"{100 * r.fraction_outside:.0f} %"
        lines.append(f"  {r.regime:<8} {r.num_samples:>7} {_pct(r.median_error):>8} "
                     f"{_pct(r.p10_error):>8} {_pct(r.p90_error):>8} {_ape(r.median_ape):>8} "
                     f"{_ape(r.old_median_ape):>8} {out:>8}  {r.verdict}".rstrip())
    lines.append(f"  overall: {result.verdict}")
    lines += [f"  note: {n}" for n in result.notes]
    return "\n".join(lines)


def _write_drift(result: Any, out: str, text: str, profile_path: str) -> list[Any]:
    """DIR -> DIR/drift.{json,csv,txt} + drift_samples.csv; FILE.json -> FILE.json,
    FILE.csv, FILE_samples.csv."""
    import json
    from pathlib import Path

    import pandas as pd

    from sim.errors import InputError

    target = Path(out)
    if target.suffix == ".json":
        paths = [target, target.with_suffix(".csv"),
                 target.with_name(f"{target.stem}_samples.csv")]
    else:
        paths = [target / "drift.json", target / "drift.csv", target / "drift_samples.csv",
                 target / "drift.txt"]
    doc = {"profile": profile_path, **result.as_dict()}
    table = pd.DataFrame([{"regime": g, **{k: v for k, v in d.items() if k != "interval"},
                           "interval_lo": (d["interval"] or [None])[0],
                           "interval_hi": (d["interval"] or [None, None])[1]}
                          for g, d in doc["regimes"].items()])
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        paths[0].write_text(json.dumps(doc, indent=2) + "\n")
        table.to_csv(paths[1], index=False)
        result.samples.to_csv(paths[2], index=False)
        if len(paths) > 3:
            paths[3].write_text(text + "\n")
    except OSError as e:
        raise InputError(str(e.filename or out), f"cannot write ({e.strerror or e})",
                         "choose a writable --out folder") from None
    return paths
