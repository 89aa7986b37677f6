"""Host (CPU) work per step from Vidur's vLLM CPU overheads, added to vLLM bundled profiles."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from calibrate import host_overhead as ho
from calibrate.bundle import PROFILE_DIR, add_host_overhead
from sim.errors import InputError
from sim.profiles import read_profile


def table(tmp_path: Path, rows: list[dict], name: str = "cpu.csv") -> Path:
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=True)
    return path


def exact_rows(tp: int, step_ms: float, per_seq_ms: float, model: str) -> list[dict]:
    """Components that sum to step_ms + per_seq_ms * b, split unevenly."""
    out = []
    for b in (8, 16, 32, 64, 128):
        total = step_ms + per_seq_ms * b
        out.append({"schedule_median": 0.1 * total, "sampler_e2e_median": 0.2 * total,
                    "prepare_inputs_e2e_median": 0.3 * total,
                    "process_model_outputs_median": 0.4 * total,
                    "model_execution_e2e_median": 99.0,  # GPU time: not host work
                    "model_name": model, "batch_size": b, "tensor_parallel_degree": tp})
    return out


def test_fit_recovers_exact_lines_and_picks_the_largest_tp_below(tmp_path: Path) -> None:
    path = table(tmp_path, exact_rows(1, 0.8, 0.04, "a") + exact_rows(2, 1.5, 0.045, "b"))
    lines = ho.fit(ho.read(path))
    assert sorted(lines) == [1, 2]
    assert lines[1].step_s == pytest.approx(0.8e-3) and lines[1].per_seq_s == pytest.approx(4e-5)
    assert lines[2].step_s == pytest.approx(1.5e-3)
    assert lines[2].per_seq_s == pytest.approx(4.5e-5)
    assert lines[1].max_rel_residual == pytest.approx(0, abs=1e-12)
    assert lines[2].models == ("b",) and lines[2].num_rows == 5
    assert ho.for_tp(lines, 1).tp == 1
    assert ho.for_tp(lines, 8).tp == 2 and ho.for_tp(lines, 4).tp == 2
    prov = ho.for_tp(lines, 8).provenance(8)
    assert (prov["measured_tp"], prov["for_tp"]) == (2, 8) and "vidur" in prov["source"]


def test_a_tp_with_one_batch_size_gives_no_line(tmp_path: Path) -> None:
    rows = exact_rows(1, 0.8, 0.04, "a")[:1]
    assert ho.fit(ho.read(table(tmp_path, rows))) == {}
    with pytest.raises(InputError, match="no TP has two batch sizes"):
        ho.for_tp({}, 1)


def test_missing_column_and_bad_value_are_named(tmp_path: Path) -> None:
    rows = exact_rows(1, 0.8, 0.04, "a")
    for r in rows:
        del r["sampler_e2e_median"]
    with pytest.raises(InputError, match=r"cpu\.csv: missing column\(s\) sampler_e2e_median"):
        ho.read(table(tmp_path, rows))
    rows = exact_rows(1, 0.8, 0.04, "a")
    rows[2]["batch_size"] = "many"
    with pytest.raises(InputError, match=r"cpu\.csv:4: batch_size = 'many'.*Fix: fix or delete"):
        ho.read(table(tmp_path, rows))
    with pytest.raises(InputError, match="file not found"):
        ho.read(tmp_path / "absent.csv")


def test_add_host_overhead_keeps_both_parts() -> None:
    doc = {"timing": {"profile": {"step_overhead_s": 1e-4, "per_seq_overhead_s": 2e-6}},
           "provenance": {}}
    h = ho.HostOverhead(1, 8e-4, 4e-5, 13, ("m",), 0.1)
    add_host_overhead(doc, h, 1)
    assert doc["timing"]["profile"] == {"step_overhead_s": pytest.approx(9e-4),
                                        "per_seq_overhead_s": pytest.approx(4.2e-5)}
    assert doc["provenance"]["kernel_overheads"] == {"step_overhead_s": 1e-4,
                                                     "per_seq_overhead_s": 2e-6}
    assert doc["provenance"]["host_overhead"]["step_s"] == 8e-4


def test_bundled_vllm_profiles_carry_the_host_line_and_sglang_ones_do_not() -> None:
    vllm = sorted(PROFILE_DIR.glob("*-vllm-*.yaml"))
    sglang = sorted(PROFILE_DIR.glob("*-sglang-*.yaml"))
    assert len(vllm) >= 27 and len(sglang) >= 27
    for path in vllm:
        profile, meta = read_profile(path)
        prov = meta["provenance"]
        host, kernel = prov["host_overhead"], prov["kernel_overheads"]
        assert host["measured_tp"] == max(t for t in (1, 2, 4) if t <= prov["tp"]), path.name
        assert profile.step_overhead_s == pytest.approx(
            kernel["step_overhead_s"] + host["step_s"], rel=1e-12), path.name
        assert profile.per_seq_overhead_s == pytest.approx(
            kernel["per_seq_overhead_s"] + host["per_seq_s"], rel=1e-12), path.name
    for path in sglang:
        _, meta = read_profile(path)
        assert "host_overhead" not in meta["provenance"], path.name


def test_the_shared_vidur_table_gives_plausible_lines() -> None:
    path = ho.default_path()
    if not path.is_file():
        pytest.skip(f"{path} not present (shared data); the format is tested above")
    lines = ho.fit(ho.read(path))
    assert sorted(lines) == [1, 2, 4]
    # vLLM V0 on A100: ~0.8 ms a step + ~40 us a sequence at TP 1, more per step at TP > 1
    assert 0.5e-3 < lines[1].step_s < 1.2e-3 and 30e-6 < lines[1].per_seq_s < 55e-6
    assert lines[1].step_s < lines[2].step_s < lines[4].step_s
