"""The committed calibrate loop on real vLLM-CPU (reports/loop-tiny-vllm-cpu): each config
predicted again, now, from the profile fitted on its own engine before its replay. The
simulator must predict exactly what it predicted when the run was made, so the committed
errors (numbers.json, the README's table) stay what they say. The bounds themselves are
asserted on a live run: tests/verify/test_real_engines.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sim.metrics import summarize
from verify.run import load_configs, predict

ROOT = Path(__file__).resolve().parents[2]
LOOP = ROOT / "reports" / "loop-tiny-vllm-cpu"
TINY = ROOT / "scenarios" / "verify" / "tiny_vllm_cpu.yaml"


def test_committed_loop_is_predicted_again_from_each_engines_own_profile() -> None:
    comp = json.loads((LOOP / "verify" / "comparison.json").read_text(encoding="utf-8"))
    numbers = json.loads((LOOP / "numbers.json").read_text(encoding="utf-8"))
    entries = {e.config_id: e for e in load_configs(TINY)}
    assert sorted(c["config_id"] for c in comp["configs"]) == sorted(entries)
    for c in comp["configs"]:
        cid = c["config_id"]
        cdir = LOOP / "verify" / cid
        state = json.loads((cdir / "done.json").read_text(encoding="utf-8"))
        assert state["profile"] == "calibration/profile.yaml"
        assert c["num_excluded"] == 0
        result, _ = predict(entries[cid], int(state["engine_info"]["num_gpu_blocks"]),
                            cdir / state["profile"])
        ps = summarize(result.records)
        for m in ("ttft_s", "tpot_s"):
            for s in ("p50", "p90"):
                # the same prediction as when the run was made ...
                assert ps[m][s] == pytest.approx(c["predicted_summary"][m][s], rel=1e-6), \
                    (cid, m, s)
                # ... so the same error against the measured replay
                err = ps[m][s] / c["measured_summary"][m][s] - 1
                assert err == pytest.approx(numbers[cid][f"{m}.{s}"], abs=1e-6), (cid, m, s)
        # prefix reuse as measured, and no preemption on either side
        hits = c["scalars"]["prefix_cache_hit_rate"]
        assert hits["predicted"] == pytest.approx(hits["measured"], abs=0.005)
        preempt = c["scalars"]["num_preemptions"]
        assert preempt["predicted"] == preempt["measured"] == 0


def test_committed_recheck_is_the_drift_of_the_committed_steps() -> None:
    """Each engine's drift across its replay (recheck.json, the README's second table),
    computed again from the committed steps after the replay and the profile the prediction
    used: the same check `servetwin calibrate --against` runs."""
    from calibrate import measurements
    from calibrate.drift import drift
    from calibrate.profile import load_profile
    from sim.simulate import resolve

    recheck = json.loads((LOOP / "recheck.json").read_text(encoding="utf-8"))
    entries = {e.config_id: e for e in load_configs(TINY)}
    assert sorted(recheck) == sorted(entries)
    for cid, row in recheck.items():
        cal = LOOP / "verify" / cid / "calibration"
        profile, meta = load_profile(cal / "profile.yaml")
        r = resolve(entries[cid].loaded)
        after = drift(measurements.read(cal / "after" / "steps.csv"), profile, meta,
                      r.model, r.gpu, 1, "bf16").by_regime()
        before = drift(measurements.read(cal / "steps.csv"), profile, meta,
                       r.model, r.gpu, 1, "bf16").by_regime()
        d = row["engine_drift"]
        assert after["all"].median_error == pytest.approx(d["median_error_after"], abs=1e-9)
        assert before["all"].median_error == pytest.approx(d["median_error_before"], abs=1e-9)
        for g in ("prefill", "decode", "mixed"):
            assert after[g].median_error == pytest.approx(d["by_regime_after"][g], abs=1e-9)
        state = json.loads((cal.parent / "done.json").read_text(encoding="utf-8"))
        assert state["recheck"]["median_error"] == pytest.approx(d["median_error_after"])


def test_committed_served_steps_are_the_drift_of_the_replays_own_steps() -> None:
    """The replay's own steps (joined with the requests it sent) against the profile the
    prediction used (done.json's `served`, the README's third table), computed again from
    the committed steps."""
    from calibrate import measurements
    from calibrate.drift import drift
    from calibrate.profile import load_profile
    from sim.simulate import resolve
    from verify.run import _sixths

    entries = {e.config_id: e for e in load_configs(TINY)}
    for cid, entry in entries.items():
        cal = LOOP / "verify" / cid / "calibration"
        served = json.loads((cal.parent / "done.json").read_text(encoding="utf-8"))["served"]
        steps = measurements.read(cal / "served" / "steps.csv")
        assert served["num_rows"] == served["num_steps"] == len(steps) > 1000
        assert not served["dropped"]
        profile, meta = load_profile(cal / "profile.yaml")
        r = resolve(entry.loaded)
        result = drift(steps, profile, meta, r.model, r.gpu, 1, "bf16")
        for g, value in served["by_regime"].items():
            assert result.by_regime()[g].median_error == pytest.approx(value, abs=1e-9)
        got = _sixths(result.samples)
        for g, values in served["by_sixth"].items():
            assert got[g] == pytest.approx(values, abs=1e-9), (cid, g)


def _what_if(name: str, profile_for: Callable[[str, Path, dict], Path]) -> None:
    """recheck.json's ``errors_with_{name}_profile``: each committed config predicted with
    the profile ``profile_for(config id, its folder, its recheck row)`` returns, against its
    measured replay, computed again."""
    comp = json.loads((LOOP / "verify" / "comparison.json").read_text(encoding="utf-8"))
    recheck = json.loads((LOOP / "recheck.json").read_text(encoding="utf-8"))
    entries = {e.config_id: e for e in load_configs(TINY)}
    for c in comp["configs"]:
        cid = c["config_id"]
        cdir = LOOP / "verify" / cid
        row = recheck[cid]
        profile = profile_for(cid, cdir, row)
        state = json.loads((cdir / "done.json").read_text(encoding="utf-8"))
        result, _ = predict(entries[cid], int(state["engine_info"]["num_gpu_blocks"]), profile)
        ps = summarize(result.records)
        for key, value in row[f"errors_with_{name}_profile"].items():
            m, s = key.split(".")
            assert ps[m][s] / c["measured_summary"][m][s] - 1 == pytest.approx(value, abs=1e-6)


def test_committed_loop_without_the_api_servers_time(tmp_path: Path) -> None:
    """Each config predicted with the profile it was predicted with but no API-server time
    per request (frontend_s = 0, as every profile had before it was measured)."""
    import yaml

    def plain(cid: str, cdir: Path, row: dict) -> Path:
        doc = yaml.safe_load((cdir / "calibration" / "profile.yaml").read_text(encoding="utf-8"))
        # the profile's API-server time is the median of its bursts' (none: not measured)
        bursts = list((doc["provenance"].get("frontend_bursts") or {}).values())
        fe = doc["timing"]["profile"]["frontend_s"]
        assert row["frontend_s"] == fe == (pytest.approx(float(np.median(bursts)))
                                           if bursts else 0.0)
        doc["timing"]["profile"]["frontend_s"] = 0.0
        path = tmp_path / f"{cid}.yaml"
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        return path

    _what_if("no_frontend", plain)


def test_committed_loop_at_the_robust_level(tmp_path: Path) -> None:
    """Each config predicted with its profile's mean level taken off (every step time
    divided by provenance.level_factor)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("loop_run", LOOP / "run.py")
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)

    def robust(cid: str, cdir: Path, row: dict) -> Path:
        # the mean level sits above the robust fit's: the profiled steps' slow tail
        assert 1.0 < row["level_factor"] < 1.1
        path = tmp_path / f"{cid}.yaml"
        run._write_robust_level(cdir / "calibration" / "profile.yaml", path,
                                row["level_factor"])
        return path

    _what_if("robust_level", robust)


def test_committed_loop_with_the_host_time_one_constant(tmp_path: Path) -> None:
    """Each profile's host time between steps is the model its own profiling phases give
    (calibrate.profiling.host_gap_model on steps.phases.csv, exactly), and each config
    predicted with that replaced by the phases' median, one constant a step (as before the
    model)."""
    import importlib.util

    import yaml

    from calibrate.profiling import host_gap_model

    spec = importlib.util.spec_from_file_location("loop_run", LOOP / "run.py")
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)

    def constant(cid: str, cdir: Path, row: dict) -> Path:
        cal = cdir / "calibration"
        doc = yaml.safe_load((cal / "profile.yaml").read_text(encoding="utf-8"))
        host = host_gap_model(run._phases(cal / "steps.phases.csv"))
        assert host is not None and host.num_phases >= 15
        assert doc["provenance"]["host_step_gap_model"] == pytest.approx(host.to_dict())
        assert doc["timing"]["profile"]["per_context_token_s"] == pytest.approx(
            host.per_context_token_s)
        path = tmp_path / f"{cid}.yaml"
        assert run._write_constant_host_gap(cal / "profile.yaml", path)
        return path

    _what_if("constant_host_gap", constant)


def test_committed_loop_without_the_finish_cost(tmp_path: Path) -> None:
    """Each profile's finish_s is calibrate.fit.finish_cost on its own profiling rows and
    their events against the robust fit of those rows, exactly; and each config predicted
    with it 0 (as every profile had before it was measured)."""
    import yaml

    from calibrate import measurements
    from calibrate.fit import finish_cost, fit
    from calibrate.fit import predict as predict_rows
    from calibrate.profiling import read_events
    from sim.simulate import resolve

    entries = {e.config_id: e for e in load_configs(TINY)}

    def no_finish(cid: str, cdir: Path, row: dict) -> Path:
        cal = cdir / "calibration"
        doc = yaml.safe_load((cal / "profile.yaml").read_text(encoding="utf-8"))
        steps = measurements.read(cal / "steps.csv")
        ev = read_events(cal / "steps.csv", len(steps))
        assert ev is not None
        r = resolve(entries[cid].loaded)
        robust = fit(steps, r.model, r.gpu, 1, "bf16")
        got = finish_cost(steps["measured_s"].to_numpy(),
                          predict_rows(steps, r.model, r.gpu, 1, "bf16", robust.profile),
                          ev["phase"].to_numpy(), ev["finished"].to_numpy())
        assert got is not None
        stored = doc["provenance"]["finish_cost"]
        assert stored["lag_s"] == pytest.approx(got.lag_s)
        assert stored["num_events"] == got.num_events
        assert stored["finish_s"] == pytest.approx(got.finish_s)
        assert row["finish_s"] == doc["timing"]["profile"]["finish_s"] == pytest.approx(
            got.finish_s)
        doc["timing"]["profile"]["finish_s"] = 0.0
        path = tmp_path / f"{cid}.yaml"
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        return path

    _what_if("no_finish", no_finish)
