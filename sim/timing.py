"""Timing model: seconds for one forward pass of one engine instance (one TP group).

A batch is described by aggregates only (DESIGN §3), which keeps a call cheap and lets an
engine fast-forward a run of decode steps:

    P  = num_prefill_tokens      Σ new tokens of the prefill chunks in the step
    A  = prefill_attn_work       Σ over chunks of n·(c + (n+1)/2): causal (query, key) pairs
                                 of a chunk of n new tokens after c cached ones
    NP = num_prefill_seqs        number of prefill chunks
    D  = num_decode_seqs         sequences decoding one token each
    C  = decode_context_tokens   Σ over decoding sequences of their context incl. the new token

The analytic roofline prior (RooflineTiming). T = P + D rows go through the linear layers;
logits are computed for R = D + NP rows. Every weight matrix is taken as one GPU holds it
under TP (sim.catalog), W = its bytes, F = 2·in·out FLOPs per row, L = its layer count:

  step_time = Σ_linear  L · max(T·F / (peak_w·ηc),  W / (BW·ηm))                  GEMMs
            + max(R·F_lm / (peak·ηc),  W_lm / (BW·ηm))                            lm_head
            + Σ_expert L · max(T·k·F / (peak_w·ηc),  E_hit(T)·W / (BW·ηm))        routed experts
            + L_attn · A · F_pair / (peak·ηpf)                                    prefill attention
            + 2·L · [2(tp−1)/tp · T·hidden·2 / (link·ηcomm) + λ]   (tp > 1)        TP all-reduce
            + τ_step + τ_seq · (D + NP)                                           overheads
            + L_attn · C · max(KV / (BW·ηd),  F_pair / (peak·ηpf))                decode attention

  E_hit(T) = E·(1 − (1 − k/E)^T): expected distinct experts that T tokens, each routed to k
  of E experts uniformly, touch; every touched expert's weights are read once.
  peak_w is the fp8 peak for fp8 weights, else bf16; attention runs in bf16 (peak) always.
  KV = KV-cache bytes per token per layer on one GPU (kv heads replicated when tp > kv heads;
  MLA: the latent, replicated). F_pair = QKᵀ + PV FLOPs per (query, key) pair, heads / tp.
  link = NVLink, or PCIe on GPUs without it (L40S).
  Sliding-window layers (gpt-oss) count at most the window: min(A, P·window) prefill pairs and
  min(C, D·window) decode keys, exact when every sequence is past the window.

Left out on purpose (absorbed by the efficiencies and overheads, or fitted by calibrate/):
activation bytes of the GEMMs, elementwise kernels (norms, rope, activation), the prefill KV
read of cached context, sampling, pipeline parallelism. An empty batch still pays the weight
read; engines do not run one.

Fast-forward exactness: step_time = fixed(P, A, NP, D) + decode_attention(D, C). The fixed part
is C-independent (it holds the only pow); decode_attention uses + × and min only, so the
vectorised decode_run_times computes bitwise the same floats as repeated step_time calls.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .catalog import ACTIVATION_BYTES, GpuSpec, LinearShape, ModelSpec, dtype_bytes
from .timing_profile import (
    _EFFICIENCIES,
    _SECONDS,
    TimingProfile,
    _check_profile,
    check_efficiencies,
)

_PRIOR = TimingProfile()  # the analytic prior's coefficients (frozen: one shared instance)

__all__ = ["_EFFICIENCIES", "_SECONDS", "RooflineTiming", "TimingModel", "TimingProfile",
           "_check_profile", "prefill_attn_work"]


class TimingModel(Protocol):
    def step_time(
        self,
        num_prefill_tokens: int,
        prefill_attn_work: float,
        num_prefill_seqs: int,
        num_decode_seqs: int,
        decode_context_tokens: int,
    ) -> float: ...

    def decode_run_times(
        self, num_decode_seqs: int, decode_context_tokens0: int, num_steps: int
    ) -> np.ndarray: ...


def prefill_attn_work(num_new_tokens: int, num_cached_tokens: int) -> float:
    """Causal (query, key) pairs of one chunk: token i (1..n) sees c + i keys."""
    return num_new_tokens * (num_cached_tokens + (num_new_tokens + 1) / 2)


class RooflineTiming:
    """The roofline prior for one model on one GPU type at one TP degree."""

    __slots__ = (
        "_comm_latency_s",
        "_comm_s_per_token",
        "_decode_full_s_per_token",
        "_decode_sliding_s_per_token",
        "_expert_gemms",
        "_expert_miss",
        "_gemms",
        "_k",
        "_lm_byte_s",
        "_lm_flop_s",
        "_num_experts",
        "_per_seq_overhead_s",
        "_prefill_full_s_per_pair",
        "_prefill_sliding_s_per_pair",
        "_step_overhead_s",
        "_window",
        "dtype",
        "finish_s",
        "gpu",
        "kv_bytes_per_token_per_gpu",
        "kv_dtype",
        "model",
        "profile",
        "tp",
        "weight_bytes_per_gpu",
    )

    def __init__(
        self,
        model: ModelSpec,
        gpu: GpuSpec,
        tp: int,
        dtype: str = "bf16",
        profile: TimingProfile = _PRIOR,
        kv_dtype: str = "bf16",
    ) -> None:
        model.check_tp(tp)
        check_efficiencies(profile, gpu.efficiency_ceiling, gpu.name)
        self.model, self.gpu, self.tp, self.profile = model, gpu, tp, profile
        self.dtype, self.kv_dtype = dtype, kv_dtype
        self.weight_bytes_per_gpu = model.weight_bytes(dtype, tp)
        self.kv_bytes_per_token_per_gpu = model.kv_bytes_per_token(kv_dtype, tp)
        self._precompute_gemms()
        self._precompute_attention()
        self._precompute_comm()
        self._step_overhead_s = profile.step_overhead_s
        self._per_seq_overhead_s = profile.per_seq_overhead_s
        # host time per finished request, paid by the engine's next step (sim/engines)
        self.finish_s = profile.finish_s

    # -- constants, once per instance ------------------------------------------------------

    def _roofline_terms(self, s: LinearShape) -> tuple[float, float]:
        """(seconds of compute per row, seconds to read the weights), × its layer count."""
        p, gpu = self.profile, self.gpu
        quantized = s.quantizable and self.dtype == "fp8"
        peak = gpu.fp8_flops_per_s if quantized else gpu.bf16_flops_per_s
        wbytes = dtype_bytes(self.dtype) if s.quantizable else ACTIVATION_BYTES
        flop_s = s.count * 2 * s.numel / (peak * p.gemm_compute_eff)
        byte_s = s.count * s.numel * wbytes / (gpu.hbm_bytes_per_s * p.gemm_mem_eff)
        return flop_s, byte_s

    def _precompute_gemms(self) -> None:
        shapes = self.model.linear_shapes(self.tp)
        self._gemms = tuple(self._roofline_terms(s) for s in shapes if s.kind != "lm_head")
        (lm,) = (s for s in shapes if s.kind == "lm_head")
        self._lm_flop_s, self._lm_byte_s = self._roofline_terms(lm)
        m = self.model
        self._expert_gemms = tuple(self._roofline_terms(s) for s in m.expert_shapes(self.tp))
        self._num_experts = m.num_experts
        self._k = m.num_experts_per_tok
        self._expert_miss = 1.0 - m.num_experts_per_tok / m.num_experts if m.is_moe else 1.0

    def _precompute_attention(self) -> None:
        m, gpu, p, tp = self.model, self.gpu, self.profile, self.tp
        peak = gpu.bf16_flops_per_s
        pf_pair_s = m.prefill_attn_flops_per_pair() / tp / (peak * p.attn_prefill_eff)
        kv_layer_s = (
            self.kv_bytes_per_token_per_gpu
            / m.num_layers
            / (gpu.hbm_bytes_per_s * p.attn_decode_eff)
        )
        dec_flop_s = m.decode_attn_flops_per_pair() / tp / (peak * p.attn_prefill_eff)
        dec_token_s = max(kv_layer_s, dec_flop_s)
        self._prefill_full_s_per_pair = m.num_full_attention_layers * pf_pair_s
        self._prefill_sliding_s_per_pair = m.num_sliding_layers * pf_pair_s
        # the host's time per context token (per_context_token_s) rides with the kernels'
        self._decode_full_s_per_token = (
            m.num_full_attention_layers * dec_token_s + p.per_context_token_s
        )
        self._decode_sliding_s_per_token = m.num_sliding_layers * dec_token_s
        self._window = m.sliding_window if m.num_sliding_layers else 0

    def _precompute_comm(self) -> None:
        tp, p, m = self.tp, self.profile, self.model
        if tp == 1:
            self._comm_s_per_token = self._comm_latency_s = 0.0
            return
        ring = 2 * (tp - 1) / tp
        per_token_bytes = m.hidden_size * ACTIVATION_BYTES
        num_allreduce = 2 * m.num_layers  # after attention and after the MLP/MoE
        link = self.gpu.tp_link_bytes_per_s * p.comm_eff
        self._comm_s_per_token = num_allreduce * ring * per_token_bytes / link
        self._comm_latency_s = num_allreduce * p.allreduce_latency_s

    # -- hot path --------------------------------------------------------------------------
    # step_time costs ~0.65 µs per call for a dense model, ~0.9 µs for Qwen3-30B-A3B and
    # ~1.2 µs for DeepSeek-V3 (CPython 3.11, one Xeon core); decode_run_times ~10 ns per step.
    # Measured by tests/sim/test_timing.py::test_bench_step_time (pytest -m bench -s).

    def step_time(
        self,
        num_prefill_tokens: int,
        prefill_attn_work: float,
        num_prefill_seqs: int,
        num_decode_seqs: int,
        decode_context_tokens: int,
    ) -> float:
        fixed = self._fixed_time(
            num_prefill_tokens, prefill_attn_work, num_prefill_seqs, num_decode_seqs
        )
        c = decode_context_tokens
        if not self._window:
            return fixed + c * self._decode_full_s_per_token
        w = num_decode_seqs * self._window
        return fixed + (
            c * self._decode_full_s_per_token
            + (c if c < w else w) * self._decode_sliding_s_per_token
        )

    def decode_run_times(
        self, num_decode_seqs: int, decode_context_tokens0: int, num_steps: int
    ) -> np.ndarray:
        """Step times of num_steps pure-decode steps, context growing by D a step; bitwise
        equal to step_time(0, 0.0, 0, D, C0 + j·D) for j = 0 .. num_steps − 1."""
        d = num_decode_seqs
        if d < 0 or num_steps < 0 or decode_context_tokens0 < 0:
            raise ValueError(
                f"decode_run_times({d}, {decode_context_tokens0}, {num_steps}): "
                "arguments must be >= 0"
            )
        fixed = self._fixed_time(0, 0.0, 0, d)
        c = decode_context_tokens0 + d * np.arange(num_steps, dtype=np.int64)
        if not self._window:
            return fixed + c * self._decode_full_s_per_token
        w = d * self._window
        return fixed + (
            c * self._decode_full_s_per_token + np.minimum(c, w) * self._decode_sliding_s_per_token
        )

    def _fixed_time(self, p: int, a: float, n_p: int, d: int) -> float:
        t_rows = p + d
        t = self._step_overhead_s + self._per_seq_overhead_s * (d + n_p)
        for flop_s, byte_s in self._gemms:
            x = t_rows * flop_s
            t += x if x > byte_s else byte_s
        x = (d + n_p) * self._lm_flop_s
        t += x if x > self._lm_byte_s else self._lm_byte_s
        if self._num_experts:
            hit = self._num_experts * (1.0 - self._expert_miss**t_rows)
            routed = t_rows * self._k
            for flop_s, byte_s in self._expert_gemms:
                x, y = routed * flop_s, hit * byte_s
                t += x if x > y else y
        if a:
            t += a * self._prefill_full_s_per_pair
            if self._window:
                w = p * self._window
                t += (a if a < w else w) * self._prefill_sliding_s_per_pair
        return t + (t_rows * self._comm_s_per_token + self._comm_latency_s)

    # -- inspection (slow path, for reports and tests) ------------------------------------

    def weight_bytes_read(self, num_tokens: int) -> float:
        """Weight bytes one GPU reads in a forward pass over num_tokens rows: every matrix
        but the embedding (a row lookup), routed experts counted by E_hit(num_tokens)."""
        m, tp = self.model, self.tp
        wb = dtype_bytes(self.dtype)
        total = 0.0
        for s in m.linear_shapes(tp):
            total += s.numel * s.count * (wb if s.quantizable else ACTIVATION_BYTES)
        if m.is_moe:
            hit = m.num_experts * (1.0 - self._expert_miss**num_tokens)
            total += hit * sum(s.numel * s.count * wb for s in m.expert_shapes(tp))
        return total

    def breakdown(
        self,
        num_prefill_tokens: int,
        prefill_attn_work: float,
        num_prefill_seqs: int,
        num_decode_seqs: int,
        decode_context_tokens: int,
    ) -> dict[str, float]:
        """step_time split into its terms (seconds); the values sum to step_time."""
        p, a, n_p, d, c = (
            num_prefill_tokens,
            prefill_attn_work,
            num_prefill_seqs,
            num_decode_seqs,
            decode_context_tokens,
        )
        t_rows = p + d
        hit = self._num_experts * (1.0 - self._expert_miss**t_rows)
        w_p, w_d = p * self._window, d * self._window
        return {
            "gemm": sum(max(t_rows * f, b) for f, b in self._gemms),
            "lm_head": max((d + n_p) * self._lm_flop_s, self._lm_byte_s),
            "moe": sum(max(t_rows * self._k * f, hit * b) for f, b in self._expert_gemms),
            "prefill_attn": (
                a * self._prefill_full_s_per_pair + min(a, w_p) * self._prefill_sliding_s_per_pair
            ),
            "decode_attn": (
                c * (self._decode_full_s_per_token - self.profile.per_context_token_s)
                + min(c, w_d) * self._decode_sliding_s_per_token
            ),
            "allreduce": t_rows * self._comm_s_per_token + self._comm_latency_s,
            "overhead": self._step_overhead_s
            + self._per_seq_overhead_s * (d + n_p)
            + c * self.profile.per_context_token_s,
        }
