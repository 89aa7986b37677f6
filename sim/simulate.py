"""From a validated scenario to records and a summary.

``resolve`` turns the scenario into concrete objects (trace, model and GPU
specs, timing model, vLLM knobs with start-up defaults applied, KV block
count); ``simulate`` runs the cluster and returns a ``SimResult``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np

from .autoscale import Autoscaler
from .catalog import GpuSpec, ModelSpec, load_gpu, load_model
from .cluster import Cluster, SimOutcome
from .disagg import DisaggCluster, LinkSpec
from .engines.sglang import SglangConfig, SglangEngine, new_token_ratio_defaults
from .engines.vllm import VllmConfig, VllmEngine
from .errors import ConfigError, InputError, ScenarioError, TraceError
from .kv import dense_hash_ids
from .metrics import Records, build_records, engine_summary, summarize
from .offload import OffloadTiers, TierSpec
from .planner import Planner, PlannerLimits, TimingCapacity, make_policy, make_startup_delay
from .profiles import bundled_profiles, describe, find_profile, read_profile
from .router import make_router
from .scenario import LoadedScenario, SglangEngineSpec, VllmEngineSpec, one_line
from .timeline import Timeline
from .timing import RooflineTiming, TimingModel, TimingProfile
from .timing_profile import check_efficiencies
from .uncertainty import ScaledTiming, band, interval_factors
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
    # disaggregated prefill/decode: per pool, its engine knobs, timing and KV note
    pools: dict[str, tuple[VllmConfig, TimingModel, str]] | None = None
    # the timing profile's fit section (intervals), when it came from a profile file
    timing_fit: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        e = self.engine
        out = {
            "model": self.model.name,
            "gpu": self.gpu.name,
            "num_requests": len(self.trace),
            "trace_source": self.trace.source,
            "engine": {f: getattr(e, f) for f in e.__dataclass_fields__},
            "kv_capacity": self.kv_capacity_note,
            "timing": self.timing_note,
        }
        if self.pools:
            out["pools"] = {name: {"engine": {f: getattr(c, f) for f in c.__dataclass_fields__},
                                   "kv_capacity": note}
                            for name, (c, _, note) in self.pools.items()}
        return out


@dataclass
class SimResult:
    resolved: Resolved
    outcome: SimOutcome
    records: Records
    summary: dict[str, Any]
    # what only the cluster knows, for the timeline: KV handoffs, the fleet
    handoffs: list[Any] | None = None
    autoscaler: Any = None


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
    try:
        check_efficiencies(profile, gpu.efficiency_ceiling, gpu.name)
    except InputError as e:
        raise ScenarioError(loaded.where("timing"), f"{timing_note}: {e.message}",
                            e.fix) from None
    timing = RooflineTiming(model, gpu, sc.engine.tensor_parallel_size, sc.dtype, profile,
                            kv_dtype=kv_dtype_for(sc.dtype))
    trace = load_workload(loaded)
    cl = sc.workload.closed_loop
    closed = ClosedLoop(cl.concurrency, cl.num_requests) if cl is not None else None
    pools: dict[str, tuple[VllmConfig, TimingModel, str]] | None = None
    if sc.disaggregation is not None:
        pools = {}
        for name in ("prefill", "decode"):
            spec = VllmEngineSpec.model_validate({**sc.engine.model_dump(),
                                                  **getattr(sc.disaggregation, name).engine})
            cfg, pnote = resolve_engine(spec, model, gpu, sc.dtype,
                                        loaded.where("disaggregation", name, "engine"))
            ptiming = RooflineTiming(model, gpu, spec.tensor_parallel_size, sc.dtype, profile,
                                     kv_dtype=kv_dtype_for(sc.dtype))
            pools[name] = (cfg, ptiming, pnote)
    fit = None
    if sc.timing.profile_name is not None:
        path = find_profile(sc.timing.profile_name, loaded.base_dir)
        fit = dict(read_profile(path)[1]["fit"]) if path is not None else None
    if sc.simulation.intervals and not (fit and fit.get("intervals")):
        raise ScenarioError(loaded.where("simulation", "intervals"),
                            "simulation.intervals needs a timing profile with fit intervals; "
                            + ("this one has none" if fit is not None
                               else "the analytic prior has none"),
                            "set timing.profile_name to a profile written by `servetwin "
                            "calibrate` (bundled ones have them), or turn intervals off")
    return Resolved(loaded, trace, model, gpu, engine, timing, closed, note, timing_note, pools,
                    fit)


def simulate(resolved: Resolved, fast_forward: bool | None = None,
             progress: Callable[[int, int], None] | None = None) -> SimResult:
    sc = resolved.loaded.scenario
    ff = sc.simulation.fast_forward if fast_forward is None else fast_forward
    result = _simulate(resolved, ff, progress)
    if sc.simulation.intervals:
        assert resolved.timing_fit is not None  # resolve checked it
        where = resolved.loaded.where("timing", "profile_name")
        fast, slow = interval_factors(resolved.timing_fit, where)
        ends = [_simulate(_scaled(resolved, f), ff, None).summary for f in (fast, slow)]
        result.summary["uncertainty"] = band(result.summary, ends[0], ends[1], (fast, slow),
                                             str(sc.timing.profile_name))
    return result


def _scaled(resolved: Resolved, factors: dict[str, float]) -> Resolved:
    """The same run with every pass's time scaled by its regime's factor."""
    pools: dict[str, tuple[VllmConfig, TimingModel, str]] | None = None
    if resolved.pools is not None:
        pools = {n: (c, ScaledTiming(t, factors), note)
                 for n, (c, t, note) in resolved.pools.items()}
    return replace(resolved, timing=ScaledTiming(resolved.timing, factors), pools=pools)


def _simulate(resolved: Resolved, ff: bool,
              progress: Callable[[int, int], None] | None) -> SimResult:
    sc = resolved.loaded.scenario
    trace = resolved.trace
    dense, num_ids = dense_hash_ids(trace.hash_ids)
    cfg = resolved.engine
    rng = np.random.default_rng(np.random.SeedSequence(sc.seed).spawn(2)[1])
    if resolved.pools is not None:
        return _simulate_disaggregated(resolved, ff, dense, num_ids, rng, progress)
    tiers = _offload_tiers(resolved)

    def new_engine() -> VllmEngine | SglangEngine:
        if isinstance(cfg, SglangConfig):
            return SglangEngine(cfg, resolved.timing, trace.hash_block_tokens, num_ids,
                                fast_forward=ff)
        e = VllmEngine(cfg, resolved.timing, trace.hash_block_tokens, num_ids, fast_forward=ff)
        if tiers is not None:
            e.pool.lower = OffloadTiers(*tiers, num_keys=e.pool.num_keys)
        return e

    engines = [new_engine() for _ in range(sc.cluster.num_workers)]
    router = _router(resolved, ("cluster", "router"), sc.cluster.router.kind,
                     sc.cluster.router.params(), sc.cluster.num_workers, rng)
    scaler = _autoscaler(resolved, new_engine, rng)
    # the cluster is typed for vLLM engines; an SglangEngine has the same interface
    outcome = Cluster(cast(list[VllmEngine], engines), router, trace, dense,
                      resolved.closed_loop, progress, autoscaler=scaler).run()
    records = build_records(outcome)
    summary = summarize(records)
    summary["engine"] = engine_summary(outcome, summary["duration_s"])
    if tiers is not None and isinstance(cfg, VllmConfig):
        summary["offload"] = _offload_summary(outcome.engines, cfg.block_size)
    if scaler is not None:
        summary["planner"] = scaler.summary(_end_time(records))
    if isinstance(cfg, SglangConfig):
        # SGLang-only counters (retractions, lpm -> fcfs fallbacks): never silent
        per = [e.summary() for e in engines if isinstance(e, SglangEngine)]
        summary["engine"]["sglang"] = {
            "num_retractions": sum(p["num_retractions"] for p in per),
            "num_lpm_fallbacks": sum(p["num_lpm_fallbacks"] for p in per),
            "schedule_policy": per[0]["schedule_policy"],
            "schedule_policy_effective": per[0]["schedule_policy_effective"],
        }
    return SimResult(resolved, outcome, records, summary, autoscaler=scaler)


def build_timeline(result: SimResult) -> Timeline:
    """The run as Chrome/Perfetto trace events: steps, arrivals, preemptions, KV
    handoffs, offload loads (as step args), worker lifecycle and planner decisions."""
    sim = result.resolved.loaded.scenario.simulation
    tl = Timeline.from_outcome(result.outcome, sim.timeline_max_steps_per_worker)
    for wid, e in enumerate(result.outcome.engines):
        for t, rid in getattr(e, "preemption_log", ()):
            tl.add_preemption(wid, t, rid)
    for h in result.handoffs or ():
        tl.add_handoff(h.prefill_worker, h.decode_worker, h.start_s, h.end_s, h.request_id,
                       link=h.link, bytes=h.nbytes)
    scaler = result.autoscaler
    if scaler is not None:
        end = _end_time(result.records)
        tl.add_fleet(scaler.fleet, end)
        for d in scaler.planner.decisions:
            tl.add_decision(d)
    return tl


# ------------------------------------------------------------------ topology
def _router(resolved: Resolved, loc: tuple[str, ...], kind: str, params: dict[str, Any],
            num_workers: int, rng: np.random.Generator) -> Any:
    try:
        return make_router(kind, params, num_workers, rng)
    except TypeError as e:
        raise ScenarioError(resolved.loaded.where(*loc), f"{'.'.join(loc)}: {e}",
                            "check the router's parameters") from None


def _offload_tiers(resolved: Resolved) -> tuple[list[TierSpec], float] | None:
    off = resolved.loaded.scenario.cluster.offload
    cfg = resolved.engine
    if off is None or not isinstance(cfg, VllmConfig):
        return None
    sc = resolved.loaded.scenario
    block_bytes = (resolved.model.kv_bytes_per_token(kv_dtype_for(sc.dtype),
                                                     sc.engine.tensor_parallel_size)
                   * cfg.block_size)
    tiers = []
    for name in ("host", "disk"):
        t = getattr(off, name)
        if t is not None:
            # per GPU of the worker: a TP shard's blocks move over its own link
            tiers.append(TierSpec(name, max(int(t.capacity_gib * GiB // block_bytes), 1),
                                  t.bandwidth_gb_s * 1e9))
    return tiers, block_bytes


def _offload_summary(engines: list[Any], block_size: int) -> dict[str, Any]:
    per_tier: dict[str, dict[str, float]] = {}
    query = sum(e.num_prefix_query_tokens for e in engines)
    gpu_hits = sum(e.num_prefix_hit_tokens - e.num_offload_hit_tokens for e in engines)
    load_s = 0.0
    for e in engines:
        lower = e.pool.lower
        if lower is None:
            continue
        load_s += lower.load_s
        for t in lower.summary(block_size):
            agg = per_tier.setdefault(str(t["tier"]), {"hit_tokens": 0, "blocks_stored": 0})
            agg["hit_tokens"] += int(t["hit_tokens"])
            agg["blocks_stored"] += int(t["blocks_stored"])
    out: dict[str, Any] = {"gpu_hit_rate": gpu_hits / query if query else 0.0,
                           "load_s_total": load_s, "tiers": {}}
    for name, agg in per_tier.items():
        out["tiers"][name] = {**agg, "hit_rate": agg["hit_tokens"] / query if query else 0.0}
    return out


def _autoscaler(resolved: Resolved, new_engine: Callable[[], Any],
                rng: np.random.Generator) -> Autoscaler | None:
    sc = resolved.loaded.scenario
    p = sc.cluster.planner
    if p is None:
        return None
    where = resolved.loaded.where("cluster", "planner")
    cfg = resolved.engine
    seqs = cfg.max_num_seqs if isinstance(cfg, VllmConfig) else cfg.max_running_requests
    try:
        policy = make_policy(p.policy, TimingCapacity(resolved.timing, seqs),
                             "cluster.planner.policy")
        startup = make_startup_delay(p.startup, "cluster.planner.startup")
        tp = sc.engine.tensor_parallel_size
        limits = PlannerLimits(p.min_workers, p.max_workers, tp, p.max_gpus)
        planner = Planner(policy, limits, p.interval_s, p.scale_up_cooldown_s,
                          p.scale_down_cooldown_s)
    except (ScenarioError, InputError) as e:
        raise ScenarioError(where, one_line(e.message), one_line(e.fix)) from None
    return Autoscaler(planner, startup, new_engine, np.random.default_rng(
        np.random.SeedSequence(sc.seed).spawn(3)[2]), gpus_per_worker=tp)


def _end_time(records: Records) -> float:
    fin = records.columns["finish_s"]
    ok = np.isfinite(fin)
    return float(fin[ok].max()) if ok.any() else 0.0


def _simulate_disaggregated(resolved: Resolved, ff: bool, dense: np.ndarray, num_ids: int,
                            rng: np.random.Generator,
                            progress: Callable[[int, int], None] | None) -> SimResult:
    sc = resolved.loaded.scenario
    d = sc.disaggregation
    assert d is not None and resolved.pools is not None
    trace = resolved.trace
    engines: dict[str, list[VllmEngine]] = {}
    routers = {}
    for name in ("prefill", "decode"):
        cfg, timing, _ = resolved.pools[name]
        pool = getattr(d, name)
        engines[name] = [VllmEngine(cfg, timing, trace.hash_block_tokens, num_ids,
                                    fast_forward=ff) for _ in range(pool.num_workers)]
        routers[name] = _router(resolved, ("disaggregation", name, "router"), pool.router.kind,
                                pool.router.params(), pool.num_workers, rng)
    link = LinkSpec(d.link.bandwidth_gb_s * 1e9, d.link.latency_us * 1e-6, d.link.topology)
    kv_per_token = resolved.model.kv_bytes_per_token(kv_dtype_for(sc.dtype), 1)
    cluster = DisaggCluster(engines["prefill"], engines["decode"], routers["prefill"],
                            routers["decode"], trace, dense, link, kv_per_token,
                            resolved.closed_loop, progress)
    outcome = cluster.run()
    records = build_records(outcome)
    summary = summarize(records)
    summary["engine"] = engine_summary(outcome, summary["duration_s"])
    t0 = float(trace.arrival_s[0]) if len(trace) else 0.0
    summary["disaggregation"] = {
        "num_prefill_workers": d.prefill.num_workers,
        "num_decode_workers": d.decode.num_workers,
        "num_gpus": (d.prefill.num_workers * _tp(sc, d.prefill.engine)
                     + d.decode.num_workers * _tp(sc, d.decode.engine)),
        "kv_bytes_per_token": kv_per_token,
        "num_handoffs": len(cluster.handoffs),
        "handoff_bytes": float(sum(h.nbytes for h in cluster.handoffs)),
        "handoff_s_mean": (float(np.mean([h.end_s - h.start_s for h in cluster.handoffs]))
                           if cluster.handoffs else 0.0),
        "links": cluster.link_summary(t0, _end_time(records)),
    }
    return SimResult(resolved, outcome, records, summary, handoffs=cluster.handoffs)


def _tp(sc: Any, override: dict[str, Any]) -> int:
    return int(override.get("tensor_parallel_size", sc.engine.tensor_parallel_size))
