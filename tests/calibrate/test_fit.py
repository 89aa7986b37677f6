"""Fit back a known profile from samples it generated; bounds; profile YAML round trip."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibrate.fit import EFF_BOUNDS, fit, kfold
from calibrate.profile import load_profile, profile_doc, write_profile
from sim.catalog import load_gpu, load_model
from sim.errors import CatalogError, InputError
from sim.timing import RooflineTiming, TimingProfile

MODEL, GPU = load_model("meta-llama/Llama-3.1-8B"), load_gpu("h100_sxm")
TRUE = TimingProfile(gemm_compute_eff=0.7, gemm_mem_eff=0.85, attn_prefill_eff=0.5,
                     attn_decode_eff=0.8, comm_eff=0.45, allreduce_latency_s=8e-6,
                     step_overhead_s=3e-4, per_seq_overhead_s=2e-5)


def make_samples(profile: TimingProfile, tp: int = 1, noise: float = 0.0,
                 seed: int = 0) -> pd.DataFrame:
    timing = RooflineTiming(MODEL, GPU, tp, "bf16", profile)
    batches = [(b * n, b * n * (n + 1) / 2, b, 0, 0)
               for b in (1, 2, 4, 8) for n in (128, 512, 2048, 8192)]
    batches += [(0, 0.0, 0, d, d * c) for d in (1, 8, 32, 128, 256) for c in (256, 2048, 16384)]
    batches += [(256, 256 * (1024 + 128.5), 1, d, d * 1024) for d in (16, 64)]  # mixed
    rng = np.random.default_rng(seed)
    rows = []
    for agg in batches:
        t = timing.step_time(*agg) * float(np.exp(rng.normal(0.0, noise)))
        rows.append(dict(zip(("num_prefill_tokens", "prefill_attn_work", "num_prefill_seqs",
                              "num_decode_seqs", "decode_context_tokens"), agg, strict=True),
                         tp=tp, pp=1, measured_s=t, gpu="h100_sxm", engine="synthetic",
                         engine_version="0", model=MODEL.name, dtype="bf16", date="",
                         source="test"))
    return pd.DataFrame(rows)


def test_fit_recovers_known_profile_tp1() -> None:
    result = fit(make_samples(TRUE), MODEL, GPU, 1)
    assert result.not_identified == ("comm_eff", "allreduce_latency_s")
    got, prior = result.profile.to_dict(), TimingProfile()
    for name in result.identified:
        assert got[name] == pytest.approx(getattr(TRUE, name), rel=1e-4), name
    for name in result.not_identified:  # held at the prior, not at the truth
        assert got[name] == getattr(prior, name)
    assert np.max(np.abs(result.log_residuals)) < 1e-8


def test_fit_recovers_comm_terms_tp2() -> None:
    result = fit(make_samples(TRUE, tp=2), MODEL, GPU, 2)
    # λ is a constant per step, as step_overhead_s: held at the prior, which step_overhead_s
    # absorbs exactly (2 all-reduces x 32 layers).
    assert result.not_identified == ("allreduce_latency_s",)
    for name in ("gemm_compute_eff", "gemm_mem_eff", "attn_prefill_eff", "attn_decode_eff",
                 "comm_eff", "per_seq_overhead_s"):
        assert getattr(result.profile, name) == pytest.approx(getattr(TRUE, name), rel=1e-3)
    lam = TRUE.allreduce_latency_s - TimingProfile().allreduce_latency_s
    assert result.profile.step_overhead_s == pytest.approx(TRUE.step_overhead_s + 64 * lam)
    assert np.max(np.abs(result.log_residuals)) < 1e-6


def test_kfold_of_exact_samples_is_zero_and_covers_regimes() -> None:
    folds = kfold(make_samples(TRUE), MODEL, GPU, 1, k=5, seed=0)
    assert set(folds.by_regime) == {"all", "prefill", "decode", "mixed"}
    assert folds.by_regime["all"]["num_samples"] == 33
    for stats in folds.by_regime.values():
        assert stats["median_ape"] < 1e-6 and stats["mean_ape"] < 1e-6


def test_bounds_hold_when_data_ask_for_more() -> None:
    # Measured 3x faster than a perfect GPU: efficiencies would want to exceed 1.
    fast = make_samples(replace(TRUE, step_overhead_s=0.0, per_seq_overhead_s=0.0))
    fast["measured_s"] /= 3.0
    result = fit(fast, MODEL, GPU, 1)
    p = result.profile
    for name in ("gemm_compute_eff", "gemm_mem_eff", "attn_prefill_eff", "attn_decode_eff"):
        assert EFF_BOUNDS[0] <= getattr(p, name) <= 1.0
    assert p.step_overhead_s >= 0 and p.per_seq_overhead_s >= 0
    assert "gemm_mem_eff" in result.at_bound


def test_a_device_with_nominal_rates_fits_efficiencies_above_one() -> None:
    # the same 3x-fast samples on a device whose catalog rates are nominal (the CPU entry
    # sets efficiency_ceiling): the fit is not held at 1, and recovers the samples
    fast = make_samples(replace(TRUE, step_overhead_s=0.0, per_seq_overhead_s=0.0))
    fast["measured_s"] /= 3.0
    nominal = replace(GPU, efficiency_ceiling=8.0)
    result = fit(fast, MODEL, nominal, 1)
    p = result.profile
    assert p.gemm_mem_eff == pytest.approx(3 * TRUE.gemm_mem_eff, rel=1e-3)
    assert p.gemm_compute_eff == pytest.approx(3 * TRUE.gemm_compute_eff, rel=1e-3)
    assert not set(result.at_bound) & {"gemm_compute_eff", "gemm_mem_eff", "attn_prefill_eff",
                                       "attn_decode_eff"}
    assert np.max(np.abs(result.log_residuals)) < 1e-6
    # the CPU entry is such a device; a GPU is held at 1, in the fit and in the twin
    assert load_gpu("CPU").efficiency_ceiling == 8.0 and GPU.efficiency_ceiling == 1.0
    with pytest.raises(CatalogError, match=r"gemm_compute_eff = 2.1.*must be in \(0, 1\] on H100"):
        RooflineTiming(MODEL, GPU, 1, "bf16", p)
    RooflineTiming(MODEL, nominal, 1, "bf16", p)


def test_fit_rejects_other_tp_rows() -> None:
    with pytest.raises(InputError, match="row 1: tp = 2, fitting tp = 1"):
        fit(make_samples(TRUE, tp=2), MODEL, GPU, 1)


def test_profile_round_trip_and_scenario_paste(tmp_path: Path) -> None:
    samples = make_samples(TRUE, noise=0.02)
    result = fit(samples, MODEL, GPU, 1)
    folds = kfold(samples, MODEL, GPU, 1, k=3)
    doc = profile_doc(result, gpu="h100_sxm", engine="synthetic", engine_version="0",
                      model=MODEL.name, dtype="bf16", tp=1, sources=["test"], kfold=folds,
                      date="2026-01-01")
    path = write_profile(tmp_path / "p.yaml", doc)
    profile, meta = load_profile(path)
    assert profile == result.profile
    assert meta["provenance"]["num_samples"] == len(samples)
    assert meta["provenance"]["not_identified"] == ["comm_eff", "allreduce_latency_s"]
    assert set(meta["fit"]["kfold"]["regimes"]) == {"all", "prefill", "decode", "mixed"}
    from sim.scenario import TimingSpec  # the timing block is a valid scenario timing

    assert TimingSpec(**doc["timing"]).profile == result.profile.to_dict()


@pytest.mark.parametrize(("text", "match"), [
    ("timing:\n  profile:\n    gemm_mem_eff: 17\n", r"timing.profile: gemm_mem_eff = 17"),
    ("timing:\n  profile:\n    gemm_eff: 0.5\n", r"timing.profile: unknown coefficient.*gemm_eff"),
    ("timing:\n  profile:\n    step_overhead_s: fast\n", r"step_overhead_s = 'fast'"),
    ("provenance: {}\n", r"p.yaml: timing = None"),
    ("timing: [1\n", r"not a readable YAML"),
])
def test_malformed_profile_names_the_field(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=match):
        load_profile(path)


def test_mean_level_scales_every_step_time_by_one_factor() -> None:
    from calibrate.fit import mean_level, predict

    df = make_samples(TRUE, tp=2)
    scaled = mean_level(TRUE, 1.07)
    assert predict(df, MODEL, GPU, 2, "bf16", scaled) == pytest.approx(
        1.07 * predict(df, MODEL, GPU, 2, "bf16", TRUE), rel=1e-12)
    assert scaled.frontend_s == TRUE.frontend_s
    # an efficiency is held within the device's ceiling: there the scale falls short
    assert mean_level(TRUE, 0.5).gemm_mem_eff == 1.0


def test_the_mean_level_follows_the_slow_steps_the_robust_fit_discounts() -> None:
    """One step in ten 40 % slow: the robust fit keeps the typical level (the median
    residual ~0), the mean level adds a few per cent so that the totals agree."""
    df = make_samples(TRUE)
    slow = np.arange(len(df)) % 10 == 3
    df.loc[slow, "measured_s"] *= 1.4
    robust = fit(df, MODEL, GPU, 1)
    mean = fit(df, MODEL, GPU, 1, level="mean")
    assert robust.level_factor == 1.0 and abs(np.median(robust.log_residuals)) < 0.01
    assert 1.01 < mean.level_factor < 1.1
    from calibrate.fit import predict

    total = predict(df, MODEL, GPU, 1, "bf16", mean.profile).sum()
    assert total == pytest.approx(df["measured_s"].sum(), rel=1e-9)
    folds = kfold(df, MODEL, GPU, 1, level="mean")
    assert folds.by_regime["all"]["num_samples"] == len(df)
    with pytest.raises(InputError, match="level"):
        fit(df, MODEL, GPU, 1, level="median")
