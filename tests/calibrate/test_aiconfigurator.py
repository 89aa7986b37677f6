"""The op-table composition against a hand sum of table rows, on tiny hand-made tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from calibrate import aiconfigurator as aic
from sim.catalog import load_gpu, load_model
from sim.errors import InputError

TINY = "servetwin/tiny-llama-4l"  # 4 layers, hidden 512, 8 heads = 8 KV heads, dim 64


def gemm_ms(m: int, n: int, k: int) -> float:
    return 1e-6 * (m + 1) * n * k  # multilinear: trilinear interpolation is exact


def write_tables(root: Path) -> None:
    base = root / "tiny_gpu"
    # TP 2 shapes (n = out, k = in): qkv 768x512, o 512x256, gate_up 1408x512,
    # down 512x704, lm_head 16000x512 (vocab-parallel).
    gemm = [{"gemm_dtype": "bfloat16", "kernel_source": "torch", "m": m, "n": n, "k": k,
             "latency": gemm_ms(m, n, k)}
            for m in (1, 2, 4) for n in (256, 512, 768, 1408, 16000)
            for k in (256, 512, 704)]
    gemm.append({"gemm_dtype": "bfloat16", "kernel_source": "slow", "m": 4, "n": 768, "k": 512,
                 "latency": 99.0})  # a slower kernel for the same point: not chosen
    attn = {"num_heads": 4, "num_key_value_heads": 4, "head_dim": 64, "beam_width": 1,
            "kv_cache_dtype": "bfloat16", "window_size": 0, "kernel_source": "fa3"}
    ctx = [{**attn, "batch_size": 1, "isl": 4, "step": 0, "latency": 0.25},
           {**attn, "batch_size": 1, "isl": 4, "step": 0, "latency": 0.20,
            "kernel_source": "fa4"},
           {**attn, "batch_size": 1, "isl": 4, "step": 0, "latency": 5.0, "num_heads": 8}]
    gen = [{**attn, "batch_size": 2, "isl": 1, "step": 3, "latency": 0.05},
           {**attn, "batch_size": 2, "isl": 1, "step": 3, "latency": 0.07,
            "kv_cache_dtype": "fp8"}]
    ar = [{"kernel_source": ks, "num_gpus": g, "message_size": s, "latency": lat}
          for ks, lat in (("vLLM_custom_graph", 0.01), ("vLLM_custom_eager", 0.5))
          for g in (2, 4) for s in (512, 1024, 4096)]
    for family, name, rows in (("gemm", "gemm_perf", gemm),
                               ("attention", "context_attention_perf", ctx),
                               ("attention", "generation_attention_perf", gen)):
        d = base / family / "vllm" / "0.1.0"
        d.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(d / f"{name}.csv.gz", index=False)
    d = base / "comm" / "vllm" / "0.1.0"
    d.mkdir(parents=True)
    pd.DataFrame(ar).to_csv(d / "custom_allreduce_perf.csv.gz", index=False)


def test_composition_equals_hand_sum(tmp_path: Path) -> None:
    write_tables(tmp_path)
    df = aic.samples(load_model(TINY), load_gpu("h100_sxm"), 2, "tiny_gpu", "vllm",
                     root=tmp_path)
    assert len(df) == 2
    pre, dec = df.iloc[0], df.iloc[1]
    layer_gemms = [(768, 512), (512, 256), (1408, 512), (512, 704)]
    # prefill: 1 prompt of 4 tokens; fa4's 0.20 ms beats fa3's 0.25; all-reduce of
    # 4 x 512 = 2048 elements interpolates 1024 -> 4096 (both 0.01 ms).
    # elementwise kernels (no system_specs/tiny_gpu.yaml: the H100 catalogue's 3.35 TB/s
    # x 0.8, + 3 us a kernel): per layer 2 add+norm of T x (4 x 512) x 2 B and one
    # SiLU-and-mul of T x (3 x 704) x 2 B; the embedding gather 2 x T x 512 x 2 B, and its
    # all-reduce (one more 0.01 ms).
    def mem_ms(num_bytes: float) -> float:
        return (num_bytes / (3.35e12 * 0.8) + 3e-6) * 1e3

    def extra_ms(t: int) -> float:
        layer = 2 * mem_ms(t * 2048 * 2) + mem_ms(t * 2112 * 2)
        return 4 * layer + mem_ms(2 * t * 512 * 2) + 0.01

    hand_ms = 4 * (0.20 + sum(gemm_ms(4, n, k) for n, k in layer_gemms) + 2 * 0.01) \
        + gemm_ms(1, 16000, 512) + extra_ms(4)
    assert extra_ms(4) == pytest.approx(0.0491, abs=1e-4)  # 13 kernels x 3 us + 0.01 ms
    assert pre["measured_s"] == pytest.approx(hand_ms * 1e-3, rel=1e-12)
    assert (pre["num_prefill_tokens"], pre["prefill_attn_work"], pre["num_prefill_seqs"],
            pre["num_decode_seqs"]) == (4, 10.0, 1, 0)
    # decode: 2 sequences, step 3 -> KV length 4 each; bf16 KV row only.
    hand_ms = 4 * (0.05 + sum(gemm_ms(2, n, k) for n, k in layer_gemms) + 2 * 0.01) \
        + gemm_ms(2, 16000, 512) + extra_ms(2)
    assert dec["measured_s"] == pytest.approx(hand_ms * 1e-3, rel=1e-12)
    assert (dec["num_decode_seqs"], dec["decode_context_tokens"]) == (2, 8)
    assert set(df["tp"]) == {2} and set(df["engine_version"]) == {"0.1.0"}
    assert aic.sources(df) == ["tiny_gpu/gemm/vllm/0.1.0/gemm_perf.csv.gz",
                               "tiny_gpu/attention/vllm/0.1.0/context_attention_perf.csv.gz",
                               "tiny_gpu/attention/vllm/0.1.0/generation_attention_perf.csv.gz",
                               "tiny_gpu/comm/vllm/0.1.0/custom_allreduce_perf.csv.gz"]


def test_memory_ops_priced_from_system_spec(tmp_path: Path) -> None:
    """AIConfigurator's query_mem_op: bytes / (mem_bw x factor) + constant, read from
    system_specs/<system>.yaml; the shipped H100-SXM file gives 3.35 TB/s x 0.8, 3 us."""
    spec = tmp_path / "system_specs" / "toy.yaml"
    spec.parent.mkdir()
    spec.write_text("gpu:\n  mem_bw: 1000000000000\n  mem_bw_empirical_scaling_factor: 0.5\n"
                    "  mem_empirical_constant_latency: 0.00001\n")
    bw, const = aic.mem_op_params(tmp_path, "toy", load_gpu("h100_sxm"))
    assert (bw, const) == (5e11, 1e-5)
    # Qwen3-32B at TP 8, 8 decode rows: h 5120, I 25600 / 8 = 3200.
    # layer: 2 x (8 x 20480 x 2 B = 327,680 B) + 8 x 9600 x 2 B = 153,600 B
    #   = 2 x (0.65536 + 10) us + (0.3072 + 10) us = 31.6179 us
    # embedding: 2 x 8 x 5120 x 2 B = 163,840 B -> 0.32768 + 10 = 10.32768 us
    layer, embed = aic.elementwise_ms(load_model("Qwen/Qwen3-32B"), 8, 8, bw, const)
    assert layer == pytest.approx(31.6179e-3, rel=1e-6)
    assert embed == pytest.approx(10.32768e-3, rel=1e-6)
    real = aic.default_root()
    if (real / "system_specs" / "h100_sxm.yaml").is_file():
        assert aic.mem_op_params(real, "h100_sxm", load_gpu("h100_sxm")) == \
            pytest.approx((3.35e12 * 0.8, 3e-6))


def test_gemm_interpolates_and_scales() -> None:
    rows = pd.DataFrame([{"gemm_dtype": "bfloat16", "m": m, "n": n, "k": k,
                          "latency": gemm_ms(m, n, k)}
                         for m in (1, 8) for n in (64, 256) for k in (64, 128)])
    table = aic.GemmTable.from_frame(rows, "bfloat16", "t")
    assert table(3, 100, 96) == pytest.approx(gemm_ms(3, 100, 96))  # inside: trilinear
    assert table(8, 1024, 128) == pytest.approx(gemm_ms(8, 1024, 128))  # n x 4: scaled
    with pytest.raises(InputError, match="m = 9 tokens"):
        table(9, 64, 64)


def test_unknown_system_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no gemm_perf\.csv\.gz for nope / vllm"):
        aic.samples(load_model(TINY), load_gpu("h100_sxm"), 1, "nope", "vllm", root=tmp_path)
