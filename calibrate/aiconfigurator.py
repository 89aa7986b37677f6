"""Forward-pass samples composed from NVIDIA AIConfigurator's measured op tables.

Tables (aiconfigurator-core 0.12.0, shared data/timing/aiconfigurator, SOURCES.md §2), under
ROOT/<system>/: latency is milliseconds of one kernel call.

    gemm/<backend>/<v>/gemm_perf.csv.gz                      gemm_dtype, m, n, k, latency
    attention/<backend>/<v>/context_attention_perf.csv.gz    batch_size, isl, num_heads,
    attention/<backend>/<v>/generation_attention_perf.csv.gz  num_key_value_heads, head_dim,
                                                             kv_cache_dtype, window_size,
                                                             step, latency
    comm/<backend>/<v>/custom_allreduce_perf.csv.gz          kernel_source, num_gpus,
                                                             message_size, latency

Composition of one forward pass of a dense (non-MoE, non-MLA) model at TP degree tp, with
the shapes one GPU holds (sim.catalog ModelSpec.linear_shapes: QKV and gate/up column-
parallel, O and down row-parallel, lm_head vocab-parallel; GEMM n = out_features,
k = in_features), L = num_layers:

    prefill, b prompts of isl tokens (one context_attention row, T = b·isl):
        L · [ctx_attn(b, isl) + Σ_{qkv,o,gate_up,down} gemm(T, n, k) + 2·allreduce(T·hidden)
             + elementwise(T)]
        + embed(T) + allreduce(T·hidden)                  vocab-parallel embedding
        + gemm(b, vocab/tp, hidden)                       lm_head on each prompt's last token
    decode, b sequences at KV length s = step + 1 (one generation_attention row, T = b):
        L · [gen_attn(b, step) + Σ gemm(b, n, k) + 2·allreduce(b·hidden) + elementwise(b)]
        + embed(b) + allreduce(b·hidden) + gemm(b, vocab/tp, hidden)

The memory-bound kernels between the GEMMs, as AIConfigurator composes a dense layer
(ai-dynamo/aiconfigurator:src/aiconfigurator/sdk/models/llama.py @ 28db9123: two fused
residual-add + RMSNorm, one SiLU-and-mul, an embedding gather and its all-reduce), priced as
that project prices an op it has no table for (PerfDatabase.query_mem_op,
ai-dynamo/aiconfigurator:src/aiconfigurator/sdk/perf_database.py @ main): bytes / (mem_bw ·
mem_bw_empirical_scaling_factor) + mem_empirical_constant_latency, from
system_specs/<system>.yaml (H100-SXM: 3.35 TB/s · 0.8, 3 µs; without the file, the GPU's
catalogue bandwidth and those two factors), bf16 activations:

    elementwise(T) = 2 · mem(T · (2h + 2h) · 2 B)                  add + norm, twice
                   + mem(T · (2·I/tp + I/tp) · 2 B)                SiLU(gate) · up
    embed(T)       = mem(2 · T · h · 2 B)                          gather rows, write out

vLLM runs the same kernels: Qwen3DecoderLayer's input_layernorm and post_attention_layernorm
take the residual (fused add + RMSNorm), its MLP is Qwen2MLP (gate_up, SiluAndMul, down)
(vllm-project/vllm:vllm/model_executor/models/qwen3.py @ 002456df), and
VocabParallelEmbedding.forward all-reduces its masked lookup when tp > 1
(vllm-project/vllm:vllm/model_executor/layers/vocab_parallel_embedding.py @ 00db0119).

allreduce only for tp > 1: the `<Backend>_custom_graph` kernel (CUDA-graph custom
all-reduce, what vLLM / SGLang run at serving batch sizes), num_gpus = tp, message_size read
as bf16 elements. Attention rows: heads per GPU = num_attention_heads / tp, KV heads per GPU
= max(1, kv_heads / tp), head_dim, kv_cache_dtype bfloat16, window_size 0; where several
kernel_sources measured the same point (fa3 / fa4), the fastest (the engine picks it).
GEMMs: gemm_dtype bfloat16 (fp8 weights: "fp8", per-tensor scaled), lm_head always bfloat16.

Grids: attention points are table rows as they are (no interpolation). GEMM latency is
interpolated linearly in each of m, n, k between the bracketing grid values (trilinear);
beyond the largest n or k (Llama's 128256-row lm_head) the largest grid value's latency is
scaled by x / x_max (a GEMM that size is bandwidth- or FLOP-bound, both linear in n and k);
below the smallest, the smallest's latency is used. All-reduce latency: linear in
message_size between grid points, the smallest's below the grid.

Left out: rope and Qwen3's q/k norms (small per-head kernels), the KV-cache write, the
logits gather, sampling and CPU overhead (scheduling, input preparation, output processing);
so a profile fitted to these samples has overheads of GPU kernels only, and a real engine
will be slower by about those. Decode rows whose KV (b · s tokens) does not fit in the GPU
next to the weights are dropped: the twin can never run them.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd
import yaml

from sim.catalog import GpuSpec, ModelSpec
from sim.errors import InputError

from .measurements import frame

_GEMM_DTYPE = {"bf16": "bfloat16", "fp16": "bfloat16", "fp8": "fp8"}
_ALLREDUCE_KERNEL = {"vllm": "vLLM_custom_graph", "sglang": "SGLang_CustomAllReduce_graph"}
_MS = 1e-3
# AIConfigurator's memory-op factors where a system has no spec file (its H100 / H200 / A100
# system_specs/*.yaml all give these two values)
MEM_BW_SCALING = 0.8
MEM_CONSTANT_S = 3e-6


def default_root() -> Path:
    """$SERVETWIN_AIC_DIR, else shared/data/timing/aiconfigurator next to or above the repo."""
    env = os.environ.get("SERVETWIN_AIC_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parent.parent
    for base in (repo, repo.parent):
        p = base / "shared" / "data" / "timing" / "aiconfigurator"
        if p.is_dir():
            return p
    return repo / "shared" / "data" / "timing" / "aiconfigurator"


def _versions(root: Path, system: str, family: str, backend: str, name: str) -> list[str]:
    """Versions holding the table, oldest-looking first ("0.5.6.post2" < "0.5.14")."""
    base = root / system / family / backend
    versions = [p.name for p in base.glob("*") if (p / name).is_file()]
    return sorted(versions, key=lambda v: [int(x) if x.isdigit() else -1 for x in v.split(".")])


def _table(root: Path, system: str, family: str, backend: str, name: str,
           version: str | None = None) -> Path:
    """The table at `version` when that version measured it, else the newest-looking one
    (a version may hold only some families: SGLang 0.5.6.post2 on h100_sxm has GEMMs
    only). samples() refuses a version that holds none of the tables, and
    table_versions() shows which version each table came from."""
    base = root / system / family / backend
    versions = _versions(root, system, family, backend, name)
    if not versions:
        raise InputError(str(base), f"no {name} for {system} / {backend}",
                         f"check the system and backend, or --aic-dir (looked under {root})")
    return base / (version if version in versions else versions[-1]) / name


def _bracket(grid: list[int], x: float) -> list[tuple[int, float]]:
    """(grid value, weight) pairs whose weighted latencies give the latency at x."""
    if x <= grid[0]:
        return [(grid[0], 1.0)]
    if x >= grid[-1]:
        return [(grid[-1], x / grid[-1])]
    i = bisect.bisect_left(grid, x)
    hi, lo = grid[i], grid[i - 1]
    if hi == x:
        return [(hi, 1.0)]
    w = (x - lo) / (hi - lo)
    return [(lo, 1.0 - w), (hi, w)]


@dataclass
class GemmTable:
    latency_ms: dict[tuple[int, int, int], float]
    m: list[int]
    n: list[int]
    k: list[int]
    where: str

    @classmethod
    def from_frame(cls, df: pd.DataFrame, gemm_dtype: str, where: str) -> GemmTable:
        d = df[df["gemm_dtype"] == gemm_dtype]
        if d.empty:
            raise InputError(where, f"no rows with gemm_dtype = {gemm_dtype}",
                             "pick a dtype the table measured")
        best = d.groupby(["m", "n", "k"], as_index=False)["latency"].min()
        keys = zip(best["m"].tolist(), best["n"].tolist(), best["k"].tolist(), strict=True)
        return cls({(int(a), int(b), int(c)): float(v)
                    for (a, b, c), v in zip(keys, best["latency"].tolist(), strict=True)},
                   sorted(d["m"].unique().tolist()), sorted(d["n"].unique().tolist()),
                   sorted(d["k"].unique().tolist()), where)

    def __call__(self, m: int, n: int, k: int) -> float:
        """Milliseconds of y[m, n] = x[m, k] · W[k, n]."""
        if m > self.m[-1]:
            raise InputError(self.where, f"m = {m} tokens is beyond the table's {self.m[-1]}",
                             "use smaller batches (--aic-max-tokens)")
        ms = _bracket(self.m, m)
        total = 0.0
        for mv, wm in ms:
            for nv, wn in _bracket(self.n, n):
                for kv, wk in _bracket(self.k, k):
                    key = (mv, nv, kv)
                    if key not in self.latency_ms:
                        raise InputError(self.where, f"no measurement at (m, n, k) = {key}",
                                         "the grid has a hole here; pick other batch sizes")
                    total += wm * wn * wk * self.latency_ms[key]
        return total


def _attention_rows(path: Path, model: ModelSpec, tp: int) -> pd.DataFrame:
    df = pd.read_csv(path)
    full = (df["window_size"] == 0) if "window_size" in df.columns else True  # (some
    # versions' tables have no sliding-window column: full attention only)
    sel = df[(df["num_heads"] == model.num_attention_heads // tp)
             & (df["num_key_value_heads"] == model.kv_heads_per_gpu(tp))
             & (df["head_dim"] == model.head_dim) & (df["kv_cache_dtype"] == "bfloat16")
             & full]
    if sel.empty:
        raise InputError(str(path), f"no rows for {model.num_attention_heads // tp} heads, "
                         f"{model.kv_heads_per_gpu(tp)} KV heads, head_dim {model.head_dim}",
                         "this model / TP shape was not measured")
    grouped = sel.groupby(["batch_size", "isl", "step"], as_index=False)["latency"].min()
    return pd.DataFrame(grouped)


def _allreduce(path: Path, backend: str, tp: int) -> tuple[list[int], dict[int, float]]:
    df = pd.read_csv(path)
    sel = df[(df["kernel_source"] == _ALLREDUCE_KERNEL[backend]) & (df["num_gpus"] == tp)]
    if sel.empty:
        raise InputError(str(path), f"no {_ALLREDUCE_KERNEL[backend]} rows at {tp} GPUs",
                         "the table covers num_gpus 2, 4, 8")
    lat = sel.groupby("message_size", as_index=False)["latency"].min()
    sizes = [int(x) for x in lat["message_size"].tolist()]
    return sorted(sizes), dict(zip(sizes, (float(v) for v in lat["latency"].tolist()),
                                   strict=True))


@lru_cache(maxsize=16)
def _spec_yaml(path: Path) -> dict[str, object]:
    with path.open(encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    return doc if isinstance(doc, dict) else {}


def mem_op_params(root: Path, system: str, gpu: GpuSpec) -> tuple[float, float]:
    """(effective bytes/s, constant s) of a memory-bound kernel: AIConfigurator's
    query_mem_op, bytes / (mem_bw · mem_bw_empirical_scaling_factor) + constant, with the
    values of system_specs/<system>.yaml when present."""
    path = root / "system_specs" / f"{system}.yaml"
    spec = _spec_yaml(path).get("gpu", {}) if path.is_file() else {}
    assert isinstance(spec, dict)
    bw = float(spec.get("mem_bw", gpu.hbm_bytes_per_s))
    factor = float(spec.get("mem_bw_empirical_scaling_factor", MEM_BW_SCALING))
    const = float(spec.get("mem_empirical_constant_latency", MEM_CONSTANT_S))
    return bw * factor, const


def elementwise_ms(model: ModelSpec, tp: int, tokens: int, bytes_per_s: float,
                   constant_s: float) -> tuple[float, float]:
    """(ms of one layer's elementwise kernels, ms of the embedding gather) for `tokens` rows
    (module doc): two residual-add + RMSNorm, one SiLU-and-mul, bf16 activations."""
    def mem(num_bytes: float) -> float:
        return (num_bytes / bytes_per_s + constant_s) / _MS

    h, inter = model.hidden_size, -(-model.intermediate_size // tp)
    layer = 2 * mem(tokens * 4 * h * 2) + mem(tokens * 3 * inter * 2)
    return layer, mem(2 * tokens * h * 2)


def samples(model: ModelSpec, gpu: GpuSpec, tp: int, system: str, backend: str,
            dtype: str = "bf16", root: str | Path | None = None,
            max_tokens: int = 16384, version: str | None = None) -> pd.DataFrame:
    """Pure-prefill and pure-decode forward passes on the attention tables' grids, in the
    calibrate.measurements schema; measured_s is the composed sum (see the module doc).
    version: the backend version to read (default: the newest-looking per table); a table
    that version did not measure comes from the newest version that did, named in the
    rows' `source` (table_versions)."""
    if model.is_moe or model.is_mla:
        raise InputError(model.name, "MoE / MLA models are not composed from op tables yet",
                         "use a dense model")
    if backend not in _ALLREDUCE_KERNEL:
        raise InputError("backend", f"{backend!r} is not known", "use vllm or sglang")
    if dtype not in _GEMM_DTYPE:
        raise InputError("dtype", f"{dtype!r} is not known", f"use {', '.join(_GEMM_DTYPE)}")
    model.check_tp(tp)
    root = Path(root) if root else default_root()
    tables = {"gemm": ("gemm", "gemm_perf.csv.gz"),
              "ctx": ("attention", "context_attention_perf.csv.gz"),
              "gen": ("attention", "generation_attention_perf.csv.gz")}
    if tp > 1:
        tables["ar"] = ("comm", "custom_allreduce_perf.csv.gz")
    paths = {key: _table(root, system, family, backend, name, version)
             for key, (family, name) in tables.items()}
    if version is not None and all(p.parent.name != version for p in paths.values()):
        known = sorted({v for family, name in tables.values()
                        for v in _versions(root, system, family, backend, name)})
        raise InputError("--aic-version", f"{version!r}: no {system} / {backend} table "
                         "at that version", f"use one of {', '.join(known)}")
    gemm_df = pd.read_csv(paths["gemm"])
    gemm = GemmTable.from_frame(gemm_df, _GEMM_DTYPE[dtype], str(paths["gemm"]))
    lm_gemm = gemm if dtype != "fp8" else GemmTable.from_frame(gemm_df, "bfloat16",
                                                               str(paths["gemm"]))
    shapes = model.linear_shapes(tp)
    layer = [(s.out_features, s.in_features) for s in shapes if s.kind != "lm_head"]
    (lm,) = (s for s in shapes if s.kind == "lm_head")
    ar_grid, ar = _allreduce(paths["ar"], backend, tp) if tp > 1 else ([], {})

    def allreduce_ms(num_elements: int) -> float:
        if not ar_grid:
            return 0.0
        if num_elements > ar_grid[-1]:
            raise InputError(str(paths["ar"]), f"message of {num_elements} elements is beyond "
                             "the table", "use smaller batches")
        return sum(w * ar[x] for x, w in _bracket(ar_grid, num_elements))

    mem_bw, mem_const = mem_op_params(root, system, gpu)

    def pass_ms(tokens: int, attn_ms: float, logits_rows: int) -> float:
        ew_layer, embed = elementwise_ms(model, tp, tokens, mem_bw, mem_const)
        ar = allreduce_ms(tokens * model.hidden_size)
        per_layer = attn_ms + sum(gemm(tokens, n, k) for n, k in layer) + 2 * ar + ew_layer
        return (model.num_layers * per_layer + embed + ar
                + lm_gemm(logits_rows, lm.out_features, lm.in_features))

    source = ";".join(str(p.relative_to(root)) for p in paths.values())
    version = version or paths["gemm"].parent.name
    kv_room = gpu.hbm_capacity_bytes - model.weight_bytes(dtype, tp)
    kv_per_token = model.kv_bytes_per_token("bf16", tp)
    rows: list[dict[str, object]] = []
    ctx = _attention_rows(paths["ctx"], model, tp)
    for b, isl, lat in zip(ctx["batch_size"].tolist(), ctx["isl"].tolist(),
                           ctx["latency"].tolist(), strict=True):
        if b * isl > max_tokens:
            continue
        rows.append(_row(b * isl, b * isl * (isl + 1) / 2, b, 0, 0, pass_ms(b * isl, lat, b)))
    gen = _attention_rows(paths["gen"], model, tp)
    for b, step, lat in zip(gen["batch_size"].tolist(), gen["step"].tolist(),
                            gen["latency"].tolist(), strict=True):
        s = step + 1
        if b * s * kv_per_token > kv_room or b > max_tokens:
            continue
        rows.append(_row(0, 0.0, 0, b, b * s, pass_ms(b, lat, b)))
    prov = {"tp": tp, "pp": 1, "gpu": system, "engine": backend, "engine_version": version,
            "model": model.name, "dtype": dtype, "date": "", "source": source}
    return frame(({**row, **prov} for row in rows), f"aiconfigurator {system}/{backend}")


def _row(p: int, a: float, n_p: int, d: int, c: int, ms: float) -> dict[str, object]:
    return {"num_prefill_tokens": p, "prefill_attn_work": a, "num_prefill_seqs": n_p,
            "num_decode_seqs": d, "decode_context_tokens": c, "measured_s": ms * _MS}


def table_versions(df: pd.DataFrame) -> dict[str, str]:
    """Table file name -> the version folder it was read from, over the rows' sources."""
    out: dict[str, str] = {}
    for s in sources(df):
        parts = Path(s).parts
        if len(parts) >= 5:  # <system>/<family>/<backend>/<version>/<table>
            out[parts[-1]] = parts[-2]
    return out


def sources(df: pd.DataFrame) -> list[str]:
    out: list[str] = []
    for s in df["source"].unique():
        out += [x for x in str(s).split(";") if x and x not in out]
    return out
