"""The GPU kernel probe: its shapes and aggregates, the committed H100 run against the bundled
profiles, and the probe itself run on the CPU build of PyTorch that the vLLM test engine
brings (the same code path as on a GPU, minus CUDA graphs and events)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from calibrate import measurements
from calibrate.kernel_probe import (
    Shape,
    check_model,
    compare,
    default_shapes,
    main,
    mixed_shapes,
    summarise,
)
from sim.catalog import load_model
from sim.errors import InputError
from sim.timing import prefill_attn_work

ROOT = Path(__file__).resolve().parents[2]
H100_RUN = ROOT / "reports" / "kernel-probe" / "h100_qwen3-32b.csv"
H100_MIXED = ROOT / "reports" / "kernel-probe" / "h100_qwen3-32b_mixed.csv"


def test_aggregates_follow_the_timing_model() -> None:
    s = Shape(prefill_seqs=3, prefill_len=1000)
    a = s.aggregates()
    assert a["num_prefill_tokens"] == 3000 and a["num_prefill_seqs"] == 3
    assert a["prefill_attn_work"] == pytest.approx(3 * prefill_attn_work(1000, 0))
    chunk = Shape(prefill_seqs=2, prefill_len=512, prefill_ctx=3584).aggregates()
    assert chunk["prefill_attn_work"] == pytest.approx(2 * prefill_attn_work(512, 3584))
    d = Shape(decode_seqs=8, context=1536).aggregates()
    assert (d["num_decode_seqs"], d["decode_context_tokens"], d["num_prefill_tokens"]) == \
        (8, 8 * 1536, 0)


def test_default_shapes_cover_the_benchmark() -> None:
    shapes = default_shapes()
    prefill = {(s.prefill_seqs, s.prefill_len) for s in shapes if s.is_prefill}
    assert (8, 1024) in prefill and (2, 4096) in prefill
    assert all(s.prefill_seqs * s.prefill_len <= 8192 for s in shapes if s.is_prefill)
    assert {s.decode_seqs for s in shapes if not s.is_prefill} == {1, 8, 16, 32, 64, 128}


def test_moe_models_are_refused_with_the_fix() -> None:
    with pytest.raises(InputError, match="dense"):
        check_model(load_model("Qwen/Qwen3-30B-A3B"))


def test_committed_h100_run_against_the_bundled_profiles() -> None:
    """Real H100 passes (reports/kernel-probe): the bundled vLLM profiles predict the
    bandwidth-bound decode passes (batch >= 64) within 5 %; prefill they predict faster than
    PyTorch's kernels ran (the finding the report explains), by at most 35 %."""
    rows = compare(H100_RUN)
    assert len(rows) == 72
    decode = [r for r in rows if r["num_decode_seqs"] >= 64]
    assert decode and all(abs(r["ratio"] - 1) < 0.05 for r in decode)
    prefill = [r for r in rows if r["num_prefill_tokens"]]
    assert prefill and all(0.65 < r["ratio"] < 1.0 for r in prefill)


def test_mixed_passes_are_grouped_by_kind() -> None:
    """The committed mixed run: every shape of mixed_shapes at TP 1, 2, 4 and 8, grouped as
    whole prompts beside decodes, chunks after cached tokens, and both."""
    rows = compare(H100_MIXED)
    assert len(rows) == 4 * len(mixed_shapes())
    groups = summarise(rows)
    assert {kind for _, kind in groups} == {"prefill + decode", "chunk", "chunk + decode"}
    assert [len(groups[(8, k)]) for k in ("prefill + decode", "chunk", "chunk + decode")] == \
        [6, 3, 1]


def test_compare_names_a_file_with_no_matching_profile(tmp_path: Path, capsys) -> None:
    df = measurements.read(H100_RUN).head(2).assign(gpu="b300")
    path = measurements.write(df, tmp_path / "other.csv")
    assert main(["compare", str(path)]) == 1
    assert "no row matches" in capsys.readouterr().out


@pytest.mark.slow
def test_probe_runs_on_pytorch_and_writes_rows(tmp_path: Path) -> None:
    from verify.testbed import ensure_vllm
    engine = ensure_vllm()  # its venv holds the CPU build of PyTorch
    out = tmp_path / "probe.csv"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [str(engine.python), "-m", "calibrate.kernel_probe", "run", "--model",
           "Qwen/Qwen3-0.6B", "--tp", "2", "--device", "cpu", "--shapes", "small",
           "--warmup", "0", "--reps", "1", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[3/3] tp 2" in done.stdout
    df = measurements.read(out)
    assert len(df) == 3 and (df["measured_s"] > 0).all() and (df["tp"] == 2).all()
    assert df["engine_version"].str.endswith("sdpa-default, eager").all()
    mixed = df.iloc[2]  # a chunk after cached tokens beside two decoders
    assert (mixed["num_prefill_tokens"], mixed["num_decode_seqs"]) == (8, 2)
    # the packed decode attention equals attention with each KV head repeated per query head
    check = (
        "import torch, torch.nn.functional as F\n"
        "from calibrate.kernel_probe import packed_decode_attention\n"
        "torch.manual_seed(0)\n"
        "b, nq, nkv, hd, ctx = 3, 8, 2, 16, 40\n"
        "q = torch.randn(b, nq, 1, hd); k = torch.randn(b, nkv, ctx, hd)\n"
        "v = torch.randn(b, nkv, ctx, hd)\n"
        "packed = packed_decode_attention(F, q.reshape(b, nq * hd), k, v)\n"
        "ref = F.scaled_dot_product_attention(q, k.repeat_interleave(nq // nkv, 1),\n"
        "                                     v.repeat_interleave(nq // nkv, 1))\n"
        "print(float((packed.reshape(b, nq * hd) - ref.reshape(b, nq * hd)).abs().max()))\n"
        # a chunk of the last n tokens after c cached equals those rows of causal attention
        # over all c + n tokens
        "from calibrate.kernel_probe import chunk_attention\n"
        "n, c = 5, 11\n"
        "qf = torch.randn(b, nq, c + n, hd)\n"
        "kf = torch.randn(b, nkv, c + n, hd); vf = torch.randn(b, nkv, c + n, hd)\n"
        "full = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, enable_gqa=True)\n"
        "part = chunk_attention(F, qf[:, :, c:], kf, vf)\n"
        "print(float((part - full[:, :, c:]).abs().max()))\n")
    done = subprocess.run([str(engine.python), "-c", check], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    errors = [float(v) for v in done.stdout.split()]
    assert len(errors) == 2 and max(errors) < 1e-5
