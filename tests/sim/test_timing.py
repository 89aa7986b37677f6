"""Roofline timing prior: physics by hand, orderings, and fast-forward exactness."""

from __future__ import annotations

import time

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.catalog import ModelSpec, load_gpu, load_model
from sim.errors import CatalogError
from sim.timing import RooflineTiming, TimingModel, TimingProfile, prefill_attn_work

H100_BW = 3.35e12
PRIOR = TimingProfile()

TINY = ModelSpec(
    name="tiny",
    num_layers=4,
    hidden_size=256,
    num_attention_heads=4,
    num_kv_heads=2,
    head_dim=64,
    intermediate_size=512,
    vocab_size=1000,
    max_position_embeddings=2048,
)


def make_timing(
    model: str | ModelSpec = "Llama-3.1-8B",
    gpu: str = "H100",
    tp: int = 1,
    dtype: str = "bf16",
    **profile: float,
) -> RooflineTiming:
    spec = load_model(model) if isinstance(model, str) else model
    return RooflineTiming(spec, load_gpu(gpu), tp, dtype, TimingProfile(**profile))


def decode(timing: RooflineTiming, num_seqs: int, context_tokens: int) -> float:
    return timing.step_time(0, 0.0, 0, num_seqs, context_tokens)


def prefill(timing: RooflineTiming, num_tokens: int) -> float:
    return timing.step_time(num_tokens, prefill_attn_work(num_tokens, 0), 1, 0, 0)


def test_prefill_attn_work_counts_causal_pairs() -> None:
    assert prefill_attn_work(4, 0) == 1 + 2 + 3 + 4
    assert prefill_attn_work(3, 10) == 11 + 12 + 13


# -- batch-1 decode of Llama-3.1-8B on H100: the weight-read bound ---------------------------


def test_llama_8b_batch1_decode_is_weight_read_bound() -> None:
    t = make_timing()
    # Weights by hand from the config: 32 layers of QKV + O + gated MLP, embedding, lm_head.
    h, inter, vocab = 4096, 14336, 128256
    layer = h * (32 + 2 * 8) * 128 + 32 * 128 * h + 3 * h * inter
    linear_bytes = 2 * (32 * layer + vocab * h)  # what the GEMMs read (embedding: a lookup)
    weight_bytes = linear_bytes + 2 * (vocab * h + 32 * 2 * h + h)
    assert weight_bytes == 16_060_522_496
    ideal = weight_bytes / H100_BW
    assert ideal == pytest.approx(4.79e-3, rel=1e-3)

    context = 1000
    overheads = PRIOR.step_overhead_s + PRIOR.per_seq_overhead_s
    kv_read = context * 131_072 / (H100_BW * PRIOR.attn_decode_eff)
    step = decode(t, 1, context)
    assert ideal <= step <= ideal / PRIOR.gemm_mem_eff + overheads + kv_read
    # And exactly the roofline: every GEMM is memory-bound at one row.
    assert step == pytest.approx(
        linear_bytes / (H100_BW * PRIOR.gemm_mem_eff) + overheads + kv_read, rel=1e-12
    )


def test_decode_attention_term_by_hand() -> None:
    t = make_timing()
    d, c = 32, 32 * 4000
    extra = decode(t, d, c) - decode(t, d, 0)
    assert extra == pytest.approx(c * 131_072 / (H100_BW * PRIOR.attn_decode_eff), rel=1e-9)


def test_prefill_attention_term_by_hand() -> None:
    t = make_timing()
    a = prefill_attn_work(8192, 0)
    terms = t.breakdown(8192, a, 1, 0, 0)
    flops = 32 * 4 * 32 * 128 * a  # layers · 4 · heads · head_dim · pairs
    assert terms["prefill_attn"] == pytest.approx(flops / (989e12 * PRIOR.attn_prefill_eff))
    # 8k tokens through the decoder's linears: compute-bound, 2 FLOPs per weight per token.
    lm_head = 128256 * 4096
    decoder = load_model("Llama-3.1-8B").num_params - 2 * lm_head - (32 * 2 * 4096 + 4096)
    gemm_flops = 2 * 8192 * decoder
    assert terms["gemm"] == pytest.approx(gemm_flops / (989e12 * PRIOR.gemm_compute_eff))
    # Logits only for the chunk's last token: lm_head is a weight read.
    assert terms["lm_head"] == pytest.approx(2 * lm_head / (H100_BW * PRIOR.gemm_mem_eff))


# -- tensor parallelism ---------------------------------------------------------------------


def test_llama_70b_tp8_faster_than_tp4_but_not_twice() -> None:
    tp4, tp8 = make_timing("Llama-3.1-70B", tp=4), make_timing("Llama-3.1-70B", tp=8)
    assert tp8.weight_bytes_per_gpu == pytest.approx(tp4.weight_bytes_per_gpu / 2, rel=1e-3)
    for step in (lambda t: decode(t, 1, 1000), lambda t: prefill(t, 8192)):
        t4, t8 = step(tp4), step(tp8)
        assert t8 < t4 < 2 * t8
    # The all-reduce is what keeps TP 8 from halving the step: it grows with the ring factor.
    a = prefill_attn_work(8192, 0)
    ar4 = tp4.breakdown(8192, a, 1, 0, 0)["allreduce"]
    ar8 = tp8.breakdown(8192, a, 1, 0, 0)["allreduce"]
    assert 0 < ar4 < ar8
    bytes_per_allreduce = 8192 * 8192 * 2
    expected8 = (
        2
        * 80
        * (2 * 7 / 8 * bytes_per_allreduce / (450e9 * PRIOR.comm_eff) + PRIOR.allreduce_latency_s)
    )
    assert ar8 == pytest.approx(expected8, rel=1e-12)


def test_no_allreduce_at_tp1_and_pcie_without_nvlink() -> None:
    assert make_timing().breakdown(100, 5050.0, 1, 0, 0)["allreduce"] == 0
    l40s = make_timing("Qwen3-8B", gpu="L40S", tp=2)
    per_token = (
        l40s.breakdown(2, 0.0, 0, 0, 0)["allreduce"] - l40s.breakdown(1, 0.0, 0, 0, 0)["allreduce"]
    )
    assert per_token == pytest.approx(2 * 36 * 4096 * 2 / (32e9 * PRIOR.comm_eff), rel=1e-9)


# -- monotonicity ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["Llama-3.1-8B", "Qwen3-30B-A3B", "DeepSeek-V3", "gpt-oss-20b"])
def test_more_work_takes_longer(model: str) -> None:
    t = make_timing(model, gpu="H200", tp=8 if model == "DeepSeek-V3" else 1)
    prefills = [prefill(t, n) for n in (1, 16, 256, 1024, 4096, 16384)]
    assert prefills == sorted(prefills) and len(set(prefills)) == len(prefills)
    contexts = [decode(t, 64, c) for c in (64, 6400, 64_000, 640_000, 6_400_000)]
    assert contexts == sorted(contexts) and len(set(contexts)) == len(contexts)
    batches = [decode(t, d, d * 1000) for d in (1, 8, 64, 256)]
    assert batches == sorted(batches)


# -- MoE expert reads -----------------------------------------------------------------------


def test_moe_batch1_reads_active_experts_batch256_reads_nearly_all() -> None:
    m = load_model("Qwen3-30B-A3B")
    t = make_timing(m)
    embedding = 151936 * 2048
    expert_bytes = 2 * 3 * 2048 * 768 * 48  # one expert in every layer, bf16
    # One token touches exactly k = 8 experts per layer: E·(1 − (1 − 8/128)^1) = 8.
    assert t.weight_bytes_read(1) == pytest.approx(2 * (m.num_active_params - embedding), rel=1e-3)
    assert t.weight_bytes_read(1) < 0.15 * m.weight_bytes("bf16")
    # 256 tokens × 8 picks out of 128 experts: all but 128·(15/16)^256 ≈ 1e-5 experts.
    unread = m.weight_bytes("bf16") - 2 * embedding - t.weight_bytes_read(256)
    assert 0 < unread < 0.001 * expert_bytes
    step1 = decode(t, 1, 1000) - PRIOR.step_overhead_s - PRIOR.per_seq_overhead_s
    assert step1 == pytest.approx(t.weight_bytes_read(1) / (H100_BW * PRIOR.gemm_mem_eff), rel=0.02)
    assert decode(t, 256, 256_000) > 5 * decode(t, 1, 1000)


# -- fp8 ------------------------------------------------------------------------------------


def test_fp8_batch1_decode_about_half_of_bf16() -> None:
    bf16, fp8 = make_timing(dtype="bf16"), make_timing(dtype="fp8")
    fixed = (
        PRIOR.step_overhead_s
        + PRIOR.per_seq_overhead_s
        + 1000 * 131_072 / (H100_BW * PRIOR.attn_decode_eff)
    )
    ratio = (decode(fp8, 1, 1000) - fixed) / (decode(bf16, 1, 1000) - fixed)
    # Decoder linears drop to 1 byte; lm_head stays 16-bit (as FP8 checkpoints ship it).
    lm_head = 128256 * 4096
    decoder = load_model("Llama-3.1-8B").num_params - 2 * lm_head - 32 * 2 * 4096 - 4096
    assert ratio == pytest.approx((decoder + 2 * lm_head) / (2 * decoder + 2 * lm_head), rel=1e-9)
    assert 0.5 < ratio < 0.56


# -- fast-forward exactness -----------------------------------------------------------------

FF_CASES = [
    ("Llama-3.1-8B", "H100", 1, "bf16"),
    ("Llama-3.1-70B", "H100", 4, "fp8"),
    ("Qwen3-30B-A3B", "H200", 2, "bf16"),
    ("DeepSeek-V3", "H200", 8, "fp8"),
    ("gpt-oss-120b", "B200", 2, "bf16"),  # sliding-window layers: the min(C, D·W) branch
    (TINY, "L40S", 2, "bf16"),
]


@pytest.mark.parametrize(("model", "gpu", "tp", "dtype"), FF_CASES)
def test_decode_run_times_bitwise_equal_to_step_time(
    model: str | ModelSpec, gpu: str, tp: int, dtype: str
) -> None:
    t = make_timing(model, gpu, tp, dtype)
    rng = np.random.default_rng(20240611)
    for _ in range(300):
        d = int(rng.integers(0, 1024))
        c0 = int(rng.integers(0, 2_000_000))
        k = int(rng.integers(0, 200))
        fast = t.decode_run_times(d, c0, k)
        slow = np.array([t.step_time(0, 0.0, 0, d, c0 + j * d) for j in range(k)], dtype=float)
        assert fast.dtype == np.float64 and fast.shape == (k,)
        assert np.array_equal(fast, slow), (d, c0, k)


@settings(max_examples=300, deadline=None)
@given(
    d=st.integers(0, 4096),
    c0=st.integers(0, 10**8),
    k=st.integers(0, 64),
    case=st.sampled_from(FF_CASES),
)
def test_decode_run_times_property(
    d: int, c0: int, k: int, case: tuple[str | ModelSpec, str, int, str]
) -> None:
    t = make_timing(*case)
    fast = t.decode_run_times(d, c0, k)
    assert fast.tolist() == [t.step_time(0, 0.0, 0, d, c0 + j * d) for j in range(k)]


def test_breakdown_sums_to_step_time() -> None:
    for model, gpu, tp, dtype in FF_CASES:
        t = make_timing(model, gpu, tp, dtype)
        for args in [(0, 0.0, 0, 1, 500), (512, prefill_attn_work(512, 3000), 1, 63, 90_000)]:
            assert sum(t.breakdown(*args).values()) == pytest.approx(t.step_time(*args), rel=1e-12)


def test_roofline_is_a_timing_model() -> None:
    model: TimingModel = make_timing(TINY)
    assert model.step_time(8, prefill_attn_work(8, 0), 1, 0, 0) > 0


# -- profile --------------------------------------------------------------------------------


def test_profile_round_trips_through_yaml() -> None:
    profile = TimingProfile(gemm_compute_eff=0.7, step_overhead_s=2e-4)
    text = yaml.safe_dump(profile.to_dict())
    assert TimingProfile.from_dict(yaml.safe_load(text)) == profile
    assert TimingProfile.from_dict({}) == TimingProfile()


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("gemm_mem_eff", 0.0, "(0, 1]"),
        ("comm_eff", 20.0, "(0, 1]"),
        ("attn_decode_eff", float("nan"), "(0, 1]"),
        ("step_overhead_s", -1e-3, ">= 0"),
        ("allreduce_latency_s", float("inf"), ">= 0"),
        ("gemm_compute_eff", True, "number"),
        ("per_seq_overhead_s", "1e-5", "number"),
    ],
)
def test_profile_rejects_bad_values(field: str, value: object, rule: str) -> None:
    with pytest.raises(CatalogError) as e:
        TimingProfile.from_dict({field: value}, where="profiles/h100.yaml")
    assert e.value.where == "profiles/h100.yaml"
    assert field in e.value.message and rule in e.value.message
    with pytest.raises(CatalogError, match=field):
        TimingProfile(**{field: value})  # type: ignore[arg-type]


def test_profile_rejects_unknown_keys() -> None:
    with pytest.raises(CatalogError, match=r"unknown coefficient.*gemm_eff"):
        TimingProfile.from_dict({"gemm_eff": 0.5})


def test_profile_scales_the_terms() -> None:
    slow_mem = make_timing(gemm_mem_eff=0.4)
    base = make_timing()
    d_slow = decode(slow_mem, 1, 0) - PRIOR.step_overhead_s - PRIOR.per_seq_overhead_s
    d_base = decode(base, 1, 0) - PRIOR.step_overhead_s - PRIOR.per_seq_overhead_s
    assert d_slow == pytest.approx(2 * d_base, rel=1e-12)


# -- speed (benchmark, not part of the default run) -----------------------------------------


@pytest.mark.bench
def test_bench_step_time() -> None:
    for model in ("Llama-3.1-8B", "Qwen3-30B-A3B", "DeepSeek-V3"):
        t = make_timing(model, tp=8 if model == "DeepSeek-V3" else 1)
        n = 200_000
        start = time.perf_counter()
        for i in range(n):
            t.step_time(512, 200_000.0, 1, 63 + (i & 7), 64 * 2000 + i)
        per_call = (time.perf_counter() - start) / n
        start = time.perf_counter()
        t.decode_run_times(64, 128_000, n)
        per_step = (time.perf_counter() - start) / n
        print(
            f"{model}: step_time {per_call * 1e6:.2f} µs/call, "
            f"decode_run_times {per_step * 1e9:.1f} ns/step ({per_call / per_step:.0f}x)"
        )


def test_host_time_per_context_token_rides_with_decode_attention() -> None:
    """per_context_token_s adds its time per decode-context token to every step, in the
    single-step path and the fast-forward one alike; breakdown books it as overhead."""
    base = make_timing()
    host = 2e-7
    t = make_timing(per_context_token_s=host)
    for d, c in ((1, 100), (8, 4000), (32, 65_536)):
        assert t.step_time(0, 0.0, 0, d, c) - base.step_time(0, 0.0, 0, d, c) == \
            pytest.approx(c * host, rel=1e-9)
        run = t.decode_run_times(d, c, 5) - base.decode_run_times(d, c, 5)
        assert run == pytest.approx(host * (c + d * np.arange(5)), rel=1e-9)
        terms = t.breakdown(64, 2080.0, 1, d, c)
        assert sum(terms.values()) == pytest.approx(t.step_time(64, 2080.0, 1, d, c))
        plain = base.breakdown(64, 2080.0, 1, d, c)
        assert terms["decode_attn"] == pytest.approx(plain["decode_attn"])
        assert terms["overhead"] - plain["overhead"] == pytest.approx(c * host)
    assert TimingProfile.from_dict({"per_context_token_s": 1e-7}).per_context_token_s == 1e-7
    with pytest.raises(CatalogError, match="per_context_token_s"):
        TimingProfile.from_dict({"per_context_token_s": -1e-7})
