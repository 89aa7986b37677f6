"""Predict measured serving results with the twin and score the predictions.

Rows (AIConfigurator's silicon-sample schema, shared data/validation/SOURCES.md): one closed-
loop benchmark each, `batch_size` clients, fixed `isl` / `osl`, one engine of `tp_size` GPUs.

Per row: model (sim.catalog.resolve_model_name: Instruct / FP8 variants -> the base shape;
precision fp8 -> fp8 weights and GEMMs), GPU (SYSTEM_GPU), bundled profile for (system,
backend, model, tp) from sim/data/profiles (nearest TP, then another model, with a note), then
a closed loop at concurrency = batch_size over max(4 x concurrency, 64) synthetic requests of
exactly isl / osl tokens (unique prompts, no shared prefix), vLLM start-up defaults for the GPU.

Statistic: the mean over requests after the first wave (the first `concurrency` requests start
together on an idle engine: warm-up). LoopProtocol (CLI options) sets the loop length, whether
the first wave counts, the token budget and a spread of lengths (range ratio). Upstream does
not say mean or median; benchmark clients (genai-perf, vllm bench) lead with the mean, and
fixed lengths keep the two close.

Scores (summary): APE = |pred / silicon - 1| per row, median and mean; Spearman rho of pred vs
silicon over the rows of each (system, backend, model) group; and per workload (group, isl,
osl, batch_size) the best TP two ways: lowest TPOT, and most output tokens per GPU-second
(concurrency · osl / (e2e · tp), e2e = ttft + (osl - 1) · tpot) - is the predicted best the
measured best?
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sim.catalog import resolve_model_name
from sim.errors import InputError, ServetwinError

from .bundle import PROFILE_DIR, SYSTEM_GPU
from .profile import load_profile

COLUMNS = ("id", "backend", "backend_version", "model_path", "system", "precision", "mode",
           "isl", "osl", "gemm_quant_mode", "batch_size", "tp_size", "pp_size",
           "silicon_ttft_ms", "silicon_tpot_ms")
_INTS = ("isl", "osl", "batch_size", "tp_size", "pp_size")
_FLOATS = ("silicon_ttft_ms", "silicon_tpot_ms")


@dataclass(frozen=True)
class Row:
    where: str  # file:line
    id: str
    backend: str
    backend_version: str
    model_path: str
    system: str
    precision: str
    mode: str
    isl: int
    osl: int
    batch_size: int
    tp: int
    pp: int
    silicon_ttft_ms: float
    silicon_tpot_ms: float

    @property
    def dtype(self) -> str:
        return "fp8" if self.precision.lower() == "fp8" else "bf16"


@dataclass
class Prediction:
    row: Row
    pred_ttft_ms: float = math.nan
    pred_tpot_ms: float = math.nan
    profile: str = ""
    notes: list[str] = field(default_factory=list)
    skipped: str = ""  # why the row could not be simulated; "" when it was


def _number(text: str, col: str, where: str, integer: bool) -> float:
    try:
        v = float(text)
    except ValueError:
        raise InputError(where, f"{col} = {text!r}: not a number", "give a number") from None
    if not math.isfinite(v) or v <= 0 or (integer and v != int(v)):
        rule = "a positive integer" if integer else "a positive number"
        raise InputError(where, f"{col} = {text!r}: must be {rule}", f"fix {col}")
    return int(v) if integer else v


def read_rows(path: str | Path) -> list[Row]:
    path = Path(path)
    try:
        f = path.open(newline="", encoding="utf-8")
    except OSError as e:
        raise InputError(str(path), f"cannot read ({e.strerror or e})", "check the path") from None
    with f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}:1", f"missing column(s) {', '.join(missing)}",
                             f"give the columns {', '.join(COLUMNS)}")
        rows = []
        for rec in reader:
            where = f"{path}:{reader.line_num}"
            if None in rec or any(rec[c] is None for c in COLUMNS):
                raise InputError(where, "wrong number of fields",
                                 f"give {len(reader.fieldnames or [])} comma-separated fields")
            v = {c: rec[c].strip() for c in COLUMNS}
            if not v["id"]:
                raise InputError(where, "id is empty", "give every row an id")
            nums = {c: _number(v[c], c, where, True) for c in _INTS}
            nums |= {c: _number(v[c], c, where, False) for c in _FLOATS}
            rows.append(Row(where, v["id"], v["backend"].lower(), v["backend_version"],
                            v["model_path"], v["system"].lower(), v["precision"], v["mode"],
                            int(nums["isl"]), int(nums["osl"]), int(nums["batch_size"]),
                            int(nums["tp_size"]), int(nums["pp_size"]),
                            float(nums["silicon_ttft_ms"]), float(nums["silicon_tpot_ms"])))
    if not rows:
        raise InputError(str(path), "no rows", "give at least one measured row")
    return rows


# ------------------------------------------------------------------ profiles
@dataclass(frozen=True)
class BundledProfile:
    path: Path
    system: str
    backend: str
    engine_version: str
    model: str
    tp: int
    dtype: str


def bundled_profiles(profile_dir: Path = PROFILE_DIR) -> list[BundledProfile]:
    out = []
    for p in sorted(profile_dir.glob("*.yaml")):
        _, meta = load_profile(p)
        prov = meta["provenance"]
        out.append(BundledProfile(p, str(prov.get("system", prov.get("gpu", ""))),
                                  str(prov.get("engine", "")), str(prov.get("engine_version", "")),
                                  str(prov.get("model", "")), int(prov.get("tp", 1)),
                                  str(prov.get("dtype", "bf16"))))
    return out


def pick_profile(profiles: Sequence[BundledProfile], system: str, backend: str, model: str,
                 tp: int, dtype: str = "bf16") -> tuple[BundledProfile | None, list[str]]:
    """Exact (system, backend, model, tp, dtype); else the same model at the nearest TP; else
    another model's profile at the nearest TP; another dtype's only when none has this one.
    None when nothing shares system and backend."""
    same = [p for p in profiles if p.system == system and p.backend == backend]
    if not same:
        return None, []
    notes = []
    if any(p.dtype == dtype for p in same):
        same = [p for p in same if p.dtype == dtype]
    else:
        notes.append(f"no {dtype} profile: used a {same[0].dtype}-fitted one")
        same = [p for p in same if p.dtype == same[0].dtype]
    mine = [p for p in same if p.model == model]
    pool = mine or same
    best = min(pool, key=lambda p: (abs(math.log2(p.tp) - math.log2(tp)), p.tp))
    if not mine:
        notes.append(f"no {model} profile: used {best.model}'s")
    if best.tp != tp:
        notes.append(f"no TP {tp} profile: used TP {best.tp}'s")
    return best, notes


# ------------------------------------------------------------------ simulate
@dataclass(frozen=True)
class LoopProtocol:
    """How the closed-loop benchmark behind the rows ran, as far as the twin needs it.
    Upstream does not document it; the defaults are this module's (docstring), and
    `servetwin validate` can set each one to show how much the scores depend on it."""
    requests_per_client: int = 4  # requests = max(requests_per_client x concurrency, 64)
    num_requests: int | None = None  # a fixed count instead
    count_first_wave: bool = False  # True: the mean over every request
    max_num_batched_tokens: int | None = None  # None: vLLM's start-up default for the GPU
    # < 1: each request's isl and osl drawn uniformly from [int(L x ratio), L], as the
    # random dataset of sglang-project/sglang:python/sglang/bench_serving.py (and vLLM's
    # benchmark_serving.py before its symmetric range) does with --random-range-ratio
    range_ratio: float = 1.0

    def requests(self, concurrency: int) -> int:
        return self.num_requests or max(self.requests_per_client * concurrency, 64)

    def describe(self) -> str:
        n = (f"{self.num_requests} requests" if self.num_requests else
             f"max({self.requests_per_client} x concurrency, 64) requests")
        who = "every request" if self.count_first_wave else "requests after the first wave"
        budget = (f", max_num_batched_tokens {self.max_num_batched_tokens}"
                  if self.max_num_batched_tokens else "")
        lengths = ("" if self.range_ratio >= 1 else
                   f", isl and osl uniform in [{self.range_ratio:g} L, L]")
        return f"mean over {who}; {n}{budget}{lengths}"


def predict_row(row: Row, profiles: Sequence[BundledProfile],
                num_requests: int | None = None,
                protocol: LoopProtocol | None = None) -> Prediction:
    pred = Prediction(row)
    model = resolve_model_name(row.model_path)
    if row.mode != "agg":
        pred.skipped = f"mode = {row.mode!r}: only aggregated (agg) serving is modelled"
    elif row.pp != 1:
        pred.skipped = f"pp_size = {row.pp}: the timing model covers one pipeline stage"
    elif row.backend != "vllm":
        pred.skipped = f"backend = {row.backend!r}: the twin models vLLM only"
    elif model is None:
        pred.skipped = f"model_path = {row.model_path!r}: not a bundled model or variant"
    elif row.system not in SYSTEM_GPU:
        pred.skipped = f"system = {row.system!r}: unknown (known: {', '.join(SYSTEM_GPU)})"
    if pred.skipped:
        return pred
    assert model is not None
    if model != row.model_path:
        pred.notes.append(f"model {row.model_path} simulated as {model}")
    prof, notes = pick_profile(profiles, row.system, row.backend, model, row.tp, row.dtype)
    if prof is None:
        pred.skipped = f"no bundled profile for {row.system} / {row.backend}"
        return pred
    pred.profile, pred.notes = prof.path.name, pred.notes + notes
    if not row.backend_version:
        pred.notes.append(f"backend_version unknown: used the {prof.engine_version} "
                          "op-table profile")
    elif row.backend_version != prof.engine_version:
        pred.notes.append(f"profile from {row.backend} {prof.engine_version} op tables, "
                          f"row measured {row.backend_version}")
    try:
        ttft_s, tpot_s = simulate_closed_loop(row, model, prof.path, num_requests, protocol)
    except ServetwinError as e:
        pred.skipped = " ".join(str(e).split())
        return pred
    pred.pred_ttft_ms, pred.pred_tpot_ms = ttft_s * 1e3, tpot_s * 1e3
    return pred


def simulate_closed_loop(row: Row, model: str, profile_path: Path,
                         num_requests: int | None = None,
                         protocol: LoopProtocol | None = None) -> tuple[float, float]:
    """(mean TTFT s, mean TPOT s) over the requests the protocol counts (by default those
    after the first wave)."""
    from sim.scenario import validate_scenario
    from sim.simulate import resolve, simulate

    protocol = protocol or LoopProtocol()
    profile, _ = load_profile(profile_path)
    n = num_requests or protocol.requests(row.batch_size)
    engine: dict[str, Any] = {"tensor_parallel_size": row.tp}
    if protocol.max_num_batched_tokens:
        engine["max_num_batched_tokens"] = protocol.max_num_batched_tokens
    doc = {
        "name": row.id, "seed": 0, "model": model, "gpu": SYSTEM_GPU[row.system],
        "dtype": row.dtype, "engine": engine,
        "timing": {"kind": "roofline", "profile": profile.to_dict()},
        "workload": {
            # arrivals are replaced by the closed loop; the rate only orders the trace
            "synthetic": {"rate_per_s": 1000.0, "input_tokens": _lengths(row.isl, protocol),
                          "output_tokens": _lengths(row.osl, protocol), "num_requests": n},
            "closed_loop": {"concurrency": row.batch_size, "num_requests": n},
        },
    }
    loaded = validate_scenario(doc, {}, None, [])
    c = simulate(resolve(loaded)).records.columns
    ok = c["status"] == "ok"
    order = np.argsort(c["arrival_s"], kind="stable")
    keep = np.zeros(len(ok), bool)
    keep[order[0 if protocol.count_first_wave else min(row.batch_size, len(ok) - 1):]] = True
    keep &= ok
    if not keep.any():
        raise InputError(row.where, "every simulated request was refused",
                         "check that isl + osl fits the KV cache")
    ttft = c["first_token_s"][keep] - c["arrival_s"][keep]
    # TPOT per request over its own output, requests of one output token left out (vLLM's
    # and SGLang's benchmark clients define it so)
    out = c["num_output_tokens"][keep]
    many = out > 1
    if not many.any():
        many = np.ones_like(many)
    tpot = ((c["finish_s"][keep] - c["first_token_s"][keep])[many]
            / np.maximum(out[many] - 1, 1))
    return float(ttft.mean()), float(tpot.mean())


def _lengths(n: int, protocol: LoopProtocol) -> int | dict[str, Any]:
    if protocol.range_ratio >= 1:
        return n
    return {"kind": "uniform", "min_tokens": max(1, int(n * protocol.range_ratio)),
            "max_tokens": n}


# ------------------------------------------------------------------ scoring
def ape(pred: float, silicon: float) -> float:
    return abs(pred / silicon - 1.0)


def _stats(values: list[float]) -> dict[str, float | int]:
    a = np.array(values, float)
    if not a.size:
        return {"num_rows": 0}
    return {"num_rows": int(a.size), "median_ape": float(np.median(a)),
            "mean_ape": float(np.mean(a)), "p90_ape": float(np.quantile(a, 0.9))}


def _spearman(x: list[float], y: list[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(x) < 3:
        return None
    rho = spearmanr(x, y).statistic
    return None if not np.isfinite(rho) else float(rho)


def _best(preds: list[Prediction], key: str) -> dict[str, Any]:
    """Per workload, is the predicted best TP the measured best? key: tpot | tokens_per_gpu"""
    def score(p: Prediction, predicted: bool) -> float:
        r = p.row
        ttft = p.pred_ttft_ms if predicted else r.silicon_ttft_ms
        tpot = p.pred_tpot_ms if predicted else r.silicon_tpot_ms
        if key == "tpot":
            return tpot
        e2e = ttft + (r.osl - 1) * tpot
        return -r.batch_size * r.osl / (e2e * r.tp)  # lower is better: minus tokens / GPU-ms

    groups: dict[tuple[Any, ...], list[Prediction]] = {}
    for p in preds:
        r = p.row
        groups.setdefault((r.system, r.backend, r.model_path, r.isl, r.osl, r.batch_size),
                          []).append(p)
    cases = []
    for g, ps in sorted(groups.items()):
        if len({p.row.tp for p in ps}) < 2:
            continue
        want = min(ps, key=lambda p: score(p, False)).row.tp
        got = min(ps, key=lambda p: score(p, True)).row.tp
        cases.append({"workload": f"{g[2]} isl {g[3]} osl {g[4]} c {g[5]}",
                      "measured_best_tp": want, "predicted_best_tp": got})
    hits = sum(c["measured_best_tp"] == c["predicted_best_tp"] for c in cases)
    return {"num_workloads": len(cases), "num_matches": hits,
            "match_rate": hits / len(cases) if cases else None,
            "misses": [c for c in cases if c["measured_best_tp"] != c["predicted_best_tp"]]}


def summarize(preds: list[Prediction], protocol: LoopProtocol | None = None) -> dict[str, Any]:
    done = [p for p in preds if not p.skipped]
    groups: dict[str, list[Prediction]] = {}
    for p in done:
        groups.setdefault(f"{p.row.system} / {p.row.backend} / {p.row.model_path}",
                          []).append(p)
    return {
        "num_rows": len(preds), "num_simulated": len(done),
        "statistic": (protocol or LoopProtocol()).describe(),
        "ttft": _stats([ape(p.pred_ttft_ms, p.row.silicon_ttft_ms) for p in done]),
        "tpot": _stats([ape(p.pred_tpot_ms, p.row.silicon_tpot_ms) for p in done]),
        "spearman": {g: {"num_rows": len(ps),
                         "ttft": _spearman([p.pred_ttft_ms for p in ps],
                                           [p.row.silicon_ttft_ms for p in ps]),
                         "tpot": _spearman([p.pred_tpot_ms for p in ps],
                                           [p.row.silicon_tpot_ms for p in ps])}
                     for g, ps in sorted(groups.items())},
        "best_tp_by_tpot": _best(done, "tpot"),
        "best_tp_by_tokens_per_gpu": _best(done, "tokens_per_gpu"),
        "skipped": [{"id": p.row.id, "where": p.row.where, "reason": p.skipped}
                    for p in preds if p.skipped],
    }


PRED_COLUMNS = ("id", "pred_ttft_ms", "pred_tpot_ms", "silicon_ttft_ms", "silicon_tpot_ms",
                "ttft_ape", "tpot_ape", "profile", "notes")


def prediction_rows(preds: list[Prediction]) -> list[dict[str, Any]]:
    out = []
    for p in preds:
        r = p.row
        ok = not p.skipped
        out.append({
            "id": r.id,
            "pred_ttft_ms": round(p.pred_ttft_ms, 4) if ok else "",
            "pred_tpot_ms": round(p.pred_tpot_ms, 4) if ok else "",
            "silicon_ttft_ms": r.silicon_ttft_ms, "silicon_tpot_ms": r.silicon_tpot_ms,
            "ttft_ape": round(ape(p.pred_ttft_ms, r.silicon_ttft_ms), 5) if ok else "",
            "tpot_ape": round(ape(p.pred_tpot_ms, r.silicon_tpot_ms), 5) if ok else "",
            "profile": p.profile,
            "notes": "; ".join(p.notes + ([f"not simulated: {p.skipped}"] if p.skipped else [])),
        })
    return out


def write_csv(path: Path, preds: list[Prediction]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, PRED_COLUMNS)
        w.writeheader()
        w.writerows(prediction_rows(preds))
    return path


def format_summary(s: dict[str, Any]) -> str:
    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.1f} %"

    lines = [f"  rows {s['num_rows']}, simulated {s['num_simulated']} ({s['statistic']})"]
    for m in ("ttft", "tpot"):
        st = s[m]
        if st["num_rows"]:
            lines.append(f"  {m.upper()} APE: median {pct(st['median_ape'])}, mean "
                         f"{pct(st['mean_ape'])}, p90 {pct(st['p90_ape'])}")
    for g, sp in s["spearman"].items():
        f = [f"{m.upper()} {'n/a' if sp[m] is None else f'{sp[m]:.3f}'}" for m in ("ttft", "tpot")]
        lines.append(f"  Spearman rho, {g} ({sp['num_rows']} rows): {', '.join(f)}")
    for k, label in (("best_tp_by_tpot", "lowest TPOT"),
                     ("best_tp_by_tokens_per_gpu", "most output tokens per GPU-second")):
        b = s[k]
        lines.append(f"  best TP by {label}: predicted = measured in {b['num_matches']} of "
                     f"{b['num_workloads']} workloads")
    for sk in s["skipped"]:
        lines.append(f"  not simulated: {sk['where']} {sk['id']}: {sk['reason']}")
    return "\n".join(lines)
