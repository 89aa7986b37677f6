"""Time one TP rank's forward pass on this machine's GPU with PyTorch: random weights, no
download, the batch shapes of a serving benchmark; write measurement rows as they come.

What it runs is the dense decoder the timing model composes (sim.catalog.ModelSpec), as one
GPU of a TP group holds it: per layer RMSNorm, the QKV GEMM, causal attention (prefill) or
attention over a KV cache (decode), the O GEMM, RMSNorm, gate_up GEMM, SiLU-and-mul, down
GEMM, residual adds; then the final norm and the LM head over one row per sequence. Weights
and KV caches are random bf16 tensors. What it leaves out, so a comparison must too: the
all-reduces between TP ranks (one GPU here), rotary embedding, the paged-KV write, sampling
and every bit of host work (scheduling, input preparation, detokenising).

Layers cycle over a few distinct weight sets (and KV buffers): each set is far larger than
the L2 cache, so every layer still streams its weights (and KV) from memory. Every pass is
captured once as a CUDA graph and replayed, so no per-kernel launch cost from Python counts
(vLLM runs its passes from graphs too); a pass whose capture fails runs eagerly, and the row's
engine_version says which. Each shape is
timed with CUDA events: `warmup` passes, then the median of `reps`.

    python -m calibrate.kernel_probe run --model Qwen/Qwen3-32B --tp 1,2,4,8 --out probe.csv
    python -m calibrate.kernel_probe compare probe.csv      # against the bundled profiles

Needs PyTorch with a GPU (`run`); `compare` needs only the project. The rows are in the
schema of calibrate.measurements, so `servetwin calibrate probe.csv` fits them.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from sim.catalog import load_model
from sim.catalog.model import ModelSpec
from sim.errors import InputError, ServetwinError

from .schema import COLUMNS

ENGINE = "torch-sdpa"
SOURCE = ("calibrate.kernel_probe: one TP rank's kernels on one GPU; no all-reduce, rotary, "
          "KV write, sampling or host work")
L2_MARGIN_BYTES = 512 << 20  # each cycle of distinct layers spans at least this much
MAX_CYCLE = 16


@dataclass(frozen=True)
class Shape:
    """One forward pass: `prefill_seqs` prompt chunks of `prefill_len` tokens, each after
    `prefill_ctx` cached tokens (0: from scratch), beside `decode_seqs` sequences decoding
    one token after `context - 1` cached ones. Either part may be empty."""
    prefill_seqs: int = 0
    prefill_len: int = 0
    decode_seqs: int = 0
    context: int = 0
    prefill_ctx: int = 0

    @property
    def is_prefill(self) -> bool:
        return self.prefill_seqs > 0

    @property
    def prefill_rows(self) -> int:
        return self.prefill_seqs * self.prefill_len

    def aggregates(self) -> dict[str, int | float]:
        n, c = self.prefill_len, self.prefill_ctx
        return {"num_prefill_tokens": self.prefill_seqs * n,
                "prefill_attn_work": float(self.prefill_seqs * n * (c + (n + 1) / 2)),
                "num_prefill_seqs": self.prefill_seqs,
                "num_decode_seqs": self.decode_seqs,
                "decode_context_tokens": self.decode_seqs * self.context}

    def label(self) -> str:
        parts = []
        if self.is_prefill:
            after = f" after {self.prefill_ctx}" if self.prefill_ctx else ""
            parts.append(f"prefill {self.prefill_seqs} x {self.prefill_len}{after}")
        if self.decode_seqs:
            parts.append(f"decode {self.decode_seqs} x ctx {self.context}")
        return " + ".join(parts)


def default_shapes(prefill_lens: Sequence[int] = (1024, 4096),
                   prefill_tokens: Sequence[int] = (1024, 2048, 4096, 8192),
                   decode_batches: Sequence[int] = (1, 8, 16, 32, 64, 128),
                   contexts: Sequence[int] = (1536, 4608)) -> list[Shape]:
    """Prefill passes of whole prompts (as many as fit each token count) and decode passes
    at the benchmark's batch sizes and mid-output contexts."""
    shapes = [Shape(prefill_seqs=t // n, prefill_len=n)
              for n in prefill_lens for t in prefill_tokens if t >= n]
    shapes += [Shape(decode_seqs=b, context=c) for c in contexts for b in decode_batches]
    return shapes


def mixed_shapes() -> list[Shape]:
    """What chunked prefill makes: a prompt in the same pass as running decodes, and a
    prompt's later chunk attending to its cached first part."""
    shapes = [Shape(prefill_seqs=1, prefill_len=n, decode_seqs=b, context=c)
              for n, c in ((1024, 1536), (4096, 4608)) for b in (8, 32, 128)]
    shapes += [Shape(prefill_seqs=1, prefill_len=n, prefill_ctx=c)
               for n, c in ((2048, 2048), (2048, 6144), (512, 3584))]
    shapes.append(Shape(prefill_seqs=1, prefill_len=2048, prefill_ctx=2048, decode_seqs=32,
                        context=4608))
    return shapes


def small_shapes() -> list[Shape]:
    """A few cheap passes, for dry runs and tests."""
    return [Shape(prefill_seqs=2, prefill_len=16), Shape(decode_seqs=4, context=24),
            Shape(prefill_seqs=1, prefill_len=8, prefill_ctx=8, decode_seqs=2, context=24)]


def sweep_shapes() -> list[Shape]:
    """One prompt of n tokens for n in fine steps around 1,024 and 4,096: how a pass's time
    steps with its row count (the GEMMs' tiles and waves)."""
    return [Shape(prefill_seqs=1, prefill_len=n)
            for n in (*range(960, 1217, 8), *range(3968, 4225, 16))]


SHAPE_SETS = {"default": default_shapes, "mixed": mixed_shapes, "sweep": sweep_shapes,
              "small": small_shapes}


def check_model(model: ModelSpec) -> None:
    if model.is_moe or model.is_mla or model.num_sliding_layers:
        raise InputError(f"model {model.name}", "the probe builds dense full-attention "
                         "decoders only (no MoE, MLA or sliding window)",
                         "probe a dense model (e.g. Qwen/Qwen3-32B, meta-llama/Llama-3.1-8B)")


# ------------------------------------------------------------------ the PyTorch part
def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ServetwinError("calibrate.kernel_probe run needs PyTorch with a CUDA GPU: "
                             "pip install torch (CUDA build) on the GPU host") from None
    return torch


class RankModel:
    """One TP rank's weights and the forward pass (see module docstring)."""

    def __init__(self, torch: Any, model: ModelSpec, tp: int, device: str, cycle: int) -> None:
        model.check_tp(tp)
        self.t, self.m, self.tp, self.dev = torch, model, tp, device
        self.heads = model.num_attention_heads // tp
        self.kv_heads = model.kv_heads_per_gpu(tp)
        self.hd = model.head_dim
        h, inter = model.hidden_size, math.ceil(model.intermediate_size / tp)
        self.inter = inter
        bf = torch.bfloat16

        def w(i: int, o: int) -> Any:
            return (torch.randn(i, o, device=device, dtype=bf) * (i ** -0.5))
        q_out = (self.heads + 2 * self.kv_heads) * self.hd
        self.layers = [(w(h, q_out), w(self.heads * self.hd, h), w(h, 2 * inter), w(inter, h))
                       for _ in range(cycle)]
        self.norm = torch.ones(h, device=device, dtype=bf)
        self.lm_head = w(h, math.ceil(model.vocab_size / tp))
        self.kv: list[tuple[Any, ...]] = []
        q = torch.randn(1, self.heads, 64, self.hd, device=device, dtype=bf)
        kv = torch.randn(1, self.kv_heads, 64, self.hd, device=device, dtype=bf)
        f = torch.nn.functional
        # prefill from scratch and packed decode; a later chunk (bottom-right causal mask)
        self.backend = self._pick_backend(lambda: (
            f.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True),
            f.scaled_dot_product_attention(q[:, :, :1].reshape(1, self.kv_heads, -1, self.hd),
                                           kv, kv)))
        self.chunk_backend = self._pick_backend(lambda: chunk_attention(
            f, q[:, :, :16], kv, kv))

    def _pick_backend(self, trial: Any) -> Any:
        """The first of cuDNN, FlashAttention-2 and memory-efficient attention that runs the
        trial's attention calls; None: PyTorch's own choice (and always on a CPU)."""
        if self.dev == "cpu":
            return None
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                  SDPBackend.EFFICIENT_ATTENTION):
            try:
                with sdpa_kernel([b]):
                    trial()
                self.t.cuda.synchronize()
                return b
            except RuntimeError:
                continue
        return None

    def attention_name(self, shape: Shape | None = None) -> str:
        def name(b: Any) -> str:
            return "sdpa-default" if b is None else b.name.lower()
        if shape is not None and shape.prefill_ctx:
            return f"{name(self.backend)}, chunks {name(self.chunk_backend)}"
        return name(self.backend)

    def _sdpa(self, backend: Any) -> Any:
        import contextlib
        if backend is None:
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel
        return sdpa_kernel([backend])

    def context(self) -> Any:
        return self._sdpa(self.backend)

    def alloc_kv(self, shape: Shape, cycle: int) -> None:
        """Random caches per layer of the cycle: the decoders' (context − 1 tokens plus the
        new one) and the chunks' (cached tokens plus the chunk: its own K/V stand written)."""
        t = self.t
        self.kv = []  # free the previous shape's first

        def r(*dims: int) -> Any:
            return t.randn(dims, device=self.dev, dtype=t.bfloat16)
        for _ in range(cycle):
            dk = dv = pk = pv = None
            if shape.decode_seqs:
                dims = (shape.decode_seqs, self.kv_heads, shape.context, self.hd)
                dk, dv = r(*dims), r(*dims)
            if shape.prefill_ctx:
                dims = (shape.prefill_seqs, self.kv_heads,
                        shape.prefill_ctx + shape.prefill_len, self.hd)
                pk, pv = r(*dims), r(*dims)
            self.kv.append((dk, dv, pk, pv))

    def _rms(self, x: Any) -> Any:
        return self.t.nn.functional.rms_norm(x, (x.shape[-1],), self.norm, 1e-6)

    def forward(self, x: Any, shape: Shape) -> Any:
        t, f = self.t, self.t.nn.functional
        nq, nkv, hd = self.heads, self.kv_heads, self.hd
        for i in range(self.m.num_layers):
            wqkv, wo, wgu, wd = self.layers[i % len(self.layers)]
            qkv = self._rms(x) @ wqkv
            q, k, v = qkv.split([nq * hd, nkv * hd, nkv * hd], dim=-1)
            dk, dv, pk, pv = self.kv[i % len(self.kv)] if self.kv else (None,) * 4
            parts = []
            p = shape.prefill_rows
            if p:
                b, n = shape.prefill_seqs, shape.prefill_len
                qp = q[:p].view(b, n, nq, hd).transpose(1, 2)
                if shape.prefill_ctx:
                    with self._sdpa(self.chunk_backend):
                        a = chunk_attention(f, qp, pk, pv)
                else:
                    kp = k[:p].view(b, n, nkv, hd).transpose(1, 2)
                    vp = v[:p].view(b, n, nkv, hd).transpose(1, 2)
                    a = f.scaled_dot_product_attention(qp, kp, vp, is_causal=True,
                                                       enable_gqa=True)
                parts.append(a.transpose(1, 2).reshape(p, nq * hd))
            if shape.decode_seqs:
                parts.append(packed_decode_attention(f, q[p:], dk, dv))
            a = parts[0] if len(parts) == 1 else t.cat(parts)
            x = x + a @ wo
            g, u = (self._rms(x) @ wgu).split([self.inter, self.inter], dim=-1)
            x = x + (f.silu(g) * u) @ wd
        if shape.is_prefill:  # one row per sequence: a chunk's last token, every decoder
            last = x[:shape.prefill_rows].view(shape.prefill_seqs, shape.prefill_len, -1)[:, -1]
            x = t.cat([last, x[shape.prefill_rows:]]) if shape.decode_seqs else last
        return t.matmul(self._rms(x), self.lm_head).float()


def packed_decode_attention(f: Any, q: Any, k: Any, v: Any) -> Any:
    """One decode token per sequence, GQA: q (b, heads·hd), k/v (b, kv_heads, ctx, hd).
    The query heads that share a KV head attend as that head's query rows, so one dense
    attention call serves them (no causal mask: every cached key precedes the token)."""
    b, nkv, _, hd = k.shape
    out = f.scaled_dot_product_attention(q.view(b, nkv, -1, hd), k, v)
    return out.reshape(b, -1)


def chunk_attention(f: Any, q: Any, k: Any, v: Any) -> Any:
    """A prompt chunk after cached tokens: q (b, heads, n, hd) against k/v (b, kv_heads,
    cached + n, hd), causal with the queries aligned to the last keys (bottom-right)."""
    from torch.nn.attention.bias import causal_lower_right
    mask = causal_lower_right(q.shape[-2], k.shape[-2])
    return f.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _kv_cycle(model: ModelSpec, tp: int, shape: Shape) -> int:
    tokens = (shape.decode_seqs * shape.context
              + shape.prefill_seqs * (shape.prefill_ctx + shape.prefill_len
                                      if shape.prefill_ctx else 0))
    per_layer = 2 * tokens * model.kv_heads_per_gpu(tp) * model.head_dim * 2
    return max(1, min(MAX_CYCLE, model.num_layers, math.ceil(L2_MARGIN_BYTES / max(per_layer, 1))))


def _weight_cycle(model: ModelSpec, tp: int) -> int:
    per_layer = sum(s.numel for s in model.linear_shapes(tp) if s.kind != "lm_head") * 2
    return max(2, min(MAX_CYCLE, model.num_layers, math.ceil(L2_MARGIN_BYTES / per_layer)))


def time_shape(rm: RankModel, shape: Shape, warmup: int, reps: int) -> tuple[list[float], str]:
    """Seconds of each timed pass, and how the passes ran: "cuda graph" (captured once,
    replayed: no per-kernel launch cost, as vLLM's graphs) or "eager" (CPU, or a capture
    that failed)."""
    t = rm.t
    rows = shape.prefill_rows + shape.decode_seqs
    x = t.randn(rows, rm.m.hidden_size, device=rm.dev, dtype=t.bfloat16)
    rm.kv = []
    if shape.decode_seqs or shape.prefill_ctx:
        rm.alloc_kv(shape, _kv_cycle(rm.m, rm.tp, shape))
    def eager() -> Any:
        with rm.context():
            return rm.forward(x, shape)
    run, mode = eager, "eager"
    if rm.dev != "cpu":
        try:
            for _ in range(2):  # warm before capture
                eager()
            graph = t.cuda.CUDAGraph()
            with t.cuda.graph(graph), rm.context():
                rm.forward(x, shape)
            run, mode = graph.replay, "cuda graph"
        except RuntimeError:  # a kernel that cannot be captured: time the eager passes
            t.cuda.synchronize()
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        if rm.dev == "cpu":  # tests: the same passes, wall-clock timed
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
            continue
        start, end = t.cuda.Event(enable_timing=True), t.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    rm.kv = []
    return times, mode


def gpu_name(torch: Any, device: str) -> str:
    """The catalog's GPU name for this device, else the device's own name."""
    if device == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(0)
    low = name.lower()
    for key, ours in (("h200", "h200_sxm"), ("h100", "h100_sxm"), ("a100", "a100_sxm")):
        if key in low:
            return ours
    return name.replace(" ", "_")


def run(model_name: str, tps: Sequence[int], out: Path, shapes: Sequence[Shape],
        warmup: int = 2, reps: int = 5, device: str = "cuda") -> Iterator[dict[str, Any]]:
    """Measure every (tp, shape); append each row to `out` (CSV) as it is measured."""
    torch = _torch()
    if device != "cpu" and not torch.cuda.is_available():
        raise ServetwinError("calibrate.kernel_probe run: PyTorch sees no CUDA GPU; run it "
                             "on the GPU host (or with --device cpu for a dry run)")
    model = load_model(model_name)
    check_model(model)
    for tp in tps:
        model.check_tp(tp)
    gpu = gpu_name(torch, device)
    prov = {"gpu": gpu, "engine": ENGINE, "engine_version": torch.__version__,
            "model": model.name, "dtype": "bf16", "date": date.today().isoformat(),
            "source": SOURCE}
    new = not out.exists()
    with out.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*COLUMNS, "spread"])
        if new:
            writer.writeheader()
        for tp in tps:
            rm = RankModel(torch, model, tp, device, _weight_cycle(model, tp))
            for shape in shapes:
                times, mode = time_shape(rm, shape, warmup, reps)
                prov["engine_version"] = (f"{torch.__version__} {rm.attention_name(shape)}, "
                                          f"{mode}")
                row = {**shape.aggregates(), "tp": tp, "pp": 1,
                       "measured_s": statistics.median(times), **prov,
                       "spread": (max(times) - min(times)) / statistics.median(times)}
                writer.writerow(row)
                fh.flush()
                yield row
            del rm
            if device != "cpu":
                torch.cuda.empty_cache()


# ------------------------------------------------------------------ compare with a profile
def profile_timing(profile_path: Path, row: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The bundled profile's timing model for the row's GPU, model, TP and dtype, and the
    host overhead its provenance records (empty for none)."""
    from sim.catalog import load_gpu
    from sim.timing import RooflineTiming

    from .bundle import SYSTEM_GPU
    from .profile import load_profile
    profile, meta = load_profile(profile_path)
    prov = meta.get("provenance") or {}
    timing = RooflineTiming(load_model(str(row["model"])), load_gpu(SYSTEM_GPU[str(row["gpu"])]),
                            int(row["tp"]), str(row["dtype"]), profile)
    return timing, prov.get("host_overhead") or {}


def predicted_kernels_s(timing: Any, host: dict[str, Any],
                        row: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """The profile's step time for the row, less what the probe does not run: the all-reduce
    and the host part of the overheads (the profile's provenance keeps the two overheads
    apart; the kernel part stays)."""
    parts = timing.breakdown(int(row["num_prefill_tokens"]), float(row["prefill_attn_work"]),
                             int(row["num_prefill_seqs"]), int(row["num_decode_seqs"]),
                             int(row["decode_context_tokens"]))
    seqs = int(row["num_prefill_seqs"]) + int(row["num_decode_seqs"])
    parts["overhead"] -= float(host.get("step_s", 0.0)) + float(host.get("per_seq_s", 0.0)) * seqs
    parts.pop("allreduce")
    return sum(parts.values()), parts


def compare(csv_path: Path, engine: str = "vllm") -> list[dict[str, Any]]:
    from . import measurements
    from .bundle import PROFILE_DIR
    from .validate import bundled_profiles

    df = measurements.read(csv_path)
    profiles = bundled_profiles(PROFILE_DIR)
    out: list[dict[str, Any]] = []
    timings: dict[Path, tuple[Any, dict[str, Any]]] = {}  # one per profile, not per row
    for raw in df.to_dict("records"):
        rec = {str(k): v for k, v in raw.items()}
        match = [p for p in profiles if p.system == rec["gpu"] and p.backend == engine
                 and p.model == rec["model"] and p.tp == rec["tp"] and p.dtype == rec["dtype"]]
        if not match:
            continue
        path = match[0].path
        if path not in timings:
            timings[path] = profile_timing(path, rec)
        pred, parts = predicted_kernels_s(*timings[path], rec)
        out.append({**rec, "profile": match[0].path.name, "pred_s": pred,
                    "ratio": pred / rec["measured_s"],
                    **{f"pred_{k}_s": v for k, v in parts.items()}})
    return out


def summarise(rows: Sequence[dict[str, Any]],
              big_batch: int = 64) -> dict[tuple[int, str], list[float]]:
    """Ratios grouped by TP and pass kind: prefill (whole prompts), chunk (prompt chunks after
    cached tokens), mixed (prompts beside decodes), decode below / from big_batch."""
    out: dict[tuple[int, str], list[float]] = {}
    for r in rows:
        out.setdefault((int(r["tp"]), pass_kind(r, big_batch)), []).append(float(r["ratio"]))
    return out


def pass_kind(r: dict[str, Any], big_batch: int = 64) -> str:
    """prefill (whole prompts), chunk (after cached tokens), either + decode, or decode
    below / from big_batch sequences."""
    d, p = int(r["num_decode_seqs"]), int(r["num_prefill_tokens"])
    if not p:
        return f"decode b<{big_batch}" if d < big_batch else f"decode b>={big_batch}"
    whole = abs(float(r["prefill_attn_work"]) - p * (p / int(r["num_prefill_seqs"]) + 1) / 2)
    return ("prefill" if whole < 0.5 else "chunk") + (" + decode" if d else "")


# ------------------------------------------------------------------ command line
def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers separated by commas") from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calibrate.kernel_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="time forward passes on this GPU")
    r.add_argument("--model", default="Qwen/Qwen3-32B")
    r.add_argument("--tp", type=_ints, default=[1], help="TP ranks to emulate, e.g. 1,2,4,8")
    r.add_argument("--out", type=Path, required=True, help="CSV, appended to")
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--reps", type=int, default=5)
    r.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    r.add_argument("--shapes", choices=tuple(SHAPE_SETS), default="default",
                   help="default: whole prompts and pure decodes; mixed: prompts beside "
                   "decodes and chunks after cached tokens; sweep: one prompt of 960-1,216 "
                   "and 3,968-4,224 tokens in small steps; small: a dry run")
    c = sub.add_parser("compare", help="probe rows against the bundled profiles' kernel time")
    c.add_argument("csv", type=Path)
    c.add_argument("--engine", default="vllm")
    c.add_argument("--out", type=Path, help="write the per-row comparison here (CSV)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "run":
            shapes = SHAPE_SETS[args.shapes]()
            t0 = time.perf_counter()
            for i, row in enumerate(run(args.model, args.tp, args.out, shapes,
                                        args.warmup, args.reps, args.device), 1):
                print(f"[{i}/{len(shapes) * len(args.tp)}] tp {row['tp']} "
                      f"{row['num_prefill_tokens']} prefill / {row['num_decode_seqs']} decode: "
                      f"{row['measured_s'] * 1e3:.2f} ms (spread {row['spread']:.1%}) "
                      f"[{time.perf_counter() - t0:.0f} s]", flush=True)
            return 0
        rows = compare(args.csv, args.engine)
        if not rows:
            print(f"{args.csv}: no row matches a bundled {args.engine} profile "
                  "(gpu, model, tp, dtype)")
            return 1
        for r_ in rows:
            print(f"tp {r_['tp']} {pass_kind(r_):16} p {r_['num_prefill_tokens']:5} d "
                  f"{r_['num_decode_seqs']:4} ctx {r_['decode_context_tokens']:7}: measured "
                  f"{r_['measured_s'] * 1e3:8.2f} ms, predicted {r_['pred_s'] * 1e3:8.2f} ms, "
                  f"ratio {r_['ratio']:.3f}")
        print("predicted / measured by TP and pass kind: median [min, max] (rows)")
        for (tp, kind), ratios in sorted(summarise(rows).items()):
            print(f"  tp {tp} {kind:16} {statistics.median(ratios):.3f} "
                  f"[{min(ratios):.3f}, {max(ratios):.3f}] ({len(ratios)})")
        if args.out:
            import pandas as pd
            pd.DataFrame(rows).to_csv(args.out, index=False)
        return 0
    except ServetwinError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
