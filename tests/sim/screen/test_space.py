"""Tests of the search section: each invalid space ends in one error that names the
field and the fix (from parse_search and from `servetwin screen`); what a range or
log_range expands to, computed by hand; grid order and config ids."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from servetwin.cli import main
from sim.errors import ScenarioError
from sim.screen.space import SearchSpec, apply, config_id, parse_search

REPO = Path(__file__).resolve().parents[3]
AZURE_HEAD = REPO / "scenarios" / "traces" / "azure_conv_head.csv"
BASE: dict[str, Any] = {"name": "tiny", "seed": 0,
                        "workload": {"trace": str(AZURE_HEAD), "max_requests": 40},
                        "model": "meta-llama/Llama-3.1-8B", "gpu": "H100-SXM"}
ENGINE_FIELDS = ("block_size, enable_chunked_prefill, enable_prefix_caching, "
                 "gpu_memory_utilization, kind, long_prefill_token_threshold, max_model_len, "
                 "max_num_batched_tokens, max_num_seqs, num_gpu_blocks_override, "
                 "scheduler_reserve_full_isl, tensor_parallel_size, watermark")
SCENARIO_FIELDS = ("cluster, disaggregation, dtype, engine, gpu, model, name, seed, simulation, "
                   "timing, workload")
OBJECTIVES = ", ".join(f"{m}.{p}" for m in ("ttft_s", "tpot_s", "itl_s", "e2e_s")
                       for p in ("mean", "p50", "p90", "p99"))
RANGE_RULE = ("must be [start, stop, step] integers with step > 0 and stop >= start. "
              "Fix: e.g. {range: [2048, 16384, 2048]} (stop included)")
LOG_RULE = ("want two integers 1 <= lo <= hi and num >= 1. "
            "Fix: e.g. {log_range: [32, 1024], num: 6}")
NOT_A_SPEC = ("not a list, range or log_range. Fix: write [a, b, c], "
              "{range: [start, stop, step]} or {log_range: [lo, hi], num: n}")


def make_raw(search: Any = None, **base: Any) -> dict[str, Any]:
    raw = {**BASE, **base}
    if search is not None:
        raw["search"] = search
    return raw


def parse(space: dict[str, Any], **search: Any) -> SearchSpec:
    return parse_search(make_raw({"space": space, **search}), "s.yaml")


def error_of(raw: dict[str, Any]) -> str:
    with pytest.raises(ScenarioError) as e:
        parse_search(raw, "s.yaml")
    return str(e.value)


WORKERS = {"cluster.num_workers": [1, 2]}

# (search section, the whole message)
INVALID = {
    "unknown field": (
        {"space": {"engine.max_num_seq": [8, 16]}},
        "s.yaml: search.space.engine.max_num_seq: no such scenario field. Fix: did you mean "
        f"engine.max_num_seqs? engine's fields: {ENGINE_FIELDS}"),
    "unknown section": (
        {"space": {"enigne.max_num_seqs": [8, 16]}},
        "s.yaml: search.space.enigne.max_num_seqs: no such scenario field. Fix: did you mean "
        f"engine.max_num_seqs? the scenario's sections and fields: {SCENARIO_FIELDS}"),
    "a key below a leaf": (
        {"space": {"cluster.num_workers.max": [1]}},
        "s.yaml: search.space.cluster.num_workers.max: no such scenario field. Fix: did you "
        "mean cluster.num_workers? cluster's fields: num_workers, offload, planner, router"),
    "nothing near": (
        {"space": {"colour": ["red"]}},
        "s.yaml: search.space.colour: no such scenario field. Fix: use a dotted scenario "
        f"field; the scenario's sections and fields: {SCENARIO_FIELDS}"),
    "empty list": (
        {"space": {**WORKERS, "engine.max_num_seqs": []}},
        "s.yaml: search.space.engine.max_num_seqs: empty list. Fix: give at least one value"),
    "repeated value": (
        {"space": {"cluster.num_workers": [1, 2, 1]}},
        "s.yaml: search.space.cluster.num_workers: repeated values [1, 2, 1]. Fix: list each "
        "candidate once"),
    "value invalid for its field": (
        {"space": {"engine.max_num_seqs": [0, 8]}},
        "s.yaml: search.space.engine.max_num_seqs: value 0: engine.max_num_seqs = 0: must be "
        ">= 1. Fix: set engine.max_num_seqs to an integer >= 1, or auto"),
    "value of the wrong type": (
        {"space": {"engine.enable_prefix_caching": [True, "sometimes"]}},
        "s.yaml: search.space.engine.enable_prefix_caching: value 'sometimes': "
        "engine.enable_prefix_caching = 'sometimes': must be a valid boolean. Fix: set "
        "engine.enable_prefix_caching to true or false"),
    "TP not dividing the heads": (
        {"space": {"engine.tensor_parallel_size": [1, 3]}},
        "s.yaml: search.space.engine.tensor_parallel_size: value 3: tp = 3 does not divide "
        "the 32 attention heads of meta-llama/Meta-Llama-3.1-8B; pick a divisor. Fix: use TP "
        "sizes that divide meta-llama/Meta-Llama-3.1-8B's 32 heads"),
    "TP against a swept model": (
        {"space": {"model": ["meta-llama/Llama-3.1-8B"], "engine.tensor_parallel_size": [6]}},
        "s.yaml: search.space.engine.tensor_parallel_size: value 6: tp = 6 does not divide "
        "the 32 attention heads of meta-llama/Meta-Llama-3.1-8B; pick a divisor. Fix: use TP "
        "sizes that divide meta-llama/Meta-Llama-3.1-8B's 32 heads"),
    "range backwards": (
        {"space": {"engine.max_num_batched_tokens": {"range": [4096, 2048, 1024]}}},
        f"s.yaml: search.space.engine.max_num_batched_tokens.range = [4096, 2048, 1024]: "
        f"{RANGE_RULE}"),
    "range step 0": (
        {"space": {"engine.max_num_batched_tokens": {"range": [2048, 4096, 0]}}},
        f"s.yaml: search.space.engine.max_num_batched_tokens.range = [2048, 4096, 0]: "
        f"{RANGE_RULE}"),
    "range of floats": (
        {"space": {"engine.gpu_memory_utilization": {"range": [0.5, 0.9, 0.1]}}},
        f"s.yaml: search.space.engine.gpu_memory_utilization.range = [0.5, 0.9, 0.1]: "
        f"{RANGE_RULE}"),
    "range without a step": (
        {"space": {"engine.max_num_seqs": {"range": [8, 64]}}},
        f"s.yaml: search.space.engine.max_num_seqs.range = [8, 64]: {RANGE_RULE}"),
    "log_range from 0": (
        {"space": {"engine.max_num_seqs": {"log_range": [0, 64], "num": 3}}},
        f"s.yaml: search.space.engine.max_num_seqs: log_range [0, 64], num 3: {LOG_RULE}"),
    "log_range backwards": (
        {"space": {"engine.max_num_seqs": {"log_range": [64, 8]}}},
        f"s.yaml: search.space.engine.max_num_seqs: log_range [64, 8], num 5: {LOG_RULE}"),
    "log_range num 0": (
        {"space": {"engine.max_num_seqs": {"log_range": [8, 64], "num": 0}}},
        f"s.yaml: search.space.engine.max_num_seqs: log_range [8, 64], num 0: {LOG_RULE}"),
    "a bare value": (
        {"space": {"engine.max_num_seqs": 8}},
        f"s.yaml: search.space.engine.max_num_seqs = 8: {NOT_A_SPEC}"),
    "a misspelt range": (
        {"space": {"engine.max_num_seqs": {"rnage": [8, 64, 8]}}},
        f"s.yaml: search.space.engine.max_num_seqs = {{'rnage': [8, 64, 8]}}: {NOT_A_SPEC}"),
    "range with num": (
        {"space": {"engine.max_num_seqs": {"range": [8, 64, 8], "num": 3}}},
        "s.yaml: search.space.engine.max_num_seqs = {'range': [8, 64, 8], 'num': 3}: "
        f"{NOT_A_SPEC}"),
    "grid too large": (
        {"space": {"cluster.num_workers": {"range": [1, 101, 1]},
                   "engine.max_num_seqs": {"range": [1, 101, 1]},
                   "engine.block_size": {"range": [1, 101, 1]}}},
        "s.yaml: search.space: the grid has 1,030,301 configs. Fix: narrow the space below "
        "1,000,000 or use strategy: optuna"),
    "unknown strategy": (
        {"strategy": "random", "space": WORKERS},
        "s.yaml: search.strategy = 'random': unknown. Fix: use one of: grid, optuna"),
    "unknown SLO metric": (
        {"space": WORKERS, "slo": {"ttfb_s": {"p90": 1.0}}},
        "s.yaml: search.slo.ttfb_s: unknown metric. Fix: use one of: ttft_s, tpot_s, itl_s, "
        "e2e_s"),
    "unknown SLO percentile": (
        {"space": WORKERS, "slo": {"ttft_s": {"p95": 1.0}}},
        "s.yaml: search.slo.ttft_s.p95: unknown percentile. Fix: use one of: mean, p50, p90, "
        "p99"),
    "negative SLO bound": (
        {"space": WORKERS, "slo": {"ttft_s": {"p90": -0.5}}},
        "s.yaml: search.slo.ttft_s.p90 = -0.5: must be seconds > 0. Fix: give the bound in "
        "seconds"),
    "zero SLO bound": (
        {"space": WORKERS, "slo": {"tpot_s": {"p99": 0}}},
        "s.yaml: search.slo.tpot_s.p99 = 0: must be seconds > 0. Fix: give the bound in "
        "seconds"),
    "SLO bound true": (
        {"space": WORKERS, "slo": {"tpot_s": {"p99": True}}},
        "s.yaml: search.slo.tpot_s.p99 = True: must be seconds > 0. Fix: give the bound in "
        "seconds"),
    "SLO without percentiles": (
        {"space": WORKERS, "slo": {"ttft_s": 2.0}},
        "s.yaml: search.slo.ttft_s = 2.0: not a mapping. Fix: write percentile: seconds, "
        "e.g. {p90: 2.0}"),
    "unknown objective": (
        {"space": WORKERS, "objective": "ttft_s.p95"},
        f"s.yaml: search.objective = 'ttft_s.p95': unknown latency metric. Fix: use one of: "
        f"{OBJECTIVES}"),
    "throughput as objective": (
        {"space": WORKERS, "objective": "output_throughput_tokens_per_s"},
        "s.yaml: search.objective = 'output_throughput_tokens_per_s': unknown latency "
        f"metric. Fix: use one of: {OBJECTIVES}"),
    "missing space": (
        {"slo": {"ttft_s": {"p90": 1.0}}},
        "s.yaml: search.space: missing or empty. Fix: map at least one scenario field to its "
        "candidate values"),
    "empty space": (
        {"space": {}},
        "s.yaml: search.space: missing or empty. Fix: map at least one scenario field to its "
        "candidate values"),
    "unknown search key": (
        {"space": WORKERS, "budget": 8},
        "s.yaml: search.budget: unknown key. Fix: use one of: budget_gpus, cost_per_gpu_hour, "
        "objective, seed, shortlist, slo, space, strategy, trials"),
    "budget 0": (
        {"space": WORKERS, "budget_gpus": 0},
        "s.yaml: search.budget_gpus = 0: must be an integer >= 1. Fix: set search.budget_gpus "
        "to a whole number"),
    "shortlist as text": (
        {"space": WORKERS, "shortlist": "five"},
        "s.yaml: search.shortlist = 'five': must be an integer >= 1. Fix: set "
        "search.shortlist to a whole number"),
    "negative price": (
        {"space": WORKERS, "cost_per_gpu_hour": {"H100-SXM": -2}},
        "s.yaml: search.cost_per_gpu_hour.H100-SXM = -2: must be a number >= 0. Fix: give "
        "dollars per GPU-hour"),
}


@pytest.mark.parametrize(("search", "message"), list(INVALID.values()), ids=list(INVALID))
def test_invalid_search_sections_name_the_field_and_the_fix(search, message):
    assert error_of(make_raw(search)) == message


def test_no_search_section():
    assert error_of(make_raw()) == ("s.yaml: search: missing or not a mapping. Fix: add a "
                                    "`search:` section with at least `space:` (see docs)")
    assert error_of(make_raw([1, 2])).startswith("s.yaml: search: missing or not a mapping.")


# ------------------------------------------------------------- expansion
@pytest.mark.parametrize(("spec", "values"), [
    ({"range": [2048, 16384, 2048]}, (2048, 4096, 6144, 8192, 10240, 12288, 14336, 16384)),
    ({"range": [1, 10, 4]}, (1, 5, 9)),  # the stop is included only when a step lands on it
    ({"range": [5, 5, 1]}, (5,)),
    # 32 x 32^(i/5) = 32 x 2^i
    ({"log_range": [32, 1024], "num": 6}, (32, 64, 128, 256, 512, 1024)),
    # 10 x 2^(i/4) = 10, 11.89, 14.14, 16.82, 20: rounded
    ({"log_range": [10, 20], "num": 5}, (10, 12, 14, 17, 20)),
    # 4^(i/5) = 1, 1.32, 1.74, 2.30, 3.03, 4: rounded, repeats dropped, so 4 values not 6
    ({"log_range": [1, 4], "num": 6}, (1, 2, 3, 4)),
    # 1000^(1/3) is 9.999999999999998 in floating point: still 10
    ({"log_range": [1, 1000], "num": 4}, (1, 10, 100, 1000)),
    ({"log_range": [16, 256]}, (16, 32, 64, 128, 256)),  # num defaults to 5
    ({"log_range": [48, 4096], "num": 1}, (48,)),
    ([256, 64, 128], (256, 64, 128)),  # a list keeps its order
])
def test_range_and_log_range_expand_by_hand(spec, values):
    assert parse({"engine.max_num_seqs": spec}).space == {"engine.max_num_seqs": values}


def test_grid_order_is_the_yaml_order_first_field_slowest():
    spec = parse({"cluster.num_workers": [1, 2],
                  "engine.max_num_seqs": {"log_range": [16, 64], "num": 3},
                  "engine.enable_prefix_caching": [True, False]})
    assert spec.grid_size == 12
    grid = spec.grid()
    assert [tuple(p.values()) for p in grid] == [
        (1, 16, True), (1, 16, False), (1, 32, True), (1, 32, False), (1, 64, True),
        (1, 64, False),
        (2, 16, True), (2, 16, False), (2, 32, True), (2, 32, False), (2, 64, True),
        (2, 64, False)]
    assert all(list(p) == ["cluster.num_workers", "engine.max_num_seqs",
                           "engine.enable_prefix_caching"] for p in grid)
    assert len({config_id(p) for p in grid}) == 12


def test_parsed_defaults_and_values():
    spec = parse({"engine.tensor_parallel_size": [1, 2, 4, 8]}, budget_gpus=8,
                 slo={"ttft_s": {"p90": 2}, "tpot_s": {"p99": 0.05}},
                 objective="e2e_s.p50", cost_per_gpu_hour={"H100-SXM": 2},
                 shortlist=3, seed=0)
    assert (spec.strategy, spec.budget_gpus, spec.objective, spec.shortlist, spec.seed) == \
        ("grid", 8, "e2e_s.p50", 3, 0)
    assert spec.slo == {"ttft_s": {"p90": 2.0}, "tpot_s": {"p99": 0.05}}
    assert spec.cost_per_gpu_hour["H100-SXM"] == 2.0
    assert spec.cost_per_gpu_hour["H200-SXM"] == 3.79  # the defaults stay for other GPUs
    assert spec.base == BASE and "search" not in spec.base
    bare = parse(WORKERS)
    assert (bare.strategy, bare.budget_gpus, bare.slo, bare.objective, bare.shortlist,
            bare.trials, bare.seed) == ("grid", None, {}, "ttft_s.p90", 5, 100, 0)


def test_router_parameters_and_free_form_maps_are_fields():
    spec = parse({"cluster.router.kind": ["round_robin"],
                  "timing.profile.step_overhead_s": [0.001, 0.002]})
    assert spec.grid_size == 2
    scenario = apply(spec.base, spec.grid()[1])
    assert scenario["timing"] == {"profile": {"step_overhead_s": 0.002}}
    assert scenario["cluster"] == {"router": {"kind": "round_robin"}}
    assert BASE.get("timing") is None  # apply copies: the base is untouched


# -------------------------------------------------------------- config id
def test_config_id_is_stable():
    knobs = {"cluster.num_workers": 2, "engine.tensor_parallel_size": 1}
    # pinned: a resumed sweep finds its finished configs by this id, across versions
    assert config_id(knobs) == "445b7acab5e9"
    text = b'{"cluster.num_workers":2,"engine.tensor_parallel_size":1}'
    assert config_id(knobs) == hashlib.sha1(text).hexdigest()[:12]
    assert config_id(dict(reversed(knobs.items()))) == "445b7acab5e9"  # key order: no matter
    assert config_id({**knobs, "cluster.num_workers": 4}) != "445b7acab5e9"
    assert config_id({"engine.max_num_seqs": 64}) == "d19a6e7152e3"


# -------------------------------------------------------------- the CLI
def write_screen(tmp_path: Path, raw: Any, name: str = "screen.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False),
                    encoding="utf-8")
    return path


def run_main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


TYPO_IN_BASE = f"""\
name: typo
workload:
  trace: {AZURE_HEAD}
engine:
  max_num_seq: 8
model: meta-llama/Llama-3.1-8B
gpu: H100-SXM
search:
  space:
    cluster.num_workers: [1, 2]
"""

# (file, extra arguments, the error line)
BAD_SCREENS = {
    "unknown field": (make_raw({"space": {"engine.max_num_seq": [8]}}), (),
                      INVALID["unknown field"][1]),
    "empty list": (make_raw(INVALID["empty list"][0]), (), INVALID["empty list"][1]),
    "TP": (make_raw(INVALID["TP not dividing the heads"][0]), (),
           INVALID["TP not dividing the heads"][1]),
    "no search": (make_raw(), (), "s.yaml: search: missing or not a mapping. Fix: add a "
                  "`search:` section with at least `space:` (see docs)"),
    # the base scenario is checked first, with its line, not blamed on a swept field
    "typo in the base": (TYPO_IN_BASE, (), "s.yaml:5: unknown key 'engine.max_num_seq'. "
                         f"Fix: remove it or use one of: {ENGINE_FIELDS}"),
    "bad YAML": ("name: x\nsearch: [\n", (), "s.yaml:3: not valid YAML (expected the node "
                 "content, but found '<stream end>'). Fix: fix the YAML syntax at that line"),
    "workers 0": (make_raw({"space": WORKERS}), ("--workers", "0"),
                  "--workers: 0: must be >= 1. Fix: give a process count, or leave it out "
                  "for one per core"),
    "budget 0": (make_raw({"space": WORKERS}), ("--budget", "0"),
                 "--budget: 0: must be >= 1. Fix: give a GPU count"),
}


@pytest.mark.parametrize(("raw", "extra", "message"), list(BAD_SCREENS.values()),
                         ids=list(BAD_SCREENS))
def test_screen_on_an_invalid_file_exits_2_with_one_error_line(tmp_path, monkeypatch, raw,
                                                               extra, message):
    monkeypatch.chdir(tmp_path)
    write_screen(tmp_path, raw, "s.yaml")
    code, out, err = run_main("screen", "s.yaml", "--out", "run", "--quiet", *extra)
    assert (code, out, err) == (2, "", f"servetwin: error: {message}\n")
    assert not (tmp_path / "run").exists()


def test_screen_errors_reach_the_shell_without_a_traceback(tmp_path):
    # the real entry point, as a user runs it: exit status 2, one stderr line
    for name, (raw, _, message) in (("tp", BAD_SCREENS["TP"]),
                                    ("yaml", BAD_SCREENS["bad YAML"])):
        path = write_screen(tmp_path, raw, "s.yaml")
        done = subprocess.run([sys.executable, "-m", "servetwin", "screen", "s.yaml", "--out",
                               str(tmp_path / name)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, check=False)
        assert (done.returncode, done.stdout, done.stderr) == \
            (2, "", f"servetwin: error: {message}\n"), name
        assert path.exists() and not (tmp_path / name).exists()


def test_simulate_accepts_a_screening_scenario_and_ignores_search(tmp_path):
    plain = make_raw(workload={"trace": str(AZURE_HEAD), "max_requests": 40})
    # a search section that screen would refuse: simulate does not look at it
    screening = make_raw({"space": {"engine.max_num_seq": []}, "slo": {"x": 1}},
                         workload=plain["workload"])
    summaries = []
    for name, raw in (("plain", plain), ("screening", screening)):
        path = write_screen(tmp_path, raw, f"{name}.yaml")
        code, _, err = run_main("simulate", str(path), "--out", str(tmp_path / name))
        assert code == 0, err
        summaries.append(json.loads((tmp_path / name / "summary.json").read_text()))
    assert summaries[0] == summaries[1]
    assert summaries[0]["num_requests"] == 40
