"""Drift of new samples against an old profile: a hand-made shift, the negative control,
bad input, --aic-version, and the CLI end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from calibrate import aiconfigurator as aic
from calibrate.drift import check_samples, drift, host_time, stored_intervals, with_host_time
from calibrate.measurements import write
from calibrate.profile import load_profile
from servetwin.cli import main
from sim.catalog import load_gpu, load_model
from sim.errors import InputError
from sim.timing import RooflineTiming, TimingProfile
from tests.calibrate.test_aiconfigurator import TINY, write_tables

MODEL, GPU = load_model("meta-llama/Llama-3.1-8B"), load_gpu("h100_sxm")
OLD = TimingProfile(gemm_compute_eff=0.7, gemm_mem_eff=0.85, attn_prefill_eff=0.5,
                    attn_decode_eff=0.8, step_overhead_s=3e-4, per_seq_overhead_s=2e-5)
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "timing"


def make_samples(profile: TimingProfile, noise: float = 0.0, seed: int = 0,
                 decode_factor: float = 1.0, tp: int = 1,
                 model: str | None = None) -> pd.DataFrame:
    """12 prefill, 12 decode and 12 mixed passes timed by `profile`; decode ones × factor."""
    timing = RooflineTiming(MODEL, GPU, tp, "bf16", profile)
    batches = [(b * n, b * n * (n + 1) / 2, b, 0, 0) for b in (1, 2, 4) for n in
               (128, 512, 1024, 2048)]
    batches += [(0, 0.0, 0, d, d * c) for d in (1, 16, 64, 256) for c in (256, 2048, 8192)]
    batches += [(p, p * (c + (p + 1) / 2), 1, d, d * 1024) for p in (128, 512, 2048)
                for d, c in ((8, 0), (16, 512), (32, 1024), (64, 4096))]
    rng = np.random.default_rng(seed)
    rows = []
    for agg in batches:
        t = timing.step_time(*agg) * float(np.exp(rng.normal(0.0, noise)))
        if agg[2] == 0:
            t *= decode_factor
        rows.append(dict(zip(("num_prefill_tokens", "prefill_attn_work", "num_prefill_seqs",
                              "num_decode_seqs", "decode_context_tokens"), agg, strict=True),
                         tp=tp, pp=1, measured_s=t, gpu="h100_sxm", engine="synthetic",
                         engine_version="1", model=model or MODEL.name, dtype="bf16",
                         date="", source="test"))
    return pd.DataFrame(rows)


def make_meta(half_width: float | None = 0.05) -> dict[str, Any]:
    """A profile's meta as load_profile returns it: ±half_width log intervals per regime."""
    fit: dict[str, Any] = {}
    if half_width is not None:
        fit = {"intervals": {g: {"log_q05": -half_width, "log_q95": half_width}
                             for g in ("prefill", "decode", "mixed", "all")},
               "intervals_from": "kfold held-out"}
    return {"provenance": {"gpu": "h100_sxm", "engine": "synthetic", "engine_version": "0",
                           "model": MODEL.name, "dtype": "bf16", "tp": 1}, "fit": fit}


def test_decode_slower_by_20_percent_moves_decode_only() -> None:
    new = make_samples(OLD, decode_factor=1.2)
    result = drift(new, OLD, make_meta(), MODEL, GPU, 1)
    by = result.by_regime()
    assert by["decode"].moved and by["decode"].median_error == pytest.approx(0.2, rel=1e-9)
    assert by["decode"].fraction_outside == 1.0
    assert by["decode"].verdict.startswith("moved: +20.0 % (beyond the 90 % interval")
    for g in ("prefill", "mixed"):
        assert not by[g].moved and by[g].verdict.startswith("within the interval (+0.0 %")
        assert by[g].fraction_outside == 0.0 and by[g].median_ape == pytest.approx(0, abs=1e-12)
    # APE is |predicted / measured - 1| (as the k-fold): 1 / 1.2 - 1
    assert by["decode"].median_ape == pytest.approx(1 / 6)
    assert by["decode"].interval == pytest.approx((np.expm1(-0.05), np.expm1(0.05)))
    assert result.moved and result.verdict == "moved: decode +20.0 %"
    assert result.notes == ("engine_version: profile 0, samples 1",)
    assert len(result.samples) == 36 and result.samples["outside"].sum() == 12


def test_negative_control_same_profile_with_noise_is_within() -> None:
    new = make_samples(OLD, noise=0.01, seed=3)
    result = drift(new, OLD, make_meta(), MODEL, GPU, 1)
    assert not result.moved
    assert result.verdict == "within the interval in every regime with samples"
    for r in result.regimes[:3]:
        assert r.num_samples == 12 and not r.moved and "within the interval" in r.verdict
        assert abs(r.median_error or 0) < 0.02


def test_host_step_gap_of_an_in_place_profile_is_not_read_as_drift() -> None:
    # verify --calibrate-first adds the host time between step lines to the profile's
    # step overhead (provenance.host_step_gap_s); step lines do not contain it
    gap = 1e-3
    served = dataclasses.replace(OLD, step_overhead_s=OLD.step_overhead_s + gap)
    meta = make_meta()
    meta["provenance"]["host_step_gap_s"] = gap
    result = drift(make_samples(OLD), served, meta, MODEL, GPU, 1)
    assert not result.moved
    for r in result.regimes:
        assert r.median_error == pytest.approx(0, abs=1e-12)
    assert any("1.00 ms a step of host time" in n for n in result.notes)
    # without the provenance the same profile reads the gap as faster steps (the control)
    plain = drift(make_samples(OLD), served, make_meta(), MODEL, GPU, 1)
    assert plain.by_regime()["decode"].median_error < -0.02


def test_profile_without_intervals_compares_on_error_alone() -> None:
    result = drift(make_samples(OLD, decode_factor=1.2), OLD, make_meta(None), MODEL, GPU, 1)
    by = result.by_regime()
    assert result.intervals_from is None and by["decode"].fraction_outside is None
    assert by["decode"].verdict == "moved: +20.0 % (beyond ±5.0 %; no interval stored)"
    assert by["prefill"].verdict == "within ±5.0 % (+0.0 %; no interval stored)"
    assert "stores no prediction intervals" in result.notes[1]


def test_absent_regime_is_reported_not_judged() -> None:
    new = make_samples(OLD)
    new = new[new["num_prefill_tokens"] == 0]
    by = drift(new, OLD, make_meta(), MODEL, GPU, 1).by_regime()
    assert by["prefill"].num_samples == 0 and by["prefill"].verdict == "no samples"
    assert by["all"].num_samples == 12


def test_bad_samples_name_the_row_and_field() -> None:
    with pytest.raises(InputError, match=r"new.csv: row 1: model = 'other/model', the "
                       r"profile is of 'meta-llama/Meta-Llama-3.1-8B'"):
        check_samples(make_samples(OLD, model="other/model"), MODEL.name, 1, "new.csv")
    with pytest.raises(InputError, match=r"new.csv: row 1: tp = 2, the profile is of tp = 1"):
        check_samples(make_samples(OLD, tp=2), MODEL.name, 1, "new.csv")
    # the alias the user typed resolves to the profile's model: accepted
    aliased = make_samples(OLD, model="meta-llama/Llama-3.1-8B")
    assert len(check_samples(aliased, MODEL.name, 1, "new.csv")) == 36


@pytest.mark.parametrize(("intervals", "match"), [
    ([1, 2], r"p.yaml: fit.intervals: \[1, 2\]: not a mapping"),
    ({"decode": [1, 2]}, r"p.yaml: fit.intervals.decode: \[1, 2\]: needs log_q05 and "),
    ({"decode": {"log_q05": "x", "log_q95": 1}}, r"fit.intervals.decode.log_q05: 'x': not "),
    ({"decode": {"log_q05": 0.1, "log_q95": -0.1}}, r"log_q05 = 0.1 > log_q95 = -0.1"),
    ({"chunked": {"log_q05": 0, "log_q95": 0}}, r"regime 'chunked' is unknown"),
])
def test_malformed_intervals_name_the_field(intervals: Any, match: str) -> None:
    with pytest.raises(InputError, match=match):
        stored_intervals({"fit": {"intervals": intervals}}, "p.yaml")


def test_aic_version_picks_tables_and_holds_the_missing_ones(tmp_path: Path) -> None:
    write_tables(tmp_path)
    old = tmp_path / "tiny_gpu" / "gemm" / "vllm" / "0.0.9"
    old.mkdir()
    gemm = pd.read_csv(tmp_path / "tiny_gpu" / "gemm" / "vllm" / "0.1.0" / "gemm_perf.csv.gz")
    gemm["latency"] *= 2.0
    gemm.to_csv(old / "gemm_perf.csv.gz", index=False)
    model = load_model(TINY)
    newest = aic.samples(model, GPU, 2, "tiny_gpu", "vllm", root=tmp_path)
    picked = aic.samples(model, GPU, 2, "tiny_gpu", "vllm", root=tmp_path, version="0.0.9")
    assert set(newest["engine_version"]) == {"0.1.0"}  # the default: newest per table
    assert set(picked["engine_version"]) == {"0.0.9"}
    assert aic.table_versions(picked) == {
        "gemm_perf.csv.gz": "0.0.9", "context_attention_perf.csv.gz": "0.1.0",
        "generation_attention_perf.csv.gz": "0.1.0", "custom_allreduce_perf.csv.gz": "0.1.0"}
    assert (picked["measured_s"] > newest["measured_s"]).all()
    with pytest.raises(InputError, match=r"--aic-version: '9.9': no tiny_gpu / vllm table at "
                       r"that version. Fix: use one of 0.0.9, 0.1.0"):
        aic.samples(model, GPU, 2, "tiny_gpu", "vllm", root=tmp_path, version="9.9")


def _fit_profile(tmp_path: Path) -> Path:
    csv = write(make_samples(OLD, noise=0.02, seed=1), tmp_path / "old.csv")
    out = tmp_path / "old.yaml"
    assert main(["calibrate", str(csv), "--model", MODEL.name, "--gpu", "h100_sxm",
                 "--k", "3", "--out", str(out)]) == 0
    return out


def test_cli_against_reports_and_writes(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    profile = _fit_profile(tmp_path)
    new = write(make_samples(OLD, noise=0.02, seed=2, decode_factor=1.2), tmp_path / "new.csv")
    same = write(make_samples(OLD, noise=0.02, seed=2), tmp_path / "same.csv")
    capsys.readouterr()
    assert main(["calibrate", "--against", str(profile), str(new),
                 "--out", str(tmp_path / "report")]) == 0
    text = capsys.readouterr().out
    assert "overall: moved: decode +" in text and "wrote" in text
    doc = json.loads((tmp_path / "report" / "drift.json").read_text())
    assert doc["moved"] and doc["intervals_from"] == "kfold held-out"
    assert doc["regimes"]["decode"]["moved"]
    assert doc["regimes"]["decode"]["median_error"] == pytest.approx(0.2, abs=0.03)
    assert not doc["regimes"]["prefill"]["moved"] and not doc["regimes"]["mixed"]["moved"]
    table = pd.read_csv(tmp_path / "report" / "drift.csv")
    assert table["regime"].tolist() == ["prefill", "decode", "mixed", "all"]
    assert len(pd.read_csv(tmp_path / "report" / "drift_samples.csv")) == 36
    assert (tmp_path / "report" / "drift.txt").read_text().startswith("servetwin calibrate")
    # negative control, written as FILE.json + FILE.csv + FILE_samples.csv
    assert main(["calibrate", "--against", str(profile), str(same),
                 "--out", str(tmp_path / "control.json")]) == 0
    doc = json.loads((tmp_path / "control.json").read_text())
    assert not doc["moved"] and not any(r["moved"] for r in doc["regimes"].values())
    assert (tmp_path / "control.csv").is_file() and (tmp_path / "control_samples.csv").is_file()


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("servetwin: error:") and "\n" not in err
    return err


def test_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = write(make_samples(OLD), tmp_path / "new.csv")
    err = _error(capsys, ["calibrate", "--against", str(tmp_path / "nope.yaml"), str(new)])
    assert "nope.yaml: file not found" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: {gemm_mem_eff: 0.8}\n")
    assert "bad.yaml: timing = None: missing" in _error(
        capsys, ["calibrate", "--against", str(bad), str(new)])
    doc = {"timing": {"kind": "roofline", "profile": {}}, **make_meta()}
    doc["provenance"]["tp"] = "two"
    bad.write_text(yaml.safe_dump(doc))
    assert "bad.yaml: provenance.tp: 'two': not a TP degree" in _error(
        capsys, ["calibrate", "--against", str(bad), str(new)])
    doc["provenance"]["tp"] = 1
    bad.write_text(yaml.safe_dump(doc))
    assert "provenance.tp: 1, --tp 2" in _error(
        capsys, ["calibrate", "--against", str(bad), str(new), "--tp", "2"])
    other = write(make_samples(OLD, model="other/model"), tmp_path / "other.csv")
    err = _error(capsys, ["calibrate", "--against", str(bad), str(other)])
    assert "other.csv: row 1: model = 'other/model'" in err and "Fix:" in err
    del doc["provenance"]["model"]
    bad.write_text(yaml.safe_dump(doc))
    assert "bad.yaml: provenance.model: None: missing. Fix: give --model" in _error(
        capsys, ["calibrate", "--against", str(bad), str(new)])
    assert "--out is missing" in _error(capsys, ["calibrate", str(new), "--model",
                                                 MODEL.name, "--gpu", "h100_sxm"])


@pytest.mark.skipif(not (SHARED / "aiconfigurator" / "h100_sxm" / "gemm" / "sglang"
                         / "0.5.6.post2").is_dir(), reason="needs shared/data (not in CI)")
def test_real_tables_negative_control(tmp_path: Path) -> None:
    aic_dir = str(SHARED / "aiconfigurator")
    common = ["--from-aiconfigurator", "h100_sxm", "sglang", "--aic-version", "0.5.6.post2",
              "--aic-max-tokens", "8192", "--aic-dir", aic_dir]
    profile = tmp_path / "old.yaml"
    assert main(["calibrate", *common, "--model", "meta-llama/Llama-3.1-8B", "--gpu",
                 "H100-SXM", "--out", str(profile)]) == 0
    assert load_profile(profile)[1]["provenance"]["engine_version"] == "0.5.6.post2"
    assert main(["calibrate", "--against", str(profile), *common,
                 "--out", str(tmp_path / "self")]) == 0
    doc = json.loads((tmp_path / "self" / "drift.json").read_text())
    assert not doc["moved"]
    assert [g for g, r in doc["regimes"].items() if r["num_samples"]] == [
        "prefill", "decode", "all"]


def test_host_time_model_of_an_in_place_profile_is_not_read_as_drift() -> None:
    # since the profiling measures the host time by the step (calibrate.profiling.
    # host_gap_model), verify adds it per step, per sequence and per context token
    parts = (6e-4, 4e-5, 1.2e-7)
    served = with_host_time(OLD, parts)
    assert served.per_context_token_s == pytest.approx(1.2e-7)
    meta = make_meta()
    meta["provenance"]["host_step_gap_model"] = {
        "step_s": parts[0], "per_seq_s": parts[1], "per_context_token_s": parts[2],
        "num_phases": 23, "rms_s": 2e-4}
    meta["provenance"]["host_step_gap_median_s"] = 9e-4  # a record: not what was added
    assert host_time(meta) == parts
    result = drift(make_samples(OLD), served, meta, MODEL, GPU, 1)
    for r in result.regimes:
        assert r.median_error == pytest.approx(0, abs=1e-12)
    assert any("0.60 ms a step + 40.0 us a sequence + 120.0 us per 1,000 context tokens"
               in n for n in result.notes)
    # the control: taking off only the median constant leaves the per-sequence and
    # per-token parts in, read as slower predicted steps
    meta_const = make_meta()
    meta_const["provenance"]["host_step_gap_s"] = parts[0]
    plain = drift(make_samples(OLD), served, meta_const, MODEL, GPU, 1)
    assert plain.by_regime()["decode"].median_error < -0.01
    bad = make_meta()
    bad["provenance"]["host_step_gap_model"] = {"step_s": "x", "per_seq_s": 0,
                                                "per_context_token_s": 0}
    with pytest.raises(InputError, match=r"host_step_gap_model\.step_s"):
        host_time(bad, "p.yaml")
