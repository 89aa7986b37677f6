"""Tests of `servetwin simulate`: a small run end to end, byte-identical reruns, and bad
input that ends in one `servetwin: error:` line, exit code 2 and no output folder."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import assume, given

from servetwin.cli import main
from servetwin.output import read_records
from sim.errors import ServetwinError
from sim.scenario import load_scenario
from sim.simulate import resolve
from tests.sim.test_scenario import AZURE_HEAD, SYNTHETIC, fuzz_settings, malformed_scenarios

TRACE_SCENARIO = f"""\
name: head
seed: 1
workload:
  trace: {AZURE_HEAD}
  max_requests: 200
model: meta-llama/Llama-3.1-8B
gpu: H100-SXM
cluster:
  num_workers: 2
"""


def synthetic_scenario(seed: int) -> str:
    doc = {
        "name": "synthetic",
        "seed": seed,
        "workload": {"synthetic": {**SYNTHETIC, "num_requests": 60,
                                   "output_tokens": {"kind": "uniform", "min_tokens": 5,
                                                     "max_tokens": 40}}},
        "model": "Qwen/Qwen3-8B",
        "gpu": "H100-SXM",
        "engine": {"max_num_seqs": 8, "num_gpu_blocks_override": 200},
        "cluster": {"num_workers": 2},
    }
    return yaml.safe_dump(doc, sort_keys=False)


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["simulate", *args])
    return code, out.getvalue(), err.getvalue()


def simulate_to(tmp_path: Path, text: str, out: str, *extra: str) -> Path:
    scenario = tmp_path / f"{out}.yaml"
    scenario.write_text(text)
    code, _, stderr = run_cli(str(scenario), "--out", str(tmp_path / out), *extra)
    assert code == 0, stderr
    return tmp_path / out


# -------------------------------------------------------------------------- a run


def test_small_run_end_to_end(tmp_path: Path) -> None:
    scenario = tmp_path / "head.yaml"
    scenario.write_text(TRACE_SCENARIO)
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(str(scenario), "--out", str(out))
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "records.parquet", "scenario.resolved.yaml", "steps.parquet", "summary.json"]
    assert stderr.startswith(
        "servetwin: head: 200 requests, 2 x meta-llama/Meta-Llama-3.1-8B on H100-SXM TP 1 "
        "(fast-forward)\n  KV cache: ")
    # the summary table
    for text in ("Requests", "  completed / total                 200 / 200", "latency (ms)",
                 "  TTFT", "  E2E",
                 f"wrote {out / 'records.parquet'}, {out / 'steps.parquet'}, "):
        assert text in stdout
    records = pq.read_table(out / "records.parquet").to_pydict()
    assert sorted(records["request_id"]) == list(range(200))  # one row per request
    assert sorted(set(records["worker_id"])) == [0, 1]
    # token times are written as step ranges into steps.parquet; read back, each
    # request has one per output token, the first at first_token_s, the last at finish_s
    back = read_records(out / "records.parquet")
    off, times = back.token_offsets, back.token_times_s
    assert np.diff(off).tolist() == records["num_output_tokens"]
    assert times[off[:-1]].tolist() == records["first_token_s"]
    assert times[off[1:] - 1].tolist() == records["finish_s"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["num_requests"], summary["num_completed"]) == (200, 200)
    resolved = yaml.safe_load((out / "scenario.resolved.yaml").read_text())
    assert resolved["scenario"]["cluster"]["num_workers"] == 2
    assert resolved["resolved"]["num_requests"] == 200
    assert resolved["resolved"]["engine"]["max_num_seqs"] == 1024  # auto on an H100


def test_csv_writes_records_csv(tmp_path: Path) -> None:
    out = simulate_to(tmp_path, TRACE_SCENARIO, "csv", "--csv")
    assert sorted(p.name for p in out.iterdir()) == [
        "records.csv", "scenario.resolved.yaml", "summary.json"]
    lines = (out / "records.csv").read_text().splitlines()
    assert lines[0].startswith("request_id,arrival_s,first_token_s,finish_s,")
    assert len(lines) == 1 + 200


# ------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_other_result(tmp_path: Path) -> None:
    a = simulate_to(tmp_path, synthetic_scenario(7), "a")
    b = simulate_to(tmp_path, synthetic_scenario(7), "b")
    c = simulate_to(tmp_path, synthetic_scenario(8), "c")
    for name in ("records.parquet", "steps.parquet", "summary.json", "scenario.resolved.yaml"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # the synthetic workload draws arrivals and lengths from the seed
    assert (a / "summary.json").read_bytes() != (c / "summary.json").read_bytes()
    assert (a / "records.parquet").read_bytes() != (c / "records.parquet").read_bytes()


def test_seed_does_not_matter_where_nothing_is_random(tmp_path: Path) -> None:
    # a replayed trace through round robin draws no random number
    a = simulate_to(tmp_path, TRACE_SCENARIO, "a")
    b = simulate_to(tmp_path, TRACE_SCENARIO.replace("seed: 1", "seed: 2"), "b")
    assert (a / "records.parquet").read_bytes() == (b / "records.parquet").read_bytes()
    assert (a / "summary.json").read_bytes() == (b / "summary.json").read_bytes()


# ------------------------------------------------------------------------ errors


def assert_one_line_error(code: int, stdout: str, stderr: str) -> str:
    assert code == 2, stderr
    assert stdout == ""
    assert stderr.startswith("servetwin: error: ") and stderr.endswith("\n"), stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    return stderr.removeprefix("servetwin: error: ").rstrip("\n")


def test_missing_scenario_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    message = assert_one_line_error(*run_cli(str(missing), "--out", str(tmp_path / "o")))
    assert message == f"{missing}: file not found. Fix: check the path"
    assert not (tmp_path / "o").exists()


def test_bad_set_names_set(tmp_path: Path) -> None:
    scenario = tmp_path / "s.yaml"
    scenario.write_text(TRACE_SCENARIO)
    out = tmp_path / "o"
    message = assert_one_line_error(*run_cli(str(scenario), "--out", str(out),
                                             "--set", "engine.max_num_seqs=0"))
    assert message == ("--set: engine.max_num_seqs = 0: must be >= 1. "
                       "Fix: set engine.max_num_seqs to an integer >= 1, or auto")
    assert not out.exists()


def test_unwritable_out_folder(tmp_path: Path) -> None:
    scenario = tmp_path / "s.yaml"
    scenario.write_text(TRACE_SCENARIO)
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, stderr = run_cli(str(scenario), "--out", str(blocker / "run"))
    assert code == 2 and stderr.count("\n") == 4  # three header lines, then the error
    assert "\n  timing: analytic prior (sim/timing.py TimingProfile defaults)\n" in stderr
    assert stderr.splitlines()[-1].startswith(
        f"servetwin: error: {blocker / 'run'}: cannot create the output folder (")
    assert "Fix: choose a writable --out or --reports folder" in stderr


_COUNTER = itertools.count()


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-fuzz")


@fuzz_settings(150)
@given(case=malformed_scenarios())
def test_malformed_scenarios_fail_cleanly_through_the_cli(
    cli_dir: Path, case: tuple[bytes, list[str]]
) -> None:
    data, overrides = case
    scenario = cli_dir / "fuzz.yaml"
    scenario.write_bytes(data)
    try:
        resolve(load_scenario(scenario, overrides))
    except ServetwinError:
        pass
    else:
        assume(False)  # the edits happened to be valid: a real run, not this test's business
    out = cli_dir / f"out-{next(_COUNTER)}"
    sets = [f"--set={o}" for o in overrides]  # `--set=` so that '-x=1' is not an option
    message = assert_one_line_error(*run_cli(str(scenario), "--out", str(out), *sets))
    assert message.startswith((f"{scenario}:", f"{scenario} ", "--set:", f"{AZURE_HEAD}"))
    assert not out.exists()  # no partial output
