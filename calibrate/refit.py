"""End-to-end refit: move a timing profile until the simulated replay matches the measured one.

    python -m calibrate.refit VERIFY_DIR --profile P.yaml --out NEW.yaml [--json NUMBERS.json]

A `servetwin verify` folder holds, per config, the measured requests of a real-engine replay
(``<config_id>/records.jsonl``) and the engine's counters and resolved KV cache
(``done.json``); ``comparison.json`` holds every config's scenario as verified
(``meta.configs``) and the shortlist it came from (``meta.shortlist``). Each config is
simulated again exactly as verify's ``predict`` does (same trace, knobs, and the engine's own
KV block count), with the timing profile swapped for a candidate, and compared as
``verify.compare`` does (requests ok on both sides, ``sim.metrics.summarize`` on each side).

What is re-fitted, and why only that. The per-step fit (calibrate.fit) sees forward passes
from the engine's iteration log; it pins the *shape* of the step time — prefill against
decode, GEMM against attention — but not what happens around the logged pass in a served
replay:

  efficiency_scale     one factor on gemm_compute_eff, gemm_mem_eff, attn_prefill_eff,
                       attn_decode_eff (their ratios are kept): the whole engine running
                       uniformly slower or faster than when it was profiled (a core shared
                       with the load generator and API server, nice levels, a different
                       scheduling mode). An efficiency the factor would take past 1 stays
                       at 1 (a per-step fit often leaves one at that bound already), so all
                       stay in (0, 1]; the factor ends where the smallest one reaches 1.
  step_overhead_s      per-step host work the iteration log does not time: scheduling,
                       output processing, detokenising and streaming between passes.
  per_seq_overhead_s   the part of that work that grows with the batch (per-request
                       detokenise and SSE chunk).

comm_eff and allreduce_latency_s are left alone (a TP-1 replay says nothing about them), as
is every efficiency ratio: a dozen latency percentiles cannot separate four efficiencies.

The objective is the sum over configs and targets (TTFT and TPOT, p50 and p90) of
log(predicted / measured)², minimised by scipy's bounded least squares (trf, finite
differences). Each evaluation simulates every fitted config once. With two or more configs
each is also held out in turn (fit on the others, error on it), so the refit is not judged
only on what it was fitted to. Errors are reported as verify does:
(predicted − measured) / measured.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from sim.errors import InputError, ServetwinError
from sim.metrics import Records, summarize
from sim.scenario import validate_scenario
from sim.simulate import Resolved, resolve, simulate
from sim.timing import RooflineTiming, TimingModel, TimingProfile
from verify.compare import json_safe, subset
from verify.records import read_records, to_sim_records

from .profile import load_profile, one_line, write_profile

TARGETS = (("ttft_s", "p50"), ("ttft_s", "p90"), ("tpot_s", "p50"), ("tpot_s", "p90"))
SCALED = ("gemm_compute_eff", "gemm_mem_eff", "attn_prefill_eff", "attn_decode_eff")
FREE = ("efficiency_scale", "step_overhead_s", "per_seq_overhead_s")
# optimiser units, so one unit moves each parameter by a comparable share of a step:
# log of the scale, the step overhead in ms, the per-sequence overhead in 0.1 ms
_UNITS_S = (1.0, 1e-3, 1e-4)
MISS = 5.0  # log-residual of a target the simulation leaves without a value (e^5 off)
Errors = dict[str, dict[str, float]]  # "ttft_s p50" -> {predicted, measured, rel_error}


@dataclass
class Case:
    """One verified config, resolved once, ready to simulate with any profile."""

    config_id: str
    resolved: Resolved
    measured: Records
    targets: tuple[tuple[str, str], ...]  # those with a finite positive measured value
    _measured_summaries: dict[bytes, dict[str, Any]] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Fit:
    profile: TimingProfile
    params: dict[str, float]  # FREE -> fitted value
    fitted_on: tuple[str, ...]
    num_evals: int
    cost: float  # Σ log(predicted / measured)² at the end
    at_bound: tuple[str, ...]


@dataclass
class RefitResult:
    verify_dir: Path
    start: TimingProfile
    fit: Fit
    before: dict[str, Errors]  # config_id -> errors with the starting profile
    after: dict[str, Errors]  # ... with the profile fitted on every config
    held_out: dict[str, tuple[Fit, Errors]]  # config_id -> (fit on the others, its errors)
    notes: list[str]


# ------------------------------------------------------------------ loading
def load_cases(verify_dir: Path, start: TimingProfile, shortlist: Path | None = None
               ) -> tuple[list[Case], list[str]]:
    """The configs of a verify folder with their scenarios. comparison.json's recorded
    scenarios are used when it exists (relative trace paths resolve against its
    meta.shortlist, or ``shortlist``); without it ``shortlist`` supplies them."""
    verify_dir = Path(verify_dir)
    if not verify_dir.is_dir():
        raise InputError(str(verify_dir), "not a folder",
                         "give the --out folder of a finished `servetwin verify`")
    notes: list[str] = []
    comp = verify_dir / "comparison.json"
    if comp.is_file():
        scenarios, engine, base = _recorded(comp, shortlist)
        notes.append(f"scenarios as recorded in {comp}; relative paths from {base.parent}")
    elif shortlist is not None:
        # verify's own loader, so the configs are read exactly as verify read them; by
        # name, because verify/run.py (deploy, engines) is outside mypy's scope (STYLE)
        entries = importlib.import_module("verify.run").load_configs(shortlist)
        scenarios = [(e.config_id, dict(e.loaded.raw)) for e in entries
                     if (verify_dir / e.config_id).is_dir()]
        if not scenarios:
            raise InputError(str(verify_dir), f"no folder for any config of {shortlist} "
                             f"({', '.join(e.config_id for e in entries)})",
                             "give the shortlist that verify ran")
        engine, base = "", shortlist
        notes.append(f"no comparison.json: scenarios from {shortlist}")
        skipped = [e.config_id for e in entries if not (verify_dir / e.config_id).is_dir()]
        if skipped:
            notes.append(f"not measured in {verify_dir}, left out: {', '.join(skipped)}")
    else:
        raise InputError(str(comp), "missing (the verify run did not finish its report)",
                         "give --shortlist, the shortlist.yaml verify ran, to supply the "
                         "scenarios")
    return [_case(verify_dir, cid, raw, engine, base, start) for cid, raw in scenarios], notes


def _recorded(comp: Path, shortlist: Path | None
              ) -> tuple[list[tuple[str, dict[str, Any]]], str, Path]:
    try:
        meta = json.loads(comp.read_text(encoding="utf-8"))["meta"]
        configs = meta["configs"]
        out = [(str(c["config_id"]), dict(c["scenario"])) for c in configs]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{comp}: meta.configs", f"unreadable ({type(e).__name__}: {e})",
                         "give a folder written by `servetwin verify`") from None
    if not out:
        raise InputError(f"{comp}: meta.configs", "empty", "rerun verify")
    recorded = meta.get("shortlist")
    base = shortlist or (Path(recorded) if recorded else comp)
    return out, str(meta.get("engine") or ""), base


def _case(verify_dir: Path, cid: str, raw: dict[str, Any], engine: str, base: Path,
          start: TimingProfile) -> Case:
    cdir = verify_dir / cid
    done_path = cdir / "done.json"
    if not done_path.is_file():
        raise InputError(str(done_path), "missing: this config was never measured to the end",
                         "rerun verify on it (it resumes), or leave it out of the folder")
    try:
        done = json.loads(done_path.read_text(encoding="utf-8"))
        blocks = done.get("engine_info", {}).get("num_gpu_blocks")
    except (OSError, ValueError, AttributeError) as e:
        raise InputError(str(done_path), f"unreadable ({type(e).__name__})",
                         "rerun verify on this config") from None
    raw = json.loads(json.dumps(raw))
    raw.pop("search", None)
    raw.pop("config_id", None)
    # the candidate profile is swapped in per evaluation; no profile file is needed
    raw["timing"] = {"kind": "roofline", "profile": start.to_dict()}
    if isinstance(raw.get("simulation"), dict):
        raw["simulation"]["intervals"] = False
    kind = engine or str(raw.get("engine", {}).get("kind", "vllm"))
    eng = raw.setdefault("engine", {})
    # as verify.run.predict: vLLM's own block count unless the scenario pins one
    if kind == "vllm" and eng.get("num_gpu_blocks_override") is None and \
            blocks not in (None, "", "None"):
        eng["num_gpu_blocks_override"] = int(blocks)
    where = f"{verify_dir / 'comparison.json'}: config {cid}"
    try:
        resolved = resolve(validate_scenario(raw, {}, base, []))
    except InputError as e:
        raise InputError(where, f"{e.where}: {e.message}",
                         (f"{e.fix}; " if e.fix else "") + "a relative trace path resolves from "
                         "the shortlist's folder: run from where verify ran, or give "
                         "--shortlist") from None
    except ServetwinError as e:
        raise InputError(where, one_line(e), "fix the recorded scenario") from None
    if not isinstance(resolved.timing, RooflineTiming):
        raise InputError(where, f"timing model {type(resolved.timing).__name__}",
                         "only the roofline timing can be refitted")
    measured = to_sim_records(read_records(cdir / "records.jsonl"))
    ok = measured.columns["status"] == "ok"
    if not ok.any():
        raise InputError(str(cdir / "records.jsonl"), "no request completed ok",
                         "leave this config out: it has nothing to fit")
    ms = summarize(subset(measured, np.flatnonzero(ok)))
    targets = tuple((m, s) for m, s in TARGETS if math.isfinite(ms[m][s]) and ms[m][s] > 0)
    return Case(cid, resolved, measured, targets)


# --------------------------------------------------------------- evaluating
def with_params(start: TimingProfile, params: dict[str, float],
                ceiling: float = 1.0) -> TimingProfile:
    """``start`` with the scale on its efficiencies (each held at the device's
    efficiency_ceiling) and the two overheads."""
    scale = params["efficiency_scale"]
    values = {k: min(ceiling, getattr(start, k) * scale) for k in SCALED}
    return replace(start, step_overhead_s=params["step_overhead_s"],
                   per_seq_overhead_s=params["per_seq_overhead_s"], **values)


def _timing_of(case: Case) -> RooflineTiming:
    t = case.resolved.timing
    assert isinstance(t, RooflineTiming)  # load_cases checked it
    return t


def _timing(t: TimingModel, profile: TimingProfile) -> TimingModel:
    assert isinstance(t, RooflineTiming)  # load_cases checked it
    return RooflineTiming(t.model, t.gpu, t.tp, t.dtype, profile, kv_dtype=t.kv_dtype)


def case_errors(case: Case, profile: TimingProfile) -> Errors:
    r = case.resolved
    pools = None if r.pools is None else \
        {n: (c, _timing(t, profile), note) for n, (c, t, note) in r.pools.items()}
    pred = simulate(replace(r, timing=_timing(r.timing, profile), pools=pools)).records
    pred_ids = pred.columns["request_id"]
    meas_ids = case.measured.columns["request_id"]
    both = np.intersect1d(pred_ids[pred.columns["status"] == "ok"],
                          meas_ids[case.measured.columns["status"] == "ok"])
    nan = float("nan")
    if not both.size:
        return {f"{m} {s}": {"predicted": nan, "measured": nan, "rel_error": nan}
                for m, s in TARGETS}
    ps = summarize(subset(pred, pd.Index(pred_ids).get_indexer(both)))
    key = both.tobytes()
    if key not in case._measured_summaries:
        case._measured_summaries[key] = summarize(
            subset(case.measured, pd.Index(meas_ids).get_indexer(both)))
    ms = case._measured_summaries[key]
    out = {}
    for m, s in TARGETS:
        p, v = float(ps[m][s]), float(ms[m][s])
        rel = (p - v) / v if math.isfinite(p) and math.isfinite(v) and v > 0 else nan
        out[f"{m} {s}"] = {"predicted": p, "measured": v, "rel_error": rel}
    return out


def _residuals(cases: list[Case], profile: TimingProfile) -> np.ndarray:
    res = []
    for case in cases:
        errs = case_errors(case, profile)
        for m, s in case.targets:
            e = errs[f"{m} {s}"]
            ok = math.isfinite(e["predicted"]) and e["predicted"] > 0
            res.append(math.log(e["predicted"] / e["measured"]) if ok else MISS)
    return np.asarray(res, dtype=np.float64)


# ------------------------------------------------------------------ fitting
def fit(cases: list[Case], start: TimingProfile, max_evals: int = 40) -> Fit:
    """Bounded least squares of the log errors over FREE, from the starting profile."""
    lowest = min(getattr(start, k) for k in SCALED)
    highest = max(getattr(start, k) for k in SCALED)
    # the devices' efficiency ceiling (1 on a GPU: the scale goes as far as brings the
    # lowest efficiency to 1, the others held there; more where the catalog's rates are
    # nominal: as far as brings the highest to it)
    ceiling = min(_timing_of(c).gpu.efficiency_ceiling for c in cases)
    top = -math.log(lowest) if ceiling <= 1.0 else math.log(ceiling / highest)
    x0 = np.array([0.0, start.step_overhead_s / _UNITS_S[1],
                   start.per_seq_overhead_s / _UNITS_S[2]])
    lower = np.array([math.log(1e-3), 0.0, 0.0])
    upper = np.array([max(top, 0.0), np.inf, np.inf])

    def params(x: np.ndarray) -> dict[str, float]:
        return {"efficiency_scale": math.exp(float(x[0])),
                "step_overhead_s": float(x[1]) * _UNITS_S[1],
                "per_seq_overhead_s": float(x[2]) * _UNITS_S[2]}

    def fun(x: np.ndarray) -> np.ndarray:
        return _residuals(cases, with_params(start, params(x), ceiling))

    # a 2 % finite-difference step: smaller ones fall between scheduling decisions, where
    # a percentile moves in small jumps
    sol = least_squares(fun, x0, bounds=(lower, upper), method="trf", diff_step=0.02,
                        max_nfev=max_evals)
    x = np.clip(sol.x, lower, upper)
    at = tuple(name for name, v, lo, hi in zip(FREE, x, lower, upper, strict=True)
               if v <= lo + 1e-4 or v >= hi - 1e-4)
    best = params(x)
    # least_squares counts its finite-difference evaluations apart (jac's nfev)
    num_evals = int(sol.nfev) + int(sol.njev or 0) * len(x0)
    return Fit(with_params(start, best, ceiling), best, tuple(c.config_id for c in cases),
               num_evals, float(np.sum(fun(x) ** 2)), at)


def refit(verify_dir: Path, start: TimingProfile, shortlist: Path | None = None,
          max_evals: int = 40, leave_one_out: bool = True,
          only: list[str] | None = None) -> RefitResult:
    cases, notes = load_cases(verify_dir, start, shortlist)
    if only:
        unknown = sorted(set(only) - {c.config_id for c in cases})
        if unknown:
            raise InputError("--only", f"{', '.join(unknown)}: no such config",
                             f"choose from {', '.join(c.config_id for c in cases)}")
        cases = [c for c in cases if c.config_id in only]
    for c in cases:
        if len(c.targets) < len(TARGETS):
            left = [f"{m} {s}" for m, s in TARGETS if (m, s) not in c.targets]
            notes.append(f"{c.config_id}: no measured {', '.join(left)}: not fitted")
    before = {c.config_id: case_errors(c, start) for c in cases}
    full = fit(cases, start, max_evals)
    after = {c.config_id: case_errors(c, full.profile) for c in cases}
    held_out: dict[str, tuple[Fit, Errors]] = {}
    if leave_one_out and len(cases) >= 2:
        for c in cases:
            f = fit([o for o in cases if o is not c], start, max_evals)
            held_out[c.config_id] = (f, case_errors(c, f.profile))
    elif leave_one_out:
        notes.append("one config: nothing to hold out")
    return RefitResult(Path(verify_dir), start, full, before, after, held_out, notes)


# ------------------------------------------------------------------ output
def _key_errors(errs: dict[str, Errors]) -> dict[str, dict[str, float]]:
    return {cid: {k: v["rel_error"] for k, v in e.items()} for cid, e in errs.items()}


def moved(start: TimingProfile, new: TimingProfile) -> dict[str, dict[str, float]]:
    a, b = start.to_dict(), new.to_dict()
    return {k: {"before": a[k], "after": b[k], "ratio": b[k] / a[k] if a[k] else math.inf}
            for k in a if not math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-15)}


def numbers(result: RefitResult) -> dict[str, Any]:
    """Every figure of the refit, plain JSON (NaN as null)."""
    errors = {cid: {k: {"measured": e["measured"], "before_predicted": e["predicted"],
                        "before_rel_error": e["rel_error"],
                        "after_predicted": result.after[cid][k]["predicted"],
                        "after_rel_error": result.after[cid][k]["rel_error"]}
                    for k, e in errs.items()}
              for cid, errs in result.before.items()}
    loo = {cid: {"fitted_on": list(f.fitted_on), "params": f.params,
                 "at_bound": list(f.at_bound), "num_evals": f.num_evals,
                 "rel_error": {k: v["rel_error"] for k, v in e.items()}}
           for cid, (f, e) in result.held_out.items()}
    f = result.fit
    return json_safe({
        "verify_dir": str(result.verify_dir),
        "targets": [f"{m} {s}" for m, s in TARGETS],
        "free": {n: {"start": v, "fitted": f.params[n]}
                 for n, v in zip(FREE, (1.0, result.start.step_overhead_s,
                                        result.start.per_seq_overhead_s), strict=True)},
        "moved": moved(result.start, f.profile), "at_bound": list(f.at_bound),
        "num_evals": f.num_evals, "cost": f.cost, "fitted_on": list(f.fitted_on),
        "errors": errors, "leave_one_out": loo, "notes": result.notes,
    })


def refit_doc(result: RefitResult, start_meta: dict[str, Any], start_path: Path,
              date: str | None = None) -> dict[str, Any]:
    """The new profile YAML. The starting profile's per-step intervals (``fit:``) are not
    carried: they describe the residuals of the old coefficients."""
    prov = dict(start_meta.get("provenance") or {})
    # what described the starting per-step fit stays with it, apart from the identity
    per_step = {k: prov.pop(k) for k in ("num_samples", "loss", "not_identified", "at_bound")
                if k in prov}
    if per_step:
        prov["per_step_fit"] = per_step
    prov.update({
        "date": date or datetime.now(UTC).strftime("%Y-%m-%d"),
        "method": f"end-to-end refit from {result.verify_dir}",
        "start_profile": str(start_path),
        "sources": [*prov.get("sources", []), str(result.verify_dir)],
    })
    return {"timing": {"kind": "roofline", "profile": result.fit.profile.to_dict()},
            "provenance": prov, "refit": numbers(result)}


def _pct(x: float) -> str:
    return f"{100 * x:+.1f} %" if math.isfinite(x) else "n/a"


def format_table(result: RefitResult) -> str:
    lines = [f"{'config':<18} {'metric':<10} {'measured':>11} {'before':>9} {'after':>9} "
             f"{'held-out':>9}"]
    for cid, errs in result.before.items():
        held = result.held_out.get(cid)
        for k, e in errs.items():
            h = _pct(held[1][k]["rel_error"]) if held else "-"
            lines.append(f"{cid:<18} {k:<10} {1e3 * e['measured']:>8.1f} ms "
                         f"{_pct(e['rel_error']):>9} {_pct(result.after[cid][k]['rel_error']):>9} "
                         f"{h:>9}")
    lines.append("")
    for name, v in moved(result.start, result.fit.profile).items():
        lines.append(f"{name}: {v['before']:.6g} -> {v['after']:.6g} (x {v['ratio']:.3g})")
    if result.fit.at_bound:
        lines.append(f"at a bound: {', '.join(result.fit.at_bound)}")
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m calibrate.refit") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split(
        "\n\n")[0] if __doc__ else None)
    p.add_argument("verify_dir", type=Path, metavar="VERIFY_DIR")
    p.add_argument("--profile", type=Path, required=True, help="starting profile YAML")
    p.add_argument("--out", type=Path, required=True, help="refitted profile YAML to write")
    p.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    p.add_argument("--shortlist", type=Path,
                   help="the shortlist verify ran: resolves relative trace paths, and gives "
                        "the scenarios when the folder has no comparison.json")
    p.add_argument("--only", nargs="+", metavar="CONFIG_ID", help="fit these configs only")
    p.add_argument("--max-evals", type=int, default=40,
                   help="least-squares evaluations per fit, not counting the finite-difference "
                        "Jacobian's (default 40; the tiny CPU folder converges in ~10)")
    p.add_argument("--no-leave-one-out", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.max_evals < 1:
            raise InputError("--max-evals", f"{args.max_evals}: must be >= 1", "give 1 or more")
        start, meta = load_profile(args.profile)
        result = refit(args.verify_dir, start, args.shortlist, args.max_evals,
                       not args.no_leave_one_out, args.only)
        write_profile(args.out, refit_doc(result, meta, args.profile))
        if args.json:
            try:
                args.json.write_text(json.dumps(numbers(result), indent=1) + "\n",
                                     encoding="utf-8")
            except OSError as e:
                raise InputError(str(args.json), f"cannot write ({e.strerror or e})",
                                 "choose a writable --json path") from None
    except ServetwinError as e:
        print(f"calibrate.refit: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
