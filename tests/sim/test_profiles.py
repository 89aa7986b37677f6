"""Timing profiles selected by name in a scenario, and every run saying which it used."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sim.errors import ScenarioError
from sim.profiles import bundled_profiles, read_profile
from sim.scenario import load_scenario
from sim.simulate import resolve, resolve_profile
from sim.timing import TimingProfile

NAME = "h100_sxm-vllm-qwen--qwen3-32b-tp2"


def scenario(tmp_path: Path, timing: dict) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({
        "workload": {"synthetic": {"num_requests": 4, "rate_per_s": 1.0,
                                   "input_tokens": 100, "output_tokens": 10}},
        "model": "Qwen/Qwen3-32B", "gpu": "H100-SXM", "timing": timing}))
    return p


def test_bundled_profiles_are_listed_and_readable() -> None:
    names = bundled_profiles()
    assert NAME in names
    profile, meta = read_profile(names[NAME])
    assert meta["provenance"]["tp"] == 2 and meta["provenance"]["engine"] == "vllm"
    assert profile != TimingProfile()


def test_no_profile_means_the_prior_and_says_so(tmp_path: Path) -> None:
    profile, note = resolve_profile(load_scenario(scenario(tmp_path, {})))
    assert profile == TimingProfile()
    assert note.startswith("analytic prior")


def test_profile_name_loads_the_fitted_coefficients_and_names_them(tmp_path: Path) -> None:
    profile, note = resolve_profile(load_scenario(scenario(tmp_path, {"profile_name": NAME})))
    expected, _ = read_profile(bundled_profiles()[NAME])
    assert profile == expected
    assert note.startswith(f"profile {NAME} (") and "TP 2" in note and "held-out" in note


def test_coefficients_override_the_named_profile(tmp_path: Path) -> None:
    profile, note = resolve_profile(load_scenario(scenario(
        tmp_path, {"profile_name": NAME, "profile": {"step_overhead_s": 0.002}})))
    expected, _ = read_profile(bundled_profiles()[NAME])
    assert profile.step_overhead_s == 0.002
    assert profile.gemm_compute_eff == expected.gemm_compute_eff
    assert "overridden: step_overhead_s = 0.002" in note


def test_a_profile_path_relative_to_the_scenario(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text(
        "timing: {kind: roofline, profile: {gemm_mem_eff: 0.5}}\nprovenance: {gpu: H100}\n")
    profile, note = resolve_profile(load_scenario(scenario(tmp_path,
                                                           {"profile_name": "mine.yaml"})))
    assert profile.gemm_mem_eff == 0.5 and "profile mine.yaml (H100)" in note


def test_unknown_profile_name_lists_the_bundled_ones(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"s\.yaml:\d+.*profile_name = 'nope'.*" + NAME):
        resolve_profile(load_scenario(scenario(tmp_path, {"profile_name": "nope"})))


def test_a_malformed_profile_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("timing: {profile: {gemm_mem_eff: 30}}\n")
    with pytest.raises(ScenarioError, match="gemm_mem_eff"):
        resolve_profile(load_scenario(scenario(tmp_path, {"profile_name": "bad.yaml"})))


def test_an_efficiency_above_the_devices_ceiling_is_refused_where_it_comes_from(
        tmp_path: Path) -> None:
    # 3 is a valid efficiency on a device with nominal rates (the CPU entry), not on a GPU
    (tmp_path / "cpu.yaml").write_text("timing: {profile: {gemm_mem_eff: 3}}\n")
    with pytest.raises(ScenarioError, match=r"s\.yaml.*cpu\.yaml.*gemm_mem_eff = 3.*H100-SXM"):
        resolve(load_scenario(scenario(tmp_path, {"profile_name": "cpu.yaml"})))
    cpu = yaml.safe_load(scenario(tmp_path, {"profile_name": "cpu.yaml"}).read_text())
    cpu.update(gpu="CPU", model="servetwin/tiny-llama-4l")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cpu))
    assert resolve(load_scenario(tmp_path / "s.yaml")).timing.profile.gemm_mem_eff == 3.0
