"""The timing model's coefficients (TimingProfile), checked as they are built.

Apart from sim/timing.py so that the timing model can be compiled (sim/_native.py) while
this dataclass stays interpreted: a compiled dataclass type-checks its fields itself and
would raise TypeError where a profile must name the bad coefficient (CatalogError).
sim.timing re-exports everything here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import CatalogError

_EFFICIENCIES = (
    "gemm_compute_eff",
    "gemm_mem_eff",
    "attn_prefill_eff",
    "attn_decode_eff",
    "comm_eff",
)
_SECONDS = (
    "step_overhead_s",
    "per_seq_overhead_s",
    "per_context_token_s",
    "allreduce_latency_s",
    "frontend_s",
    "finish_s",
)
# an efficiency is a fraction of the device's peak, so at most 1, except on a device whose
# catalog rates are nominal (GpuSpec.efficiency_ceiling, at most this); the timing model
# checks a profile against its device's own ceiling (check_efficiencies)
MAX_EFFICIENCY = 16.0


@dataclass(frozen=True)
class TimingProfile:
    """Coefficients of the roofline. Defaults are priors for vLLM/SGLang on Hopper; the
    efficiencies come from AIConfigurator's H100-SXM tables (aiconfigurator-core 0.12.0, vLLM
    0.24.0; shared data/timing/aiconfigurator/h100_sxm) unless marked as a judgement."""

    # bf16 GEMMs with n, k >= 4096 and m >= 2048 tokens reach 0.74–0.86 (10–90 %, median 0.81)
    # of 989 TFLOP/s. fp8 GEMMs reach only ~0.5 of the fp8 peak there; calibrate per dtype.
    gemm_compute_eff: float = 0.8
    # AIC's mem_bw_empirical_scaling_factor 0.8; the m = 1 bf16 GEMMs read weights at
    # 0.73–0.90 (median 0.84) of 3.35 TB/s.
    gemm_mem_eff: float = 0.8
    # FA3 bf16 causal prefill, prompts >= 4k, >= 32 heads: 0.53–0.63 (median 0.59) of peak;
    # shorter prompts fall lower but then attention is a small part of the step.
    attn_prefill_eff: float = 0.55
    # FA3 decode reads the KV cache at ~0.9 of HBM bandwidth for >= 1 GB per call, 0.76
    # (median) for >= 100 MB, less for small batches; 0.75 favours serving-sized batches.
    attn_decode_eff: float = 0.75
    # Fit (log error) of λ + 2(n−1)/n·bytes/(450 GB/s·η) to vLLM's custom all-reduce under CUDA
    # graphs, 2–8 GPUs, 2 KB–32 MB (message_size read as bf16 elements): η 0.56, λ 5.0 µs.
    comm_eff: float = 0.6
    allreduce_latency_s: float = 5e-6
    # Judgement. vLLM V0 measured 0.8 ms + ~40 µs/seq of CPU work per step (Vidur
    # a100_cpu_overheads: schedule + prepare_inputs + sampler + process_outputs, Llama-2-7B,
    # batch 8–128); V1's persistent batch and overlapped scheduling cut most of that.
    step_overhead_s: float = 5e-4
    per_seq_overhead_s: float = 1e-5
    # Host time per decode-context token per step, beside the kernels' (attention reads the
    # KV cache at attn_decode_eff): work between the steps that grows with the sequences'
    # lengths. Measured by calibrate.profiling on an engine whose step log leaves it out
    # (calibrate.profiling.host_gap_model); 0 where unmeasured (the op-table profiles).
    per_context_token_s: float = 0.0
    # The API server's time per request before the engine sees it, requests taken in one
    # at a time (sim/cluster.py Worker.submit): a burst reaches an idle engine staggered, so
    # its first request runs a step alone. Measured by calibrate.profiling (bursts sent
    # together); 0 where unmeasured (the op-table profiles time kernels only).
    frontend_s: float = 0.0
    # Host time per finished request that the engine's next step pays (sim/engines:
    # charged to the step after the one that produced the request's last token, less any
    # idle time between them): the API server's work to end a response, on a host where
    # it shares a core with the model. Measured by calibrate (finish_cost: the excess of
    # the steps after a finish over the fitted model); 0 where unmeasured (the op-table
    # profiles time kernels only).
    finish_s: float = 0.0

    def __post_init__(self) -> None:
        _check_profile(asdict(self), "TimingProfile")

    def to_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "timing profile") -> TimingProfile:
        """From a mapping (e.g. a YAML profile); missing keys keep their priors."""
        if not isinstance(data, Mapping):
            raise CatalogError(
                where,
                "a timing profile must be a mapping of coefficients",
                f"give any of {', '.join(_EFFICIENCIES + _SECONDS)}",
            )
        unknown = sorted(set(map(str, data)) - set(_EFFICIENCIES) - set(_SECONDS))
        if unknown:
            raise CatalogError(
                where,
                f"unknown coefficient(s) {', '.join(unknown)}",
                f"valid ones: {', '.join(_EFFICIENCIES + _SECONDS)}",
            )
        _check_profile(data, where)
        return cls(**{k: float(v) for k, v in data.items()})


def _check_profile(values: Mapping[str, Any], where: str) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CatalogError(where, f"{name} = {value!r}: must be a number", "give a number")
        if name in _EFFICIENCIES and not 0 < value <= MAX_EFFICIENCY:
            raise CatalogError(
                where,
                f"{name} = {value!r}: must be in (0, 1] (up to {MAX_EFFICIENCY:g} on a "
                "device whose catalog entry sets efficiency_ceiling)",
                "an efficiency is a fraction of the peak",
            )
        if name in _SECONDS and not (math.isfinite(value) and value >= 0):
            raise CatalogError(
                where,
                f"{name} = {value!r}: must be >= 0 seconds",
                "give a finite non-negative time",
            )


def check_efficiencies(profile: TimingProfile, ceiling: float, device: str,
                       where: str = "timing profile") -> None:
    """Each efficiency of ``profile`` within the device's ceiling (GpuSpec.efficiency_ceiling:
    1, or more where the device's catalog rates are nominal)."""
    for name in _EFFICIENCIES:
        value = getattr(profile, name)
        if value > ceiling:
            span = "(0, 1]" if ceiling == 1 else f"(0, {ceiling:g}]"
            raise CatalogError(
                where,
                f"{name} = {value!r}: must be in {span} on {device}",
                "an efficiency is a fraction of the device's peak; a profile fitted on "
                "another device does not carry over",
            )
