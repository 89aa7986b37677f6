"""The verify pipeline on a real HTTP server without a heavy engine: `servetwin verify
--endpoints` against a twin-serve process, and the config file's error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from servetwin.cli import main
from sim.errors import InputError
from verify.run import load_configs, trace_prefix_tokens
from verify.twin_server import TwinProcess

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "scenarios" / "verify" / "tiny_vllm_cpu.yaml"


def test_bundled_verify_configs_load_with_ids_and_labels() -> None:
    entries = load_configs(TINY)
    assert [e.config_id for e in entries] == ["seqs4-mbt1024", "seqs16-mbt2048", "seqs8-mbt512"]
    assert entries[1].label == ("1x TP1, max_num_seqs=16, max_num_batched_tokens=2048, "
                                "num_gpu_blocks_override=2048")
    one = load_configs(TINY, ["engine.max_num_seqs=2"])
    assert {e.loaded.scenario.engine.max_num_seqs for e in one} == {2}


def test_sglang_configs_are_labelled_and_refused_on_vllm_before_any_deploy(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("workload: {trace: %s}\nmodel: servetwin/tiny-llama-4l\ngpu: CPU\n"
                 "engine: {kind: sglang, max_running_requests: 8, page_size: 16}\n"
                 % (ROOT / "scenarios/traces/mooncake_conversation.jsonl.gz"))
    (entry,) = load_configs(p)
    assert entry.label == "1x TP1 SGLang, max_running_requests=8"
    code = main(["verify", str(p), "--engine", "vllm", "--model-path", "/nowhere",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0
    assert "config config0: engine.kind is sglang" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "config0").exists()  # refused before deploying


@pytest.mark.parametrize(("args", "match"), [
    (["--engine", "llamacpp"], "--calibrate-first: --engine llamacpp: profiling in place "
     "reads vLLM's step log"),
    (["--endpoints", "http://127.0.0.1:9"], "--calibrate-first: with --endpoints"),
    (["--profile", "p.yaml"], "--profile: given with --calibrate-first"),
])
def test_calibrate_first_refuses_what_it_cannot_profile_before_any_deploy(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
        match: str) -> None:
    code = main(["verify", str(TINY), "--model-path", "/nowhere", "--calibrate-first",
                 "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert code != 0
    assert match in err and "Traceback" not in err
    assert not (tmp_path / "out" / "seqs4-mbt1024").exists()


def test_recheck_after_needs_calibrate_first(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["verify", str(TINY), "--model-path", "/nowhere", "--recheck-after",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "--recheck-after: given without --calibrate-first" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("text", "match"), [
    ("configs: []\n", "configs: must be a non-empty list"),
    ("configs:\n  - 3\n", r"configs\[0\]: is int, not a mapping"),
    ("configs:\n  - scenario: {model: x}\n", r"configs\[0\].*workload"),
    ("- {workload: {trace: t.jsonl}, model: servetwin/tiny-llama-4l, gpu: CPU}\n"
     "- {workload: {trace: t.jsonl}, model: servetwin/tiny-llama-4l, gpu: CPU,"
     " config_id: config0}\n", "config_id values repeat"),
    ("42\n", "top level is int"),
])
def test_bad_config_files_name_the_entry(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "s.yaml"
    p.write_text(text)
    with pytest.raises(InputError, match=match):
        load_configs(p)


def test_verify_attached_to_a_twin_server_end_to_end(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Attach mode: the engine runs already (here the twin, timed by the simulator itself
    with the same tiny model on the CPU prior), the pipeline replays, scrapes, predicts,
    compares and writes the report; the twin's counters must equal the records."""
    scenario = tmp_path / "s.yaml"
    scenario.write_text(
        "workload: {trace: %s, start_s: 600, end_s: 612, input_scale: 0.03125,"
        " output_scale: 0.125}\n"
        "model: servetwin/tiny-llama-4l\ngpu: CPU\n"
        "engine: {max_num_seqs: 8, max_num_batched_tokens: 1024, block_size: 16,"
        " num_gpu_blocks_override: 4096}\n" % (ROOT / "scenarios/traces/"
                                             "mooncake_conversation.jsonl.gz"))
    twin = TwinProcess("--model", "servetwin", "--sim-model", "servetwin/tiny-llama-4l",
                       "--gpu", "CPU",
                       "--max-num-seqs", "8", "--max-num-batched-tokens", "1024",
                       "--num-gpu-blocks", "4096", "--block-size", "16")
    try:
        code = main(["verify", str(scenario), "--endpoints", twin.url, "--out",
                     str(tmp_path / "out"), "--warmup", "1", "--scrape-interval", "0.2"])
    finally:
        twin.stop()
    assert code == 0
    out = tmp_path / "out"
    comp = json.loads((out / "comparison.json").read_text())
    (c,) = comp["configs"]
    assert c["num_requests"] > 20 and c["num_excluded"] == 0
    checks = {k["name"]: k for k in c["checks"]}
    assert checks["prompt tokens"]["passed"] and checks["output tokens"]["passed"]
    assert (out / "config0" / "metrics.jsonl").stat().st_size > 0
    assert "ttft p50 (ms)" in capsys.readouterr().out
    assert (out / "report.html").is_file()


def test_trace_prefix_tokens_counts_leading_seen_blocks_in_whole_kv_blocks() -> None:
    from sim.workload import Trace

    # 16-token hash blocks; request 1 repeats request 0's two blocks then diverges,
    # request 2 repeats one block, request 3 repeats all 3 blocks of a 40-token prompt
    trace = Trace.checked(arrival_s=[0, 1, 2, 3], input_tokens=[40, 40, 20, 40],
                          output_tokens=[1, 1, 1, 1], hash_offsets=[0, 3, 6, 8, 11],
                          hash_ids=[0, 1, 2, 0, 1, 5, 0, 7, 0, 1, 2], hash_block_tokens=16)
    # block 16: 0 + 32 + 16 + min(48, 39) -> 32 (whole blocks) = 80
    assert trace_prefix_tokens(trace, 16) == 80
    # block 32: 0 + 32 + 0 + 32 = 64
    assert trace_prefix_tokens(trace, 32) == 64


def test_served_step_errors_by_sixth_show_a_trend() -> None:
    import pandas as pd

    from verify.run import _sixths

    # 60 steps: decode steps drifting from -6 % to +6 %, a mixed step every fifth, flat
    err = [0.0 if i % 5 == 0 else -0.06 + 0.12 * i / 59 for i in range(60)]
    samples = pd.DataFrame({"error": err,
                            "regime": ["mixed" if i % 5 == 0 else "decode" for i in range(60)]})
    got = _sixths(samples)
    assert len(got["decode"]) == len(got["all"]) == 6
    assert got["decode"] == sorted(got["decode"])  # rising, sixth by sixth
    assert got["decode"][0] == pytest.approx(-0.06 + 0.12 * 4.5 / 59, abs=0.01)
    # a regime with no steps in a sixth is None, not 0
    assert _sixths(samples.iloc[:6])["decode"][0] is None


def test_busy_wall_time_is_the_union_of_request_spans() -> None:
    from calibrate.profiling import Sent
    from verify.run import _busy_wall_s, _first_replay_step

    recs = [{"send_s": 0.0, "finish_s": 1.0}, {"send_s": 0.5, "finish_s": 1.5},
            {"send_s": 3.0, "finish_s": 3.25}, {"send_s": 3.1, "finish_s": 3.2},
            {"send_s": 4.0, "finish_s": None}]  # failed before it finished: not counted
    assert _busy_wall_s(recs) == pytest.approx(1.5 + 0.25)
    import pandas as pd

    # two warm-up requests of 4 prompt tokens and 3 outputs: 8 + 2 + 2 tokens, then the
    # replay's steps
    steps = pd.DataFrame({"num_prefill_tokens": [8, 0, 0, 16, 0],
                          "num_decode_seqs": [0, 2, 2, 0, 1]})
    assert _first_replay_step([Sent(4, 3), Sent(4, 3)], steps) == 3


def test_fit_in_place_adds_the_host_time_as_profiled(tmp_path: Path) -> None:
    """The host time between step lines goes into the fitted profile as measured: by the
    step's sequences and context where the profiling modelled it (host_gap_model), else
    as one constant a step; provenance says which, and drift takes off exactly that."""
    import pandas as pd
    import yaml

    from calibrate.drift import logged_time_profile
    from calibrate.profile import load_profile
    from calibrate.profiling import HostGap
    from verify.run import fit_in_place

    rows = pd.read_csv(ROOT / "reports" / "loop-tiny-vllm-cpu" / "verify" / "seqs8-mbt512" /
                       "calibration" / "steps.csv")
    steps = [tmp_path / "steps.csv"]
    rows.iloc[::16].to_csv(steps[0], index=False)  # every regime, a sixteenth of the rows
    entry = next(e for e in load_configs(TINY) if e.config_id == "seqs8-mbt512")
    bare, _, n = fit_in_place(entry, steps, None, tmp_path / "bare.yaml", "test")
    const, _, _ = fit_in_place(entry, steps, 1e-3, tmp_path / "const.yaml", "test")
    host = HostGap(6e-4, 3e-5, 1.2e-7, 21, 2e-4)
    model, _, _ = fit_in_place(entry, steps, 1e-3, tmp_path / "model.yaml", "test", host=host)
    assert n > 100
    p0, _ = load_profile(bare)
    p1, m1 = load_profile(const)
    p2, m2 = load_profile(model)
    assert p1.step_overhead_s == pytest.approx(p0.step_overhead_s + 1e-3)
    assert m1["provenance"]["host_step_gap_s"] == 1e-3
    assert p2.step_overhead_s == pytest.approx(p0.step_overhead_s + 6e-4)
    assert p2.per_seq_overhead_s == pytest.approx(p0.per_seq_overhead_s + 3e-5)
    assert p2.per_context_token_s == pytest.approx(1.2e-7)
    prov = m2["provenance"]
    assert prov["host_step_gap_model"]["per_context_token_s"] == 1.2e-7
    assert prov["host_step_gap_median_s"] == 1e-3 and "host_step_gap_s" not in prov
    for prof, meta in ((p1, m1), (p2, m2)):
        logged, note = logged_time_profile(prof, meta)
        assert note and logged.to_dict() == pytest.approx(p0.to_dict())
    assert yaml.safe_load(model.read_text())["timing"]["profile"]["per_context_token_s"] > 0


def test_fit_in_place_measures_the_finish_cost_from_the_rows_events(tmp_path: Path) -> None:
    """With the profiling's events beside its rows, the steps after a finish are measured
    (calibrate.fit.finish_cost) and carried as finish_s, and the mean level leaves them
    out; rows without events give finish_s 0."""
    import numpy as np
    import pandas as pd

    from calibrate.fit import finish_lags
    from calibrate.fit import predict as predict_rows
    from calibrate.profile import load_profile
    from calibrate.profiling import EVENT_COLUMNS, events_path
    from sim.simulate import resolve
    from verify.run import fit_in_place

    rows = pd.read_csv(ROOT / "reports" / "loop-tiny-vllm-cpu" / "verify" / "seqs8-mbt512" /
                       "calibration" / "steps.csv").iloc[::4].reset_index(drop=True)
    entry = next(e for e in load_configs(TINY) if e.config_id == "seqs8-mbt512")
    steps = [tmp_path / "steps.csv"]
    rows.to_csv(steps[0], index=False)
    bare, _, _ = fit_in_place(entry, steps, None, tmp_path / "bare.yaml", "test")
    assert load_profile(bare)[0].finish_s == 0.0
    assert "finish_cost" not in load_profile(bare)[1]["provenance"]
    # one request in ten steps finishes; the step after each runs 3 ms longer
    phase = np.arange(len(rows)) // 100
    finished = (np.arange(len(rows)) % 10 == 0).astype(int)
    after = finish_lags(phase, finished, 1)[:, 0]
    rows["measured_s"] += 3e-3 * after
    rows.to_csv(steps[0], index=False)
    pd.DataFrame({"phase": phase, "finished": finished}, columns=list(EVENT_COLUMNS)).to_csv(
        events_path(steps[0]), index=False)
    path, _, _ = fit_in_place(entry, steps, None, tmp_path / "finish.yaml", "test")
    prof, meta = load_profile(path)
    assert prof.finish_s == pytest.approx(3e-3, abs=5e-4)
    assert meta["provenance"]["finish_cost"]["num_events"] == int(after.sum())
    # the level is of the steps less the charges: the totals agree
    r = resolve(entry.loaded)
    pred = predict_rows(rows, r.model, r.gpu, 1, "bf16", prof)
    assert pred.sum() + prof.finish_s * after.sum() == pytest.approx(
        rows["measured_s"].sum(), rel=2e-3)
