"""Other people's timing data as forward-pass samples (calibrate.measurements).

    load_any(path, fmt=None, **provenance)   by FORMATS name, or by sniffing the file
    splitwise(path, model=, hardware=, tp=)  Splitwise perf_model.csv (measured iterations)
    vidur(model, gpu, tp, root=)             Vidur op tables, composed into passes
    sglang_metrics(path, **provenance)       SGLang --enable-forward-pass-metrics messages
    sglang_log(path, **provenance)           SGLang "Decode batch" log lines (window means)
    llama_timings(path, **provenance)        llama-server per-request `timings` objects

Every importer returns a checked table; ``df.attrs["notes"]`` says what was approximated
and how many rows were dropped and why (drops also raise DroppedRowsWarning). Unknown or
missing engine versions are warned about (calibrate.vllm_log.UnknownVersionWarning).

Splitwise (shared data/timing/splitwise, SOURCES.md §3; MIT): one row = b prompts of p
tokens, then t output tokens each; prompt_time is the prefill of the batch, token_time the
mean decode iteration (ms). Per row: a prefill sample (b·p tokens, b chunks, no prefix) and
a decode sample of b sequences at the mean context p + (n + 1) / 2, n = decode iterations
run = round((e2e_time − prompt_time) / token_time). n is read off e2e_time, not taken as
t − 1: rows with p + t past Llama-2's 4,096 positions stopped early (n ≈ 600 at t = 8192).
Names: SPLITWISE_MODELS, SPLITWISE_HARDWARE. The power-capped H100 rows keep a gpu of
"H100-SXM-pcap" so they never mix with the uncapped ones (their spec is H100-SXM's).
Neither data set records an engine version or a measurement date: engine_version names the
data set (Splitwise "isca24", Vidur its commit) and date is the data commit's.

Vidur (shared data/timing/vidur, SOURCES.md §1; MIT): ms medians of repeated runs.
One pass of T tokens at TP tp, L = VIDUR_LAYERS[model] (num_hidden_layers of its config):

    L · [input_layernorm + attn_pre_proj + attn_rope + attention + attn_post_proj
         + post_attention_layernorm + mlp_up_proj + mlp_act + mlp_down_proj + 2·add
         + 2·all_reduce(T · n_embd · 2 bytes)]  + emb
    mlp.csv ops at num_tokens = T; attention = attn_prefill (prefill rows: one chunk of
    prefill_chunk_size after kv_cache_size cached) or attn_decode (batch_size sequences at
    kv_cache_size each), + attn_input_reshape + attn_output_reshape; all_reduce from
    network/<gpu>_dgx at num_workers = devices_per_node = tp (tp > 1 only).

Samples sit on the attention table's points; op and all-reduce times are interpolated
linearly between grid points (calibrate.aiconfigurator._bracket). Only one attention table
survives (legacy/, A100, n_embd 8192 with 64 query / 8 KV heads at TP 2): Llama-2-70B,
Llama-3-70B and CodeLlama-34B on A100 at TP 2. Every other model / GPU / TP is an error,
not a guess. Not covered: lm_head and sampling (not in the tables), CPU overheads.

SGLang forward-pass metrics (sglang/srt/observability/forward_pass_metrics.py and
scheduler_components/metrics_reporter.py @ v0.5.23): one JSON object per line (or a JSON
list), each a decoded message {worker_id, dp_rank, wall_time, scheduled_requests: {
num_prefill_requests, sum_prefill_tokens (new tokens), var_prefill_length (of whole prompt
lengths), sum_prefill_kv_tokens (cached prefixes), num_decode_requests,
sum_decode_kv_tokens (Σ seq_lens, the new token included), ...}, queued_requests}.
wall_time is the GPU time of the pass (device timer) in seconds. Idle heartbeats (all zero)
are dropped and counted. prefill_attn_work needs each chunk's length and prefix; the
message has sums only, so chunks are taken as equal (N/k new tokens after C/k cached),
plus k · var_prefill_length when nothing was cached: exact for one chunk per pass, and for
uncut prompts with no prefix.

SGLang log lines (metrics_reporter.py @ v0.5.23): "Prefill batch" lines carry no duration
(their throughput is this batch's tokens over the time since the previous prefill line,
which spans other passes): they are counted, not sampled. "Decode batch, #running-req: R,
#token: K, ..., gen throughput (token/s): G" gives R sequences holding K KV tokens and G
tokens/s over the last --decode-log-interval (40) steps: one decode sample, R / G seconds,
the window's mean step (any prefill run inside the window is in it too), context K (the
pool's used tokens, cached prefixes of other requests included).

llama-server timings (tools/server: cache_n, prompt_n, prompt_ms, predicted_n,
predicted_ms; shared/reference/cpu_engines.md): per request, a prefill sample (one
sequence, prompt_n tokens after cache_n cached, prompt_ms: all its micro-batches together)
and one decode sample (one sequence at the mean context cache_n + prompt_n +
(predicted_n + 1) / 2, predicted_ms / predicted_n: llama-server's own per-token time). Only
a request served alone gives clean numbers: with other slots busy, passes are shared.
"""

from __future__ import annotations

import gzip
import json
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sim.errors import InputError

from .aiconfigurator import _bracket
from .measurements import COLUMNS, PROVENANCE, frame, read
from .vllm_log import UnknownVersionWarning, log_lines, read_step_log

FORMATS = ("measurements", "vllm-log", "splitwise", "vidur", "sglang-metrics", "sglang-log",
           "llama-timings")
SPLITWISE_MODELS = {"llama2-70b": "meta-llama/Llama-2-70b-hf", "bloom-176b": "bigscience/bloom"}
SPLITWISE_HARDWARE = {"a100-80gb": "A100-SXM-80GB", "h100-80gb": "H100-SXM",
                      "h100-80gb-pcap": "H100-SXM-pcap"}
# num_hidden_layers of each model's Hugging Face config.json (the mlp tables lack it)
VIDUR_LAYERS = {"meta-llama/Llama-2-7b-hf": 32, "meta-llama/Llama-2-70b-hf": 80,
                "meta-llama/Meta-Llama-3-8B": 32, "meta-llama/Meta-Llama-3-70B": 80,
                "codellama/CodeLlama-34b-Instruct-hf": 48, "Qwen/Qwen-72B": 80,
                "internlm/internlm-20b": 60, "microsoft/phi-2": 32}
VIDUR_GPUS = {"a100": "A100-SXM-80GB", "h100": "H100-SXM", "a40": "A40"}
KNOWN_VERSIONS = {"sglang": ("0.5.23",), "llama.cpp": ("b11434",)}
_VIDUR_ATTENTION = "legacy/a100_attention_llama2-70b-shape_tp2.csv.gz"
_VIDUR_OPS = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj",
              "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj")
_MS = 1e-3


class DroppedRowsWarning(UserWarning):
    """An importer dropped rows it could not use; df.attrs["notes"] says how many and why."""


# --------------------------------------------------------------------------- shared
def _provenance(where: str, defaults: Mapping[str, str], given: Mapping[str, Any]
                ) -> dict[str, str]:
    unknown = [k for k in given if k not in PROVENANCE]
    if unknown:
        raise InputError(where, f"unknown provenance field {unknown[0]!r}",
                         f"use some of {', '.join(PROVENANCE)}")
    return {k: str(given.get(k) or defaults.get(k, "")) for k in PROVENANCE}


def _check_version(engine: str, version: str, where: str) -> None:
    known = KNOWN_VERSIONS.get(engine, ())
    if not version:
        warnings.warn(f"{where}: no {engine} version given; the format of {engine} "
                      f"{', '.join(known)} is assumed. Fix: pass engine_version=",
                      UnknownVersionWarning, stacklevel=3)
    elif version.lstrip("v") not in known:
        warnings.warn(f"{where}: {engine} {version}: its format was not checked (known: "
                      f"{', '.join(known)})", UnknownVersionWarning, stacklevel=3)


def _finish(rows: list[dict[str, Any]], prov: Mapping[str, Any], where: str,
            dropped: Counter[str], notes: list[str]) -> pd.DataFrame:
    if not rows:
        raise InputError(where, "no usable forward pass in the file"
                         + (f" ({_drops(dropped)})" if dropped else ""),
                         "check the file and format")
    df = frame(({**r, **prov} for r in rows), where)
    if dropped:
        warnings.warn(f"{where}: dropped {_drops(dropped)}", DroppedRowsWarning, stacklevel=3)
    df.attrs["notes"] = [*notes, *(f"dropped {n}: {why}" for why, n in sorted(dropped.items()))]
    return df


def _drops(dropped: Counter[str]) -> str:
    return "; ".join(f"{n} {why}" for why, n in sorted(dropped.items()))


def _row(p: int, work: float, n_p: int, d: int, c: int, seconds: float) -> dict[str, Any]:
    return {"num_prefill_tokens": p, "prefill_attn_work": work, "num_prefill_seqs": n_p,
            "num_decode_seqs": d, "decode_context_tokens": c, "measured_s": seconds}


def _read_text(path: Path) -> list[str]:
    return log_lines(path)


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise InputError(str(path), "file not found", "check the path") from None
    except (OSError, ValueError) as e:
        raise InputError(str(path), f"cannot read as CSV ({e})", "give the original file") from None


def _numbers(df: pd.DataFrame, cols: Iterable[str], path: Path, positive: bool) -> None:
    """Numeric columns in place; the first bad value is named by its file line."""
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise InputError(str(path), f"missing column(s) {', '.join(missing)}",
                         "give the original file, header included")
    for c in cols:
        values = pd.to_numeric(df[c], errors="coerce")
        bad = values.isna() | (values <= 0 if positive else values < 0)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(f"{path}:{i + 2}", f"{c} = {df[c].tolist()[i]!r}: must be a "
                             f"{'positive' if positive else 'non-negative'} number",
                             "fix or delete the row")
        df[c] = values


def _pick(value: str | None, names: Mapping[str, str], what: str, where: str) -> str | None:
    """A name in the source's spelling or ours, as the source spells it."""
    if value is None:
        return None
    for theirs, ours in names.items():
        if value.lower() in (theirs.lower(), ours.lower()):
            return theirs
    raise InputError(where, f"{what} {value!r} is not in the data",
                     f"use one of {', '.join(f'{t} ({o})' for t, o in names.items())}")


# --------------------------------------------------------------------------- Splitwise
def splitwise(path: str | Path, model: str | None = None, hardware: str | None = None,
              tp: int | None = None) -> pd.DataFrame:
    path = Path(path)
    df = _read_csv(path)
    _numbers(df, ("prompt_size", "batch_size", "token_size", "tensor_parallel"), path, True)
    _numbers(df, ("prompt_time", "token_time", "e2e_time"), path, True)
    for c, names in (("model", SPLITWISE_MODELS), ("hardware", SPLITWISE_HARDWARE)):
        unknown = ~df[c].isin(list(names))
        if unknown.any():
            i = int(np.flatnonzero(unknown.to_numpy())[0])
            raise InputError(f"{path}:{i + 2}", f"{c} = {df[c].iloc[i]!r} has no mapping",
                             f"known: {', '.join(names)}")
    m = _pick(model, SPLITWISE_MODELS, "model", str(path))
    h = _pick(hardware, SPLITWISE_HARDWARE, "hardware", str(path))
    keep = np.ones(len(df), dtype=bool)
    if m is not None:
        keep &= (df["model"] == m).to_numpy()
    if h is not None:
        keep &= (df["hardware"] == h).to_numpy()
    if tp is not None:
        keep &= (df["tensor_parallel"] == tp).to_numpy()
    if not keep.any():
        groups = sorted({(str(a), str(b), int(c)) for a, b, c in zip(
            df["model"].tolist(), df["hardware"].tolist(), df["tensor_parallel"].tolist(),
            strict=True)})
        raise InputError(str(path), f"no rows for model={model}, hardware={hardware}, tp={tp}",
                         "the file has " + ", ".join(f"{a}/{b}/tp{c}" for a, b, c in groups))
    rows, early = [], 0
    sel = df[keep]
    cols = {c: sel[c].tolist() for c in ("model", "hardware", "prompt_size", "batch_size",
                                         "token_size", "tensor_parallel", "prompt_time",
                                         "token_time", "e2e_time")}
    for j, i in enumerate(np.flatnonzero(keep).tolist()):
        b, p, t = (int(cols[c][j]) for c in ("batch_size", "prompt_size", "token_size"))
        prompt_ms, token_ms = float(cols["prompt_time"][j]), float(cols["token_time"][j])
        n = max(1, round((float(cols["e2e_time"][j]) - prompt_ms) / token_ms))
        early += abs(n - (t - 1)) > 0.01 * t
        prov = {"tp": int(cols["tensor_parallel"][j]), "pp": 1,
                "gpu": SPLITWISE_HARDWARE[cols["hardware"][j]], "engine": "splitwise",
                "engine_version": "isca24", "model": SPLITWISE_MODELS[cols["model"][j]],
                "dtype": "fp16", "date": "2024-04-25", "source": f"{path.name}:{i + 2}"}
        rows.append({**_row(b * p, b * p * (p + 1) / 2, b, 0, 0, prompt_ms * _MS), **prov})
        rows.append({**_row(0, 0.0, 0, b, round(b * (p + (n + 1) / 2)), token_ms * _MS),
                     **prov})
    notes = [f"{early} rows ran fewer decode iterations than token_size - 1 (e2e_time "
             "says so); their decode context uses the iterations run"] if early else []
    return _finish(rows, {}, str(path), Counter(), notes)


# --------------------------------------------------------------------------- Vidur
def vidur_root() -> Path:
    """shared/data/timing/vidur next to or above the repo (as aiconfigurator.default_root)."""
    repo = Path(__file__).resolve().parent.parent
    for base in (repo, repo.parent):
        p = base / "shared" / "data" / "timing" / "vidur"
        if p.is_dir():
            return p
    return repo / "shared" / "data" / "timing" / "vidur"


def _medians(df: pd.DataFrame, keys: list[str], ops: Iterable[str]) -> pd.DataFrame:
    cols = [f"time_stats.{op}.median" for op in ops]
    out = df.groupby(keys, as_index=False)[cols].median()
    return pd.DataFrame(out.rename(columns=dict(zip(cols, ops, strict=True))))


def _lookup(grid: list[int], ms: Mapping[int, float], x: float) -> float:
    return sum(w * ms[g] for g, w in _bracket(grid, x))


def vidur(model: str, gpu: str, tp: int, root: str | Path | None = None) -> pd.DataFrame:
    """Pure-prefill and pure-decode passes on the attention table's points (module doc)."""
    base = Path(root) if root else vidur_root()
    g = _pick(gpu, VIDUR_GPUS, "gpu", f"vidur {base}")
    mlp_paths = {str(p.relative_to(base / "compute" / str(g)).parent): p
                 for p in sorted((base / "compute" / str(g)).glob("*/*/mlp.csv.gz"))}
    if model not in mlp_paths:
        raise InputError(f"vidur {base}/compute/{g}", f"no mlp table for model {model!r}",
                         f"use one of {', '.join(mlp_paths) or '(none: check root)'}")
    mlp_path = mlp_paths[model]
    mlp = _read_csv(mlp_path)
    mlp = mlp[mlp["num_tensor_parallel_workers"] == tp]
    if mlp.empty:
        raise InputError(str(mlp_path), f"no rows at tp = {tp}", "the tables cover tp 1, 2, 4, 8")
    shape = mlp.iloc[0]
    n_head, n_kv, n_embd = int(shape["n_head"]), int(shape["n_kv_head"]), int(shape["n_embd"])
    attn_path = base / _VIDUR_ATTENTION
    attn = _read_csv(attn_path)
    attn = attn[(attn["n_q_head"] == n_head) & (attn["n_kv_head"] == n_kv)
                & (attn["n_embd"] == n_embd) & (attn["num_tensor_parallel_workers"] == tp)]
    if g != "a100" or attn.empty:
        raise InputError(f"vidur {model} on {g} at tp {tp}", "no Vidur attention table for "
                         f"{n_head} query / {n_kv} KV heads, n_embd {n_embd}",
                         "only A100, n_embd 8192, 64 / 8 heads at tp 2 survives "
                         f"({_VIDUR_ATTENTION}): Llama-2-70B, Llama-3-70B, CodeLlama-34B")
    if model not in VIDUR_LAYERS:
        raise InputError(model, "its layer count is not known", "add it to VIDUR_LAYERS")
    layers = VIDUR_LAYERS[model]
    ops = _medians(mlp, ["num_tokens"], ("emb", "add", *_VIDUR_OPS))
    grid = [int(x) for x in ops["num_tokens"].tolist()]
    per_layer = dict(zip(grid, (ops[list(_VIDUR_OPS)].sum(axis=1) + 2 * ops["add"]).tolist(),
                         strict=True))
    emb = dict(zip(grid, ops["emb"].tolist(), strict=True))
    sources = [str(mlp_path.relative_to(base)), _VIDUR_ATTENTION]
    ar_grid: list[int] = []
    ar: dict[int, float] = {}
    if tp > 1:
        ar_path = base / "network" / f"{g}_dgx" / "all_reduce.csv.gz"
        net = _read_csv(ar_path)
        net = net[(net["num_workers"] == tp) & (net["devices_per_node"] == tp)]
        cost = _medians(net, ["size"], ("all_reduce",))
        ar_grid = [int(x) for x in cost["size"].tolist()]
        ar = dict(zip(ar_grid, cost["all_reduce"].tolist(), strict=True))
        sources.append(str(ar_path.relative_to(base)))

    def pass_s(tokens: int, attn_ms: float) -> float:
        comm = 2 * _lookup(ar_grid, ar, tokens * n_embd * 2) if ar_grid else 0.0
        layer = _lookup(grid, per_layer, tokens) + attn_ms + comm
        return (layers * layer + _lookup(grid, emb, tokens)) * _MS

    rows = []
    a = _medians(attn, ["is_prefill", "batch_size", "prefill_chunk_size", "kv_cache_size"],
                 ("attn_prefill", "attn_decode", "attn_input_reshape", "attn_output_reshape"))
    reshape = (a["attn_input_reshape"] + a["attn_output_reshape"]).tolist()
    for pre, b, n, c, t_p, t_d, rs in zip(a["is_prefill"], a["batch_size"],
                                          a["prefill_chunk_size"], a["kv_cache_size"],
                                          a["attn_prefill"], a["attn_decode"], reshape,
                                          strict=True):
        b, n, c = int(b), int(n), int(c)
        if pre:
            rows.append(_row(n, n * (c + (n + 1) / 2), 1, 0, 0, pass_s(n, t_p + rs)))
        else:
            rows.append(_row(0, 0.0, 0, b, b * (c + 1), pass_s(b, t_d + rs)))
    prov = {"tp": tp, "pp": 1, "gpu": VIDUR_GPUS[g], "engine": "vidur",
            "engine_version": "7d47513", "model": model, "dtype": "fp16", "date": "2024-11-19",
            "source": ";".join(sources)}
    return _finish(rows, prov, f"vidur {model}", Counter(), [])


# --------------------------------------------------------------------------- JSON records
def _json_records(path: Path) -> list[tuple[int, Any]]:
    """(line, object) from JSON lines or one JSON list (line 1 for its items)."""
    lines = _read_text(path)
    text = "\n".join(lines).strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}", f"not valid JSON ({e.msg})",
                             "give one JSON list, or one JSON object per line") from None
        return [(1, x) for x in items]
    out = []
    for no, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        try:
            out.append((no, json.loads(line)))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{no}", f"not valid JSON ({e.msg}): {line[:80]!r}",
                             "one JSON object per line (a cut last line? delete it)") from None
    return out


def _field(obj: Mapping[str, Any], key: str, where: str, kind: type = int) -> float:
    v = obj.get(key, 0)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v >= 0
    if not ok or (kind is int and float(v) != int(v)):
        raise InputError(where, f"{key} = {v!r}: must be a non-negative "
                         f"{'integer' if kind is int else 'number'}", "fix or delete the record")
    return float(v)


# --------------------------------------------------------------------------- SGLang
def sglang_metrics(path: str | Path, tp: int = 1, **provenance: Any) -> pd.DataFrame:
    path = Path(path)
    prov = _provenance(str(path), {"engine": "sglang", "source": path.name}, provenance)
    _check_version("sglang", prov["engine_version"], str(path))
    rows, dropped, approx = [], Counter[str](), 0
    for no, obj in _json_records(path):
        where = f"{path}:{no}"
        sched = obj.get("scheduled_requests") if isinstance(obj, dict) else None
        if not isinstance(sched, dict):
            raise InputError(where, "no scheduled_requests object",
                             "give SGLang forward-pass-metrics messages decoded to JSON")
        wall_s = _field(obj, "wall_time", where, float)
        k = int(_field(sched, "num_prefill_requests", where))
        n = int(_field(sched, "sum_prefill_tokens", where))
        c = int(_field(sched, "sum_prefill_kv_tokens", where))
        var = _field(sched, "var_prefill_length", where, float)
        d = int(_field(sched, "num_decode_requests", where))
        ctx = int(_field(sched, "sum_decode_kv_tokens", where))
        if n == 0 and d == 0:
            dropped["idle heartbeats or empty passes" if wall_s == 0 else
                    "passes with no tokens but a time"] += 1
            continue
        if wall_s == 0:
            dropped["passes with wall_time 0"] += 1
            continue
        if (n > 0) != (k > 0):
            raise InputError(where, f"num_prefill_requests = {k} with sum_prefill_tokens = {n}",
                             "both are zero or both positive")
        work = 0.0
        if k:  # equal chunks, + Σ(n_i − n̄)² when no prefix (module doc)
            work = n * (c / k + (n / k + 1) / 2) + (k * var / 2 if c == 0 else 0.0)
            approx += k > 1
        rows.append({**_row(n, work, k, d, ctx, wall_s), "source": f"{prov['source']}:{no}"})
    notes = [f"{approx} passes with several prefill chunks: prefill_attn_work from sums "
             "(equal chunks)"] if approx else []
    prov.pop("source")
    return _finish(rows, {"tp": tp, "pp": 1, **prov}, str(path), dropped, notes)


_SGL_MARK = re.compile(r"\b(Prefill|Decode) batch(?: \[\d+\])?, ")
_SGL_ITEM = re.compile(r"^\s*([^:]+?):\s*(\S+?)%?\s*$")


def sglang_log(path: str | Path, tp: int = 1, **provenance: Any) -> pd.DataFrame:
    path = Path(path)
    prov = _provenance(str(path), {"engine": "sglang", "source": path.name}, provenance)
    _check_version("sglang", prov["engine_version"], str(path))
    rows, dropped = [], Counter[str]()
    for no, text in enumerate(_read_text(path), start=1):
        m = _SGL_MARK.search(text)
        if m is None:
            continue
        if m.group(1) == "Prefill":
            dropped["Prefill batch lines (no per-pass time)"] += 1
            continue
        items: dict[str, str] = {}
        for part in text[m.end():].split(", "):
            im = _SGL_ITEM.match(part)
            if im:
                items[im.group(1)] = im.group(2)
        where = f"{path}:{no}"
        try:
            r = int(items["#running-req"])
            kv = int(items["#token"])
            rate = float(items["gen throughput (token/s)"])
        except (KeyError, ValueError):
            raise InputError(where, f"malformed SGLang decode line {text.strip()[:160]!r}",
                             "expected 'Decode batch, #running-req: R, #token: K, ..., gen "
                             "throughput (token/s): G, ...' (a cut line? delete it)") from None
        if r == 0 or rate <= 0:
            dropped["Decode batch lines with no running request or zero throughput"] += 1
            continue
        rows.append({**_row(0, 0.0, 0, r, kv, r / rate), "source": f"{prov['source']}:{no}"})
    prov.pop("source")
    notes = ["decode samples are window means over --decode-log-interval steps"]
    return _finish(rows, {"tp": tp, "pp": 1, **prov}, str(path), dropped, notes)


# --------------------------------------------------------------------------- llama-server
def llama_timings(path: str | Path, tp: int = 1, **provenance: Any) -> pd.DataFrame:
    path = Path(path)
    prov = _provenance(str(path), {"engine": "llama.cpp", "source": path.name}, provenance)
    _check_version("llama.cpp", prov["engine_version"], str(path))
    rows, dropped = [], Counter[str]()
    for no, obj in _json_records(path):
        where = f"{path}:{no}"
        t = obj.get("timings", obj) if isinstance(obj, dict) else None
        if not isinstance(t, dict) or "prompt_ms" not in t:
            raise InputError(where, "no timings object with prompt_ms",
                             "give llama-server responses or their `timings` objects")
        cached = int(_field(t, "cache_n", where))
        n, prompt_ms = int(_field(t, "prompt_n", where)), _field(t, "prompt_ms", where, float)
        k, pred_ms = int(_field(t, "predicted_n", where)), _field(t, "predicted_ms", where, float)
        src = {"source": f"{prov['source']}:{no}"}
        if n > 0 and prompt_ms > 0:
            rows.append({**_row(n, n * (cached + (n + 1) / 2), 1, 0, 0, prompt_ms * _MS), **src})
        else:
            dropped["requests with no prompt pass (all cached, or 0 ms)"] += 1
        if k > 0 and pred_ms > 0:
            ctx = round(cached + n + (k + 1) / 2)
            rows.append({**_row(0, 0.0, 0, 1, ctx, pred_ms / k * _MS), **src})
        else:
            dropped["requests with no decode time (predicted_n or predicted_ms 0)"] += 1
    prov.pop("source")
    return _finish(rows, {"tp": tp, "pp": 1, **prov}, str(path), dropped, [])


# --------------------------------------------------------------------------- any
def load_any(path: str | Path, fmt: str | None = None, *, tp: int | None = None,
             sent: list[Any] | None = None, **provenance: Any) -> pd.DataFrame:
    """One of FORMATS by name, else sniffed from the file. Splitwise: provenance model and gpu
    filter the rows. Vidur: path is the vidur folder or one of its mlp.csv.gz; model, gpu and
    tp are required. vllm-log: ``sent`` (calibrate.profiling.Sent, in arrival order, one phase
    run on an idle engine) is required, since the step line gives counts only."""
    path = Path(path)
    if not path.exists():
        raise InputError(str(path), "file not found", "check the path")
    fmt = fmt or sniff(path)
    if fmt not in FORMATS:
        raise InputError("fmt", f"{fmt!r} is not a format", f"use one of {', '.join(FORMATS)}")
    if fmt == "measurements":
        df = read(path)
        for k, v in provenance.items():  # fill blanks only; never overwrite the file's own
            if k not in PROVENANCE:
                raise InputError(str(path), f"unknown provenance field {k!r}",
                                 f"use some of {', '.join(PROVENANCE)}")
            df[k] = [x or str(v) for x in df[k]]
        return df
    if fmt == "splitwise":
        return splitwise(path, provenance.get("model"), provenance.get("gpu"), tp)
    if fmt == "vidur":
        return _vidur_from_path(path, tp, provenance)
    if fmt == "vllm-log":
        return _vllm_log(path, tp or 1, sent, provenance)
    reader = {"sglang-metrics": sglang_metrics, "sglang-log": sglang_log,
              "llama-timings": llama_timings}[fmt]
    return reader(path, tp or 1, **provenance)


def _vidur_from_path(path: Path, tp: int | None, given: Mapping[str, Any]) -> pd.DataFrame:
    model, gpu = given.get("model"), given.get("gpu")
    root = path
    if path.is_file():  # <root>/compute/<gpu>/<org>/<model>/mlp.csv.gz
        root = path.parents[4]
        gpu = gpu or path.parents[2].name
        model = model or f"{path.parents[1].name}/{path.parent.name}"
    if not model or not gpu or tp is None:
        raise InputError(str(path), "Vidur tables need a model, a gpu and tp",
                         "pass model=, gpu= and tp= (or the path of one mlp.csv.gz and tp=)")
    return vidur(str(model), str(gpu), tp, root)


def _vllm_log(path: Path, tp: int, sent: list[Any] | None, given: Mapping[str, Any]
              ) -> pd.DataFrame:
    from .profiling import join_phase  # aiohttp-heavy module: only when asked for

    log = read_step_log(path)
    if sent is None:
        raise InputError(str(path), f"a vLLM step log gives counts only ({len(log.steps)} "
                         "steps), not the contexts a sample needs",
                         "pass sent= (the requests, in arrival order) or run "
                         "`python -m calibrate.profiling`, which sends known shapes")
    joined = join_phase(log.steps, sent)
    prov = _provenance(str(path), {"engine": "vllm", "engine_version": log.version or "",
                                   "source": path.name}, given)
    rows = [{**{k: v for k, v in r.items() if k in COLUMNS},
             "source": f"{prov['source']}:{r['line']}"} for r in joined.rows]
    prov.pop("source")
    df = _finish(rows, {"tp": tp, "pp": 1, **prov}, str(path), joined.dropped, joined.notes)
    return df


def sniff(path: Path) -> str:
    """The format a file is in, from its name and first lines."""
    if path.is_dir():
        if (path / "compute").is_dir():
            return "vidur"
        raise InputError(str(path), "a folder, and not Vidur's (no compute/)",
                         "give a file, or fmt=")
    if path.suffix == ".parquet":
        return "measurements"
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            head = [line for _, line in zip(range(400), f, strict=False)]
    except OSError as e:
        raise InputError(str(path), f"cannot read ({e.strerror or e})", "check the path") from None
    first = head[0] if head else ""
    header = set(first.strip().split(","))
    if set(COLUMNS) <= header:
        return "measurements"
    if {"prompt_time", "token_time", "tensor_parallel"} <= header:
        return "splitwise"
    if "time_stats.mlp_up_proj.median" in header:
        return "vidur"
    text = "".join(head)
    if re.search(r"Engine \d+: Iteration\(", text):
        return "vllm-log"
    if "scheduled_requests" in text:
        return "sglang-metrics"
    if _SGL_MARK.search(text):
        return "sglang-log"
    if '"prompt_ms"' in text:
        return "llama-timings"
    raise InputError(str(path), "cannot tell the format from its first lines",
                     f"pass fmt= one of {', '.join(FORMATS)}")
