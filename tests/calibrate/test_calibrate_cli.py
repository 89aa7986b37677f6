"""`servetwin calibrate` end to end on a small CSV."""

from __future__ import annotations

from pathlib import Path

import pytest

from calibrate.measurements import write
from calibrate.profile import load_profile
from servetwin.cli import main
from tests.calibrate.test_fit import MODEL, TRUE, make_samples


def test_calibrate_csv_writes_loadable_profile(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    csv = write(make_samples(TRUE), tmp_path / "m.csv")
    out = tmp_path / "profile.yaml"
    code = main(["calibrate", str(csv), "--model", MODEL.name, "--gpu", "h100_sxm",
                 "--tp", "1", "--k", "3", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "decode" in text and "prefill" in text and "mixed" in text
    assert "not identified (kept at prior): comm_eff, allreduce_latency_s" in text
    profile, meta = load_profile(out)
    assert profile.gemm_mem_eff == pytest.approx(TRUE.gemm_mem_eff, rel=1e-4)
    assert meta["provenance"]["engine"] == "synthetic"
    assert meta["provenance"]["sources"] == ["test"]


def test_calibrate_errors_are_one_line(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["calibrate", str(tmp_path / "missing.csv"), "--model", MODEL.name,
                 "--gpu", "h100_sxm", "--out", str(tmp_path / "p.yaml")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("servetwin: error:") and "file not found" in err
    assert "\n" not in err
