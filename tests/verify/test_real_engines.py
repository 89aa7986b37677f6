"""The verify stage end to end against REAL engines on this machine's CPU.

vLLM 0.32.0's own OpenAI server (CPU build) serving the tiny random-weight Llama, and
llama.cpp's llama-server serving the same shape as GGUF, both built by verify.testbed
(cached per machine; the first run on a fresh machine builds them, ~7 min). Each test
deploys the engine as a real process, replays a slice of the real Mooncake trace scaled to
the tiny engine, scrapes /metrics, simulates the same replay and compares.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from sim.scenario import Scenario
from sim.simulate import resolve
from verify import testbed
from verify.deploy import Deployment, group_members
from verify.engines import EngineInstall, render
from verify.loadgen import PlannedRequest, run_replay
from verify.records import read_records
from verify.run import VerifyOptions, load_configs, trace_prefix_tokens, verify

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "scenarios" / "verify" / "tiny_vllm_cpu.yaml"
pytestmark = pytest.mark.slow

# 15 s of the Mooncake conversation trace with the most prefix reuse inside it (9 % of its
# hash blocks repeat an earlier request's prefix), at twice its rate: 53 requests
SLICE = ["workload.start_s=1605", "workload.end_s=1620"]
# the reference replay of reports/loop-tiny-vllm-cpu, its whole minute (218 requests)
LOOP_SLICE: list[str] = []
# the calibrate issue's bounds on predicted / measured - 1
P50_BOUND, P90_BOUND = 0.10, 0.15


def engine_processes(marker: str) -> list[int]:
    """Live processes whose command line mentions ``marker`` (a model path)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmd and state != "Z":
            out.append(int(pid))
    return out


@pytest.fixture(scope="session")
def vllm_bed() -> tuple[testbed.VllmTestbed, Path]:
    vllm = testbed.ensure_vllm()
    return vllm, testbed.ensure_tiny_hf(vllm=vllm)


@pytest.fixture(scope="session")
def llama_bed() -> tuple[testbed.LlamaCppTestbed, Path]:
    return testbed.ensure_llamacpp(), testbed.ensure_tiny_gguf()


def check_run(out: Path, n_configs: int, n_requests: int = 53) -> list[dict]:
    comp = json.loads((out / "comparison.json").read_text())
    assert len(comp["configs"]) == n_configs
    for c in comp["configs"]:
        assert c["num_requests"] == n_requests and c["num_excluded"] == 0, c["exclusions"]
        checks = {k["name"]: k for k in c["checks"]}
        # the engine's own accounting equals the sum over the measured records, exactly
        for name in ("prompt tokens", "output tokens", "request lengths"):
            assert checks[name]["passed"], checks[name]
        summary = json.loads((out / c["config_id"] / "replay_summary.json").read_text())
        assert summary["num_ok"] == n_requests and summary["num_error"] == 0
    assert (out / "report.html").stat().st_size > 10_000
    return list(comp["configs"])


def test_verify_on_real_vllm_cpu(vllm_bed: tuple[testbed.VllmTestbed, Path],
                                 tmp_path: Path) -> None:
    vllm, model = vllm_bed
    opts = VerifyOptions(engine="vllm", model_path=str(model), served_model_name="tiny",
                         install=EngineInstall(python=str(vllm.python), env=vllm.env,
                                               nice=10),
                         base_port=18311, overrides=SLICE, ready_timeout_s=400,
                         only=["seqs4-mbt1024", "seqs16-mbt2048"])
    verify(TINY, tmp_path, opts)
    configs = check_run(tmp_path, 2)
    for c in configs:
        checks = {k["name"]: k for k in c["checks"]}
        hits = checks["prefix-cache hit rate"]
        assert hits["passed"], hits
        # the replay really induced prefix reuse, and the engine saw it
        counters = c["engine_counters"]
        assert counters["prefix_cache_hits"] > 0
        rows = read_records(tmp_path / c["config_id"] / "records.jsonl")
        assert sum(r["num_cached_tokens"] for r in rows) == counters["prefix_cache_hits"]
        # ... and no more than the trace's shared prefixes allow (timing lowers it a bit)
        trace = resolve(load_configs(TINY, SLICE)[0].loaded).trace
        bound = trace_prefix_tokens(trace, 32)
        assert 0.8 * bound <= counters["prefix_cache_hits"] <= bound
        predicted = c["scalars"]["prefix_cache_hit_rate"]["predicted"]
        measured = c["scalars"]["prefix_cache_hit_rate"]["measured"]
        assert measured == pytest.approx(predicted, abs=0.02)
    assert engine_processes(str(model)) == []


def _run_loop(vllm: testbed.VllmTestbed, model: Path, out: Path, recheck: bool = True
              ) -> dict:
    """verify --calibrate-first [--recheck-after] on seqs8 into ``out``; its comparison."""
    cpus = os.sched_getaffinity(0)
    two = len(cpus) >= 2
    opts = VerifyOptions(engine="vllm", model_path=str(model), served_model_name="tiny",
                         install=EngineInstall(
                             python=str(vllm.python), env=vllm.env,
                             cpus=(min(cpus),) if two else tuple(sorted(cpus)),
                             core_cpus=(max(cpus),) if two else ()),
                         base_port=18341, overrides=LOOP_SLICE, ready_timeout_s=400,
                         only=["seqs8-mbt512"], calibrate_plan="default",
                         recheck_after=recheck)
    if two:
        os.sched_setaffinity(0, {max(cpus)})
    try:
        verify(TINY, out, opts)
    finally:
        os.sched_setaffinity(0, cpus)
    (c,) = check_run(out, 1, 218)
    return c


@pytest.fixture(scope="module")
def calibrated_loop(vllm_bed: tuple[testbed.VllmTestbed, Path],
                    tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    """One run of the calibrate loop on seqs8, shared by the tests below: verify profiles
    the engine it just started (calibrate.profiling's default plan, a workload the replay
    never sends), fits that engine's profile from those steps alone, replays the trace on
    the same engine and predicts it with that profile, compares the replay's own steps with
    the profile, then profiles the engine once more after the replay (--recheck-after).
    The CPUs are arranged as in reports/loop-tiny-vllm-cpu/run.py: the engine's API
    server and model worker on the first, its EngineCore (which spins while the worker
    computes) and the load generator on the last. Returns (out dir, its comparison,
    model path)."""
    vllm, model = vllm_bed
    out = tmp_path_factory.mktemp("loop")
    return out, _run_loop(vllm, model, out), model


def test_verify_calibrating_each_engine_first(calibrated_loop: tuple[Path, dict, Path]
                                             ) -> None:
    """Every part of the loop ran on the real engine and joined every step: the profiling
    before and after the replay, the fit, the replay's own steps against the profile."""
    tmp_path, c, model = calibrated_loop
    cal = tmp_path / "seqs8-mbt512" / "calibration"
    text = (cal / "profiling.txt").read_text()
    assert " 0 dropped" in text, text
    doc = yaml.safe_load((cal / "profile.yaml").read_text())
    assert doc["provenance"]["engine_version"] == "0.32.0"
    # the host time between steps, by the step's sequences and their context
    # (calibrate.profiling.host_gap_model), added to the profile the twin predicted with
    host = doc["provenance"]["host_step_gap_model"]
    assert host["num_phases"] >= 15 and 0 < host["step_s"] < 0.02, host
    prof = doc["timing"]["profile"]
    assert prof["per_context_token_s"] == pytest.approx(host["per_context_token_s"])
    assert prof["per_seq_overhead_s"] >= host["per_seq_s"]
    assert 0 < doc["provenance"]["host_step_gap_median_s"] < 0.02
    # the profile the twin predicted with carries how far apart the API server handed the
    # bursts' requests to the engine: their median, or 0 where every burst was taken in
    # one request at a time (no spacing to measure)
    bursts = list((doc["provenance"].get("frontend_bursts") or {}).values())
    frontend = doc["timing"]["profile"]["frontend_s"]
    assert frontend == (pytest.approx(float(np.median(bursts))) if bursts else 0.0)
    assert 0 <= frontend < 0.05
    # every batch of decoders went out behind its hold and decoded as a batch
    assert "one at a time" not in text, text
    assert any("fitted on this deployment" in n for n in c["notes"])
    # the second profiling run reads the log from after the replay's last step line on:
    # every step joins (a line number off by one would drop nearly all of them)
    after = cal / "after"
    text = (after / "profiling.txt").read_text()
    assert " 0 dropped" in text, text
    done = json.loads((tmp_path / "seqs8-mbt512" / "done.json").read_text())
    recheck = done["recheck"]
    drift_doc = json.loads((after / "drift.json").read_text())
    assert recheck["num_steps"] == drift_doc["num_steps"] > 1000
    assert set(drift_doc["regimes"]) == {"prefill", "decode", "mixed", "all"}
    # the host wanders by 10-30 % between launches, less on one engine within minutes
    assert abs(recheck["median_error"]) < 0.5, recheck
    assert any("profiled again after the replay" in n for n in c["notes"])
    # the replay's own steps, joined with the requests sent: every one of them
    served = done["served"]
    assert served["num_rows"] == served["num_steps"] > 500 and not served["dropped"], served
    assert set(served["by_regime"]) >= {"decode", "mixed", "all"}
    assert len(served["by_sixth"]["decode"]) == 6 and None not in served["by_sixth"]["all"]
    assert 0 < served["host_gap_s"] < 0.05 and served["host_gap_profiled_s"] > 0
    # the same per decode step from the token times (a request's chunks are its tokens),
    # in the profiling run and in the replay
    # (negative where the API server fell behind and the client got tokens in bunches)
    assert served["host_gap_client_steps"] > 300
    assert abs(served["host_gap_client_s"]) < 0.05
    assert abs(served["host_gap_client_profiled_s"]) < 0.05
    assert {int(n) for n in served["host_gap_client_by_batch"]} <= set(range(1, 9))
    assert (cal / "served" / "drift.txt").is_file()
    assert any("the replay's own steps" in n for n in c["notes"])
    assert engine_processes(str(model)) == []


# A replay is a valid measurement of the twin when the engine ran its steps at the speed it
# was profiled at: all the replay's own steps (joined with their batches) within this of
# the time the twin gives them (done.json served.total_error). Set from the nine config
# runs with the finish cost of 2026-11-28, before the runs it has judged since: the three
# misses had +5.7, +6.0 and +9.6 %, the six passes -3.0 ... +2.1 %
# (reports/loop-tiny-vllm-cpu/README.md).
STEP_LEVEL_BOUND = 0.05
ATTEMPTS = 3


def _errors(c: dict) -> dict[str, float]:
    return {f"{m} {s}": c["predicted_summary"][m][s] / c["measured_summary"][m][s] - 1
            for m in ("ttft_s", "tpot_s") for s in ("p50", "p90")}


@pytest.mark.bench
def test_calibrated_loop_within_the_issues_bounds(
        calibrated_loop: tuple[Path, dict, Path], vllm_bed: tuple[testbed.VllmTestbed, Path],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """The calibrate issue's bounds (p50 within 10 %, p90 within 15 %) on the live replay of
    the loop above (seqs8, the whole reference minute: 218 Mooncake requests), predicted
    from the profile of the same engine measured before the replay.

    The bounds are asserted on the first valid replay: one whose engine ran its own steps
    within STEP_LEVEL_BOUND of the time the twin gives those very steps (the replay's steps
    joined with their batches, calibration/served). On the 2-core VM the engine's speed
    moves by 5-10 % between launches and, now and then, between its profiling and its
    replay a minute later (the replay's steps then ran +5.7 to +9.6 % long in all, in three
    config runs of nine on 2026-11-28, and the twin missed by 11-16 %): no prediction made
    from the profile could follow that, and such a replay is measured again, up to ATTEMPTS
    replays, each on a fresh engine (without the profiling after the replay). A valid
    replay outside the bounds fails at once, and so do ATTEMPTS invalid ones; a timing
    model wrong on the replay's steps makes every replay invalid, so it fails too. The
    failure message carries every attempt's errors, the replay's step errors by regime and
    sixth, and the engine's drift across it (where profiled).

    A benchmark, `python -m pytest -m bench -k issues_bounds
    tests/verify/test_real_engines.py` (~3.5 min a replay), not in CI: in CI on 2026-11-28 it
    passed on its first replay twice, passed after one re-measure once, and once found all
    three replays invalid (all their steps -5.6, +7.1 and +5.3 % against the twin's time
    for them; the engine decoded 13-20 % faster, then 5-18 % slower than profiled), which
    failed CI after 20 minutes."""
    vllm, model = vllm_bed
    tmp_path, c, _ = calibrated_loop
    attempts = []
    for i in range(ATTEMPTS):
        if i:
            # measured again without the profiling after the replay (35 s), which the
            # bounds do not read
            tmp_path = tmp_path_factory.mktemp("loop-again")
            c = _run_loop(vllm, model, tmp_path, recheck=False)
        done = json.loads((tmp_path / "seqs8-mbt512" / "done.json").read_text())
        served, recheck = done["served"], done.get("recheck")
        level = served["total_error"]
        attempts.append({"errors": _errors(c), "replay's steps in all": level,
                         "by regime": served["by_regime"],
                         "decode by sixth": served["by_sixth"]["decode"],
                         "engine drift across the replay": recheck and (
                             recheck["median_error"] - recheck["median_error_before"])})
        if abs(level) <= STEP_LEVEL_BOUND:
            break
    else:
        pytest.fail(f"the engine's steps moved beyond {STEP_LEVEL_BOUND:.0%} of the profile "
                    f"in each of {ATTEMPTS} replays: {attempts}")
    bounds = {"p50": P50_BOUND, "p90": P90_BOUND}
    errors = attempts[-1]["errors"]
    print(f"\nissue's bounds: {len(attempts)} replay(s): {attempts}")
    assert all(abs(e) <= bounds[k.split()[1]] for k, e in errors.items()), attempts


def test_verify_on_real_llama_server(llama_bed: tuple[testbed.LlamaCppTestbed, Path],
                                     tmp_path: Path) -> None:
    llama, gguf = llama_bed
    opts = VerifyOptions(engine="llamacpp", model_path=str(gguf), served_model_name="tiny",
                         install=EngineInstall(llama_server=str(llama.server)),
                         base_port=18321, overrides=SLICE, ready_timeout_s=60)
    verify(ROOT / "scenarios" / "verify" / "tiny_llamacpp_cpu.yaml", tmp_path, opts)
    check_run(tmp_path, 2)
    assert engine_processes(str(gguf)) == []


def test_real_engine_killed_mid_replay(llama_bed: tuple[testbed.LlamaCppTestbed, Path],
                                       tmp_path: Path) -> None:
    """SIGKILL the engine while streams are open: finished records stay, the rest are
    recorded with a connection error, the replay returns, nothing is left running."""
    llama, gguf = llama_bed
    sc = Scenario.model_validate({"workload": {"trace": "x"}, "model": "servetwin/tiny-llama-4l",
                                  "gpu": "CPU", "engine": {"max_num_seqs": 4,
                                                           "max_model_len": 2048}})
    spec = render("llamacpp", sc, str(gguf), port=18331, served_model_name="tiny",
                  install=EngineInstall(llama_server=str(llama.server)))
    plan = [PlannedRequest(i, 0.05 * i, list(range(400 + i, 464 + i)),
                           8 if i < 4 else 400) for i in range(12)]
    with Deployment(spec, tmp_path / "engine.log", ready_timeout_s=60) as d:
        pgid = d.pgid
        assert pgid is not None
        killer = threading.Timer(2.0, os.killpg, (pgid, signal.SIGKILL))
        killer.start()
        summary = run_replay(plan, [spec.base_url], "tiny", tmp_path, force_close=True,
                             stall_timeout_s=30)
        killer.join()
    rows = read_records(tmp_path / "records.jsonl")
    assert sorted(r["request_id"] for r in rows) == list(range(12))  # one record each
    ok = [r for r in rows if r["status"] == "ok"]
    bad = [r for r in rows if r["status"] == "error"]
    assert {r["request_id"] for r in ok} >= {0, 1, 2, 3}  # short ones finished before
    assert bad and all(r["error"] for r in bad)
    assert all(("connection" in r["error"]) or ("refused" in r["error"]) or
               ("disconnected" in r["error"]) for r in bad), [r["error"] for r in bad]
    assert summary.num_ok == len(ok) and summary.num_error == len(bad)
    assert group_members(pgid) == []
