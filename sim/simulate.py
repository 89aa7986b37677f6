"""From a validated scenario to records and a summary.

``resolve`` turns the scenario into concrete objects (trace, model and GPU
specs, timing model, vLLM knobs with start-up defaults applied, KV block
count); ``simulate`` runs the cluster and returns a ``SimResult``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from .catalog import GpuSpec, ModelSpec, load_gpu, load_model
from .cluster import Cluster, SimOutcome
from .engines.sglang import SglangConfig, SglangEngine, new_token_ratio_defaults
from .engines.vllm import VllmConfig, VllmEngine
from .errors import ConfigError, InputError, ScenarioError, TraceError
from .kv import dense_hash_ids
from .metrics import Records, build_records, engine_summary, summarize
from .profiles import bundled_profiles, describe, find_profile, read_profile
from .router import make_router
from .scenario import LoadedScenario, SglangEngineSpec, VllmEngineSpec
from .timing import RooflineTiming, TimingModel, TimingProfile
from .workload import ClosedLoop, Trace, load_trace, synthesize

GiB = 1024**3


@dataclass
class Resolved:
    loaded: LoadedScenario
    trace: Trace
    model: ModelSpec
    gpu: GpuSpec
    engine: VllmConfig | SglangConfig
    timing: TimingModel
    closed_loop: ClosedLoop | None
    kv_capacity_note: str
    timing_note: str = "analytic prior (sim/timing.py TimingProfile defaults)"

    def as_dict(self) -> dict[str, Any]:
        e = self.engine
        return {
            "model": self.model.name,
            "gpu": self.gpu.name,
            "num_requests": len(self.trace),
            "trace_source": self.trace.source,
            "engine": {f: getattr(e, f) for f in e.__dataclass_fields__},
            "kv_capacity": self.kv_capacity_note,
            "timing": self.timing_note,
        }


@dataclass
class SimResult:
    resolved: Resolved
    outcome: SimOutcome
    records: Records
    summary: dict[str, Any]


# ----------------------------------------------------------------- defaults
def vllm_batch_defaults(gpu: GpuSpec) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) as `vllm serve` resolves them.

    vllm-project/vllm:vllm/engine/arg_utils.py @ v0.33.0, get_batch_defaults:
    >= 160 GiB: 1024 / 16384; >= 70 GiB and not an A100: 1024 / 8192;
    otherwise 256 / 2048.
    """
    mem = gpu.hbm_capacity_bytes / GiB
    if mem >= 160:
        return 1024, 16384
    if mem >= 70 and "a100" not in gpu.name.lower():
        return 1024, 8192
    return 256, 2048


def activation_reserve_bytes(model: ModelSpec, tp: int, max_num_batched_tokens: int,
                             max_num_seqs: int) -> int:
    """Memory vLLM's start-up profiling run keeps out of the KV cache.

    vLLM measures the peak of a dummy forward pass of ``max_num_batched_tokens``
    tokens plus sampler logits for ``max_num_seqs`` rows, and non-torch memory
    (CUDA graphs, NCCL, allocator). We estimate the same from shapes: the
    largest live activations of one layer (hidden states, QKV and the MLP's
    gate+up output, 2 bytes each, twice for in/out), fp32 logits for the
    sampler, and a fixed 1 GiB for graphs and the runtime. A judgement, not a
    measurement: pin ``num_gpu_blocks_override`` to the engine's logged block
    count when comparing with a real server.
    """
    per_token = 2 * 2 * (model.hidden_size + (model.num_attention_heads + 2 * model.num_kv_heads)
                         * model.head_dim // tp + 2 * max(model.intermediate_size,
                                                          model.moe_intermediate_size) // tp)
    logits = 4 * max_num_seqs * model.vocab_size // tp
    return max_num_batched_tokens * per_token + logits + GiB


def resolve_engine(spec: VllmEngineSpec, model: ModelSpec, gpu: GpuSpec, dtype: str,
                   where: str) -> tuple[VllmConfig, str]:
    tp = spec.tensor_parallel_size
    seqs, tokens = vllm_batch_defaults(gpu)
    max_num_seqs = spec.max_num_seqs or seqs
    max_model_len = spec.max_model_len or model.max_position_embeddings
    max_tokens = spec.max_num_batched_tokens or tokens
    if not spec.enable_chunked_prefill:
        # without chunked prefill a prompt must fit one step: vLLM raises the
        # default to max_model_len (vllm/config/scheduler.py @ v0.33.0)
        if spec.max_num_batched_tokens is None:
            max_tokens = max(max_tokens, max_model_len)
        elif max_tokens < max_model_len:
            raise ScenarioError(where, f"engine.max_num_batched_tokens = {max_tokens} < "
                                f"max_model_len {max_model_len} with chunked prefill off",
                                "raise max_num_batched_tokens, lower max_model_len, or "
                                "enable chunked prefill")
    try:
        model.check_tp(tp)
    except ConfigError as e:
        raise ScenarioError(where, f"engine.tensor_parallel_size = {tp}: {e}",
                            "choose a TP size that divides the model's (KV) head count") from None
    bs = spec.block_size
    kv_per_token = model.kv_bytes_per_token(kv_dtype_for(dtype), tp)
    if spec.num_gpu_blocks_override is not None:
        blocks = spec.num_gpu_blocks_override
        note = f"{blocks} blocks (num_gpu_blocks_override)"
    else:
        weights = model.weight_bytes(dtype, tp)
        reserve = activation_reserve_bytes(model, tp, max_tokens, max_num_seqs)
        avail = gpu.hbm_capacity_bytes * spec.gpu_memory_utilization - weights - reserve
        blocks = int(avail // (kv_per_token * bs)) if avail > 0 else 0
        note = (f"{blocks} blocks = ({gpu.hbm_capacity_bytes / GiB:.1f} GiB x "
                f"{spec.gpu_memory_utilization} - weights {weights / GiB:.2f} GiB - activations "
                f"{reserve / GiB:.2f} GiB) / ({bs} tokens x {kv_per_token / 1024:.1f} KiB)")
        if blocks < 2:
            raise ConfigError(f"{where}: no memory left for the KV cache on {gpu.name} at TP {tp} "
                              f"({note}). Fix: use more GPUs per worker (TP), a larger GPU, "
                              "fp8 weights, or a higher gpu_memory_utilization")
    capacity_tokens = (blocks - 1) * bs
    if capacity_tokens < max_model_len:
        if spec.max_model_len is None:
            # vLLM's start-up check would fail; like `--max-model-len auto` we
            # shrink the limit to what fits and say so in the resolved config
            max_model_len = capacity_tokens
            note += f"; max_model_len lowered to {capacity_tokens} to fit the KV cache"
        else:
            raise ConfigError(f"{where}: engine.max_model_len = {max_model_len} needs "
                              f"{cdiv(max_model_len, bs)} KV blocks but only {blocks - 1} fit "
                              f"({note}). Fix: lower max_model_len or use a larger TP/GPU")
    cfg = VllmConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_tokens,
        num_gpu_blocks=blocks,
        block_size=bs,
        enable_chunked_prefill=spec.enable_chunked_prefill,
        enable_prefix_caching=spec.enable_prefix_caching,
        long_prefill_token_threshold=spec.long_prefill_token_threshold,
        scheduler_reserve_full_isl=spec.scheduler_reserve_full_isl,
        watermark=spec.watermark,
        max_model_len=max_model_len,
    )
    return cfg, note


def sglang_memory_defaults(gpu: GpuSpec, tp: int) -> tuple[int, int]:
    """(chunked_prefill_size, cuda_graph_max_bs) as SGLang picks them by GPU memory.

    Reference §B.6 (sglang/srt/arg_groups/memory_hook.py @ v0.5.23): chunk
    <20 GB 2048, <60 GB 4096, <160 GB 8192, else 16384; graph batch 256 at
    TP < 4 and 512 from TP 4 on 80-160 GB GPUs."""
    mem = gpu.hbm_capacity_bytes / 1e9
    chunk = 2048 if mem < 20 else 4096 if mem < 60 else 8192 if mem < 160 else 16384
    graph_bs = 512 if tp >= 4 and 80 <= mem < 160 else 256
    return chunk, graph_bs


def sglang_mem_fraction_static(gpu: GpuSpec, tp: int, chunk: int, max_prefill_tokens: int,
                               graph_bs: int) -> float:
    """--mem-fraction-static auto: (GPU memory - reserved) / GPU memory, in MiB.

    sgl-project/sglang:python/sglang/srt/server_args.py @ v0.5.x
    (_handle_gpu_memory_settings; sgl-project/sglang#10975): reserved = 512 +
    1.5 x max(chunk, 2048) (max_prefill_tokens when chunking is off) + 2 x graph
    batch + TP x PP / 8 x 1024, at least 10 GiB on GPUs over 60 GiB."""
    gpu_mib = gpu.hbm_capacity_bytes / 2**20
    reserved = 512 + max(chunk if chunk > 0 else max_prefill_tokens, 2048) * 1.5
    reserved += graph_bs * 2 + tp / 8 * 1024
    if gpu_mib > 60 * 1024:
        reserved = max(reserved, 10 * 1024)
    return round((gpu_mib - reserved) / gpu_mib, 3)


def resolve_sglang_engine(spec: SglangEngineSpec, model: ModelSpec, gpu: GpuSpec, dtype: str,
                          where: str) -> tuple[SglangConfig, str]:
    tp = spec.tensor_parallel_size
    try:
        model.check_tp(tp)
    except ConfigError as e:
        raise ScenarioError(where, f"engine.tensor_parallel_size = {tp}: {e}",
                            "choose a TP size that divides the model's (KV) head count") from None
    chunk_default, graph_bs = sglang_memory_defaults(gpu, tp)
    chunk = spec.chunked_prefill_size if spec.chunked_prefill_size is not None else chunk_default
    max_model_len = spec.max_model_len or model.max_position_embeddings
    kv_per_token = model.kv_bytes_per_token(kv_dtype_for(dtype), tp)
    if spec.max_total_tokens is not None:
        tokens = spec.max_total_tokens
        note = f"{tokens} tokens (max_total_tokens)"
    else:
        frac = spec.mem_fraction_static or sglang_mem_fraction_static(
            gpu, tp, chunk, spec.max_prefill_tokens, graph_bs)
        weights = model.weight_bytes(dtype, tp)
        avail = gpu.hbm_capacity_bytes * frac - weights
        tokens = int(avail // kv_per_token) if avail > 0 else 0
        tokens -= tokens % spec.page_size
        note = (f"{tokens} tokens = ({gpu.hbm_capacity_bytes / GiB:.1f} GiB x mem_fraction_static "
                f"{frac} - weights {weights / GiB:.2f} GiB) / {kv_per_token / 1024:.1f} KiB")
        if tokens < 2:
            raise ConfigError(f"{where}: no memory left for the KV cache on {gpu.name} at TP {tp} "
                              f"({note}). Fix: use more GPUs per worker (TP), a larger GPU, "
                              "fp8 weights, or a higher mem_fraction_static")
    if tokens < max_model_len:
        if spec.max_model_len is None:
            max_model_len = tokens
            note += f"; max_model_len lowered to {tokens} to fit the KV cache"
        else:
            raise ConfigError(f"{where}: engine.max_model_len = {max_model_len} needs that many "
                              f"KV tokens but only {tokens} fit ({note}). Fix: lower "
                              "max_model_len or use a larger TP/GPU")
    running = spec.max_running_requests
    if running is None:
        # reference §B.6 (mem_cache/kv_cache_configurator.py @ v0.5.23)
        running = int(min(min(max(tokens / max_model_len * 512, 2048), 4096), tokens // 2))
        running = max(running, 1)
    init, low, decay = new_token_ratio_defaults(spec.schedule_conservativeness)
    cfg = SglangConfig(
        max_running_requests=running,
        max_total_tokens=tokens,
        chunked_prefill_size=chunk,
        max_prefill_tokens=spec.max_prefill_tokens,
        schedule_policy=spec.schedule_policy,
        enable_mixed_chunk=spec.enable_mixed_chunk,
        schedule_conservativeness=spec.schedule_conservativeness,
        init_new_token_ratio=init,
        new_token_ratio_decay=decay,
        min_new_token_ratio=low,
        enable_prefix_caching=not spec.disable_radix_cache,
        radix_eviction_policy=spec.radix_eviction_policy,
        page_size=spec.page_size,
        max_model_len=max_model_len,
        ignore_eos=spec.ignore_eos,
    )
    return cfg, note


def kv_dtype_for(dtype: str) -> str:
    """vLLM's kv_cache_dtype "auto": the model's activation dtype; FP8 checkpoints
    keep a 16-bit KV cache unless --kv-cache-dtype says otherwise."""
    return "bf16" if dtype == "fp8" else dtype


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def load_workload(loaded: LoadedScenario) -> Trace:
    w = loaded.scenario.workload
    if w.trace is not None:
        path = loaded.resolve_path(w.trace)
        if not path.is_file():
            what = "not a file" if path.exists() else "file not found"
            raise ScenarioError(loaded.where("workload", "trace"),
                                f"workload.trace = {w.trace!r}: {what} ({path})",
                                "give a path relative to the scenario file or an absolute one")
        trace = load_trace(path, w.format)
    else:
        assert w.synthetic is not None
        rng = np.random.default_rng(np.random.SeedSequence(loaded.scenario.seed).spawn(1)[0])
        try:
            trace = synthesize(w.synthetic, rng)
        except TraceError as e:
            raise ScenarioError(loaded.where("workload", "synthetic"), e.message, e.fix) from None
    # the trace operations check their arguments; name the scenario field they came from
    field = next((f for f in ("start_s", "end_s", "max_requests") if getattr(w, f) is not None),
                 "")
    try:
        if field:
            trace = trace.sliced(start_s=w.start_s, end_s=w.end_s, max_requests=w.max_requests)
        field = "time_scale"
        if w.time_scale != 1.0:
            trace = trace.scaled(w.time_scale)
        field = "output_scale"
        if w.output_scale != 1.0:
            trace = trace.with_output_scale(w.output_scale)
        field = "input_scale"
        if w.input_scale != 1.0:
            trace = trace.with_input_scale(w.input_scale)
    except TraceError as e:
        raise ScenarioError(loaded.where("workload", field),
                            f"workload.{field} = {getattr(w, field)}: {e.message}",
                            e.fix) from None
    if w.copies > 1:
        one = trace
        for _ in range(w.copies - 1):
            trace = trace.merged(one)
    if len(trace) == 0:
        raise ScenarioError(loaded.where("workload"), "the workload selects no request",
                            "widen workload.start_s/end_s or max_requests")
    return trace


def resolve_profile(loaded: LoadedScenario) -> tuple[TimingProfile, str]:
    """The timing coefficients a run uses, and one line saying where they came from."""
    t = loaded.scenario.timing
    base = TimingProfile()
    note = "analytic prior (sim/timing.py TimingProfile defaults)"
    if t.profile_name is not None:
        path = find_profile(t.profile_name, loaded.base_dir)
        if path is None:
            names = ", ".join(bundled_profiles()) or "none"
            raise ScenarioError(loaded.where("timing", "profile_name"),
                                f"timing.profile_name = {t.profile_name!r}: no bundled profile "
                                "and no such file",
                                f"use a bundled name ({names}) or a profile YAML's path")
        try:
            base, meta = read_profile(path)
        except InputError as e:
            raise ScenarioError(loaded.where("timing", "profile_name"),
                                f"timing.profile_name = {t.profile_name!r}: {e}",
                                "give a profile written by `servetwin calibrate`") from None
        note = describe(t.profile_name, meta)
    try:
        profile = TimingProfile.from_dict({**base.to_dict(), **t.profile})
    except InputError as e:
        raise ScenarioError(loaded.where("timing", "profile"),
                            f"timing.profile: {e.message}", e.fix) from None
    if t.profile:
        note += f"; overridden: {', '.join(f'{k} = {v:g}' for k, v in t.profile.items())}"
    return profile, note


def resolve(loaded: LoadedScenario) -> Resolved:
    sc = loaded.scenario
    model = load_model(sc.model)
    gpu = load_gpu(sc.gpu)
    engine: VllmConfig | SglangConfig
    if isinstance(sc.engine, SglangEngineSpec):
        engine, note = resolve_sglang_engine(sc.engine, model, gpu, sc.dtype,
                                             loaded.where("engine"))
    else:
        engine, note = resolve_engine(sc.engine, model, gpu, sc.dtype, loaded.where("engine"))
    profile, timing_note = resolve_profile(loaded)
    timing = RooflineTiming(model, gpu, sc.engine.tensor_parallel_size, sc.dtype, profile,
                            kv_dtype=kv_dtype_for(sc.dtype))
    trace = load_workload(loaded)
    cl = sc.workload.closed_loop
    closed = ClosedLoop(cl.concurrency, cl.num_requests) if cl is not None else None
    return Resolved(loaded, trace, model, gpu, engine, timing, closed, note, timing_note)


def simulate(resolved: Resolved, fast_forward: bool | None = None,
             progress: Callable[[int, int], None] | None = None) -> SimResult:
    sc = resolved.loaded.scenario
    ff = sc.simulation.fast_forward if fast_forward is None else fast_forward
    trace = resolved.trace
    dense, num_ids = dense_hash_ids(trace.hash_ids)
    cfg = resolved.engine
    engines: list[VllmEngine] | list[SglangEngine]
    if isinstance(cfg, SglangConfig):
        engines = [SglangEngine(cfg, resolved.timing, trace.hash_block_tokens, num_ids)
                   for _ in range(sc.cluster.num_workers)]
    else:
        engines = [VllmEngine(cfg, resolved.timing, trace.hash_block_tokens, num_ids,
                              fast_forward=ff) for _ in range(sc.cluster.num_workers)]
    rng = np.random.default_rng(np.random.SeedSequence(sc.seed).spawn(2)[1])
    try:
        router = make_router(sc.cluster.router.kind, sc.cluster.router.params(),
                             sc.cluster.num_workers, rng)
    except TypeError as e:
        raise ScenarioError(resolved.loaded.where("cluster", "router"),
                            f"cluster.router: {e}", "check the router's parameters") from None
    # the cluster is typed for vLLM engines; an SglangEngine has the same interface
    outcome = Cluster(cast(list[VllmEngine], engines), router, trace, dense,
                      resolved.closed_loop, progress).run()
    records = build_records(outcome)
    summary = summarize(records)
    summary["engine"] = engine_summary(outcome, summary["duration_s"])
    if isinstance(cfg, SglangConfig):
        # SGLang-only counters (retractions, lpm -> fcfs fallbacks): never silent
        per = [e.summary() for e in engines if isinstance(e, SglangEngine)]
        summary["engine"]["sglang"] = {
            "num_retractions": sum(p["num_retractions"] for p in per),
            "num_lpm_fallbacks": sum(p["num_lpm_fallbacks"] for p in per),
            "schedule_policy": per[0]["schedule_policy"],
            "schedule_policy_effective": per[0]["schedule_policy_effective"],
        }
    return SimResult(resolved, outcome, records, summary)
