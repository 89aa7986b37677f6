"""Tests of sim/scenario.py (and the checks `resolve` adds): every bad scenario ends in
one ServetwinError that names file:line (or --set), the field, the value, the rule and
the fix; a hypothesis test feeds malformed scenarios and lets no other exception out."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sim.errors import ConfigError, InputError, ScenarioError, ServetwinError
from sim.scenario import load_scenario
from sim.simulate import resolve

REPO = Path(__file__).resolve().parents[2]
AZURE_HEAD = REPO / "scenarios" / "traces" / "azure_conv_head.csv"

ENGINE_KEYS = (
    "block_size, enable_chunked_prefill, enable_prefix_caching, gpu_memory_utilization, kind, "
    "long_prefill_token_threshold, max_model_len, max_num_batched_tokens, max_num_seqs, "
    "num_gpu_blocks_override, scheduler_reserve_full_isl, tensor_parallel_size, watermark"
)
TOP_KEYS = ("cluster, disaggregation, dtype, engine, gpu, model, name, search, seed, "
            "simulation, timing, workload")

# Line numbers below refer to this text: 4 trace, 6 model, 7 gpu, 8 engine,
# 9 max_num_seqs, 10 cluster, 11 num_workers.
BASE = f"""\
name: t
seed: 1
workload:
  trace: {AZURE_HEAD}
  max_requests: 200
model: meta-llama/Llama-3.1-8B
gpu: H100-SXM
engine:
  max_num_seqs: 64
cluster:
  num_workers: 2
"""

SYNTHETIC = {
    "rate_per_s": 5,
    "num_requests": 20,
    "input_tokens": {"kind": "uniform", "min_tokens": 50, "max_tokens": 200},
    "output_tokens": {"kind": "fixed", "tokens": 10},
}


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def base_with(old: str, new: str) -> str:
    assert old in BASE
    return BASE.replace(old, new)


def error_of(path: Path, overrides: list[str] | None = None) -> ServetwinError:
    """The error that loading and resolving `path` ends in (it must end in one)."""
    with pytest.raises(ServetwinError) as info:
        resolve(load_scenario(path, overrides))
    return info.value


# --------------------------------------------------------------------------- valid


def test_base_scenario_loads_with_lines_and_resolves(tmp_path: Path) -> None:
    loaded = load_scenario(write(tmp_path, BASE))
    sc = loaded.scenario
    assert (sc.name, sc.seed, sc.engine.max_num_seqs, sc.cluster.num_workers) == ("t", 1, 64, 2)
    assert loaded.lines[("engine", "max_num_seqs")] == 9
    assert loaded.where("cluster", "num_workers") == f"{tmp_path / 's.yaml'}:11"
    resolved = resolve(loaded)
    assert len(resolved.trace) == 200
    assert resolved.engine.max_num_seqs == 64


@pytest.mark.parametrize("value", ["auto", "null"])
def test_auto_takes_the_vllm_start_up_defaults(tmp_path: Path, value: str) -> None:
    text = base_with(
        "  max_num_seqs: 64\n",
        f"  max_num_seqs: {value}\n  max_num_batched_tokens: {value}\n"
        f"  max_model_len: {value}\n",
    )
    loaded = load_scenario(write(tmp_path, text))
    e = loaded.scenario.engine
    assert (e.max_num_seqs, e.max_num_batched_tokens, e.max_model_len) == (None, None, None)
    engine = resolve(loaded).engine
    # H100 (80 GB, not an A100): vLLM's get_batch_defaults gives 1024 / 8192
    assert (engine.max_num_seqs, engine.max_num_batched_tokens) == (1024, 8192)
    assert engine.max_model_len == 131072  # Llama-3.1's max_position_embeddings


def test_overrides_apply_before_validation(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    sc = load_scenario(path, ["cluster.num_workers=4", "engine.max_num_seqs=auto",
                              "cluster.router.kind=round_robin", "simulation.fast_forward=false"])
    assert sc.scenario.cluster.num_workers == 4
    assert sc.scenario.engine.max_num_seqs is None
    assert sc.scenario.simulation.fast_forward is False
    assert load_scenario(path).scenario.cluster.num_workers == 2  # the file is unchanged


def test_synthetic_workload_resolves(tmp_path: Path) -> None:
    doc = yaml.safe_load(BASE)
    doc["workload"] = {"synthetic": SYNTHETIC}
    resolved = resolve(load_scenario(write(tmp_path, yaml.safe_dump(doc))))
    assert len(resolved.trace) == 20


def test_the_bundled_default_scenario_resolves() -> None:
    resolved = resolve(load_scenario(REPO / "scenarios" / "default.yaml"))
    assert resolved.loaded.scenario.cluster.num_workers == 8
    assert len(resolved.trace) == 12031


# -------------------------------------------------------------------- exact errors


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "modle: x\n")
    assert str(error_of(path)) == (
        f"{path}:12: unknown key 'modle'. Fix: remove it or use one of: {TOP_KEYS}"
    )


def test_unknown_nested_key(tmp_path: Path) -> None:
    path = write(tmp_path, base_with("max_num_seqs: 64", "max_num_seq: 64"))
    assert str(error_of(path)) == (
        f"{path}:9: unknown key 'engine.max_num_seq'. Fix: remove it or use one of: "
        f"{ENGINE_KEYS}"
    )


def test_unknown_key_two_levels_down(tmp_path: Path) -> None:
    path = write(tmp_path, base_with("  max_requests: 200\n",
                                     "  closed_loop:\n    concurency: 8\n"))
    assert str(error_of(path)) == (
        f"{path}:6: unknown key 'workload.closed_loop.concurency'. Fix: remove it or use one "
        "of: concurrency, num_requests"
    )


def test_unknown_key_named_like_a_type_keeps_its_name(tmp_path: Path) -> None:
    # pydantic puts union members ('int', 'str', ...) into error locations; a key
    # that happens to be called 'int' must still be reported as itself
    path = write(tmp_path, base_with("max_num_seqs: 64", "int: 64"))
    assert str(error_of(path)).startswith(f"{path}:9: unknown key 'engine.int'. Fix: ")


def test_out_of_range_names_line_field_value_rule_and_fix(tmp_path: Path) -> None:
    path = write(tmp_path, base_with("max_num_seqs: 64", "max_num_seqs: 0"))
    err = error_of(path)
    assert isinstance(err, ScenarioError) and isinstance(err, InputError)
    assert str(err) == (
        f"{path}:9: engine.max_num_seqs = 0: must be >= 1. "
        "Fix: set engine.max_num_seqs to an integer >= 1, or auto"
    )
    assert (err.where, err.message) == (f"{path}:9", "engine.max_num_seqs = 0: must be >= 1")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("  tensor_parallel_size: 65",
         "engine.tensor_parallel_size = 65: must be <= 64. "
         "Fix: set engine.tensor_parallel_size to an integer >= 1 and <= 64"),
        ("  gpu_memory_utilization: 0",
         "engine.gpu_memory_utilization = 0: must be > 0. "
         "Fix: set engine.gpu_memory_utilization to a number > 0 and <= 1"),
        ("  watermark: 1.0",
         "engine.watermark = 1.0: must be < 1. Fix: set engine.watermark to a number >= 0 and < 1"),
        ("  block_size: -16",
         "engine.block_size = -16: must be >= 1. "
         "Fix: set engine.block_size to an integer >= 1 and <= 4096"),
        ("  num_gpu_blocks_override: 1000000000000",
         "engine.num_gpu_blocks_override = 1000000000000: must be <= 10000000. "
         "Fix: set engine.num_gpu_blocks_override to an integer >= 2 and <= 10000000"),
        ("  max_num_seqs: true",
         "engine.max_num_seqs = True: must be a number, not true/false. "
         "Fix: set engine.max_num_seqs to an integer >= 1, or auto"),
        ("  max_num_seqs: 1.5",
         "engine.max_num_seqs = 1.5: must be a valid integer, got a number with a fractional "
         "part. Fix: set engine.max_num_seqs to an integer >= 1, or auto"),
        ("  gpu_memory_utilization: .nan",
         "engine.gpu_memory_utilization = nan: must be a finite number. "
         "Fix: set engine.gpu_memory_utilization to a number > 0 and <= 1"),
        ("  enable_prefix_caching: 1",
         "engine.enable_prefix_caching = 1: must be a valid boolean. "
         "Fix: set engine.enable_prefix_caching to true or false"),
        ("  kind: tgi",
         "engine.kind = 'tgi': must be one of vllm, sglang. "
         "Fix: set engine.kind to one of vllm, sglang"),
    ],
)
def test_engine_field_errors(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, base_with("  max_num_seqs: 64", line))
    assert str(error_of(path)) == f"{path}:9: {message}"


def test_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, base_with("num_workers: 2", 'num_workers: "many"'))
    assert str(error_of(path)) == (
        f"{path}:11: cluster.num_workers = 'many': must be a valid integer, unable to parse "
        "string as an integer. Fix: set cluster.num_workers to an integer >= 1 and <= 4096"
    )


def test_scalar_where_a_section_belongs(tmp_path: Path) -> None:
    path = write(tmp_path, base_with("engine:\n  max_num_seqs: 64\n", "engine: 64\n"))
    assert str(error_of(path)) == (
        f"{path}:8: engine = 64: must be a section of keys. "
        f"Fix: write engine: as key: value lines ({ENGINE_KEYS})"
    )


def test_missing_required_field(tmp_path: Path) -> None:
    path = write(tmp_path, base_with("model: meta-llama/Llama-3.1-8B\n", ""))
    assert str(error_of(path)) == f"{path}: model is missing. Fix: add model"


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, base_with("max_num_seqs: 64", "max_num_seqs: [64"))
    assert str(error_of(path)) == (
        f"{path}:10: not valid YAML (expected ',' or ']', but got ':'). "
        "Fix: fix the YAML syntax at that line"
    )


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    # PyYAML keeps the last of two equal keys: the first section would vanish silently
    path = write(tmp_path, BASE + "engine:\n  block_size: 32\n")
    assert str(error_of(path)) == (
        f"{path}:12: duplicate key 'engine' (first at line 8). Fix: keep one of them"
    )


def test_recursive_alias_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "timing: &t {profile: *t}\n")
    assert str(error_of(path)) == (
        f"{path}:12: timing.profile: an alias refers to itself. Fix: remove the recursive alias"
    )


def test_alias_bomb_is_rejected_quickly(tmp_path: Path) -> None:
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]"
              for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    path = write(tmp_path, "\n".join(lines) + "\n")  # 9^9 strings if expanded
    assert str(error_of(path)).startswith(f"{path}:1: unknown key 'a'. Fix: ")


@pytest.mark.parametrize(
    ("text", "kind"), [("- 1\n- 2\n", "list"), ("just text\n", "str"), ("", "NoneType")]
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = write(tmp_path, text)
    assert str(error_of(path)) == (
        f"{path}: top level is {kind}, not a mapping. "
        "Fix: write the scenario as key: value sections (workload, model, gpu, ...)"
    )


def test_missing_and_unreadable_scenario_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert str(error_of(missing)) == f"{missing}: file not found. Fix: check the path"
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00model")
    assert str(error_of(binary)) == (
        f"{binary}: cannot read (UnicodeDecodeError). Fix: give a UTF-8 YAML file"
    )


# ---------------------------------------------------------------------------- --set


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("engine",
         "--set: 'engine' is not key=value. Fix: write e.g. --set engine.max_num_seqs=64"),
        ("=3", "--set: '=3' is not key=value. Fix: write e.g. --set engine.max_num_seqs=64"),
        ("engine..block_size=3",
         "--set: 'engine..block_size=3' is not key=value. "
         "Fix: write e.g. --set engine.max_num_seqs=64"),
        ("engine.nope=1",
         f"--set: unknown key 'engine.nope'. Fix: remove it or use one of: {ENGINE_KEYS}"),
        ("nope.deeper=1",
         f"--set: unknown key 'nope'. Fix: remove it or use one of: {TOP_KEYS}"),
        ("engine.max_num_seqs=0",
         "--set: engine.max_num_seqs = 0: must be >= 1. "
         "Fix: set engine.max_num_seqs to an integer >= 1, or auto"),
        ("cluster.num_workers=many",
         "--set: cluster.num_workers = 'many': must be a valid integer, unable to parse string "
         "as an integer. Fix: set cluster.num_workers to an integer >= 1 and <= 4096"),
        ("model.name=x",
         "--set: model.name: model is not a section. "
         "Fix: override a field inside a section, e.g. engine.block_size"),
        ("workload.end_s=0",
         "--set: workload.end_s = 0: must be > 0. "
         "Fix: set workload.end_s to a number > 0 and <= 1000000000000"),
    ],
)
def test_set_errors_say_set(tmp_path: Path, override: str, message: str) -> None:
    assert str(error_of(write(tmp_path, BASE), [override])) == message


# ------------------------------------------------------------------------- workload


def test_both_trace_and_synthetic(tmp_path: Path) -> None:
    text = base_with("  max_requests: 200\n", "  synthetic: {rate_per_s: 5}\n")
    path = write(tmp_path, text)
    assert str(error_of(path)) == (
        f"{path}:5: workload: both trace and synthetic are given. Fix: keep one of them"
    )


def test_neither_trace_nor_synthetic(tmp_path: Path) -> None:
    path = write(tmp_path, base_with(f"  trace: {AZURE_HEAD}\n", ""))
    assert str(error_of(path)) == (
        f"{path}:3: workload: neither trace nor synthetic is given. "
        "Fix: set workload.trace to a trace file or workload.synthetic to a spec"
    )


def test_missing_trace_file_names_field_and_path(tmp_path: Path) -> None:
    path = write(tmp_path, base_with(str(AZURE_HEAD), "traces/nothere.csv"))
    assert str(error_of(path)) == (
        f"{path}:4: workload.trace = 'traces/nothere.csv': file not found "
        f"({tmp_path / 'traces' / 'nothere.csv'}). "
        "Fix: give a path relative to the scenario file or an absolute one"
    )


def test_trace_path_is_relative_to_the_scenario_file(tmp_path: Path) -> None:
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "head.csv").write_text(AZURE_HEAD.read_text())
    path = write(tmp_path, base_with(str(AZURE_HEAD), "traces/head.csv"))
    assert len(resolve(load_scenario(path)).trace) == 200


def test_window_must_be_ordered(tmp_path: Path) -> None:
    path = write(tmp_path, base_with("  max_requests: 200\n", "  start_s: 10\n  end_s: 5\n"))
    assert str(error_of(path)) == (
        f"{path}:6: workload.end_s = 5: must be > workload.start_s = 10. Fix: widen the window"
    )


def synthetic_scenario(tmp_path: Path, synthetic: dict[str, Any]) -> Path:
    text = base_with(f"  trace: {AZURE_HEAD}\n  max_requests: 200\n",
                     "  synthetic:\n" + "".join(f"    {k}: {v}\n" for k, v in synthetic.items()))
    return write(tmp_path, text)


def test_synthetic_spec_errors_name_the_line(tmp_path: Path) -> None:
    # lines: 4 synthetic, 5 rate_per_s, 6 num_requests, 7 input_tokens, 8 output_tokens
    spec = {"rate_per_s": 5, "num_requests": 20, "input_tokens": 100,
            "output_tokens": "{kind: fixed, tokens: -3}"}
    path = synthetic_scenario(tmp_path, spec)
    assert str(error_of(path)) == (
        f"{path}:8: workload.synthetic.output_tokens.tokens = -3: must be an integer in "
        "[1, 10000000]. Fix: set tokens to a whole number in that range"
    )
    path = synthetic_scenario(tmp_path, {**spec, "output_tokens": 10, "rate": 5})
    err = error_of(path)
    assert str(err).startswith(f"{path}:9: workload.synthetic.rate: unknown key. Fix: valid keys")
    del spec["input_tokens"]
    path = synthetic_scenario(tmp_path, spec)
    assert str(error_of(path)) == (
        f"{path}:4: workload.synthetic.input_tokens is missing. Fix: add input_tokens"
    )


# Errors that surface from resolve rather than from loading. The four tests below fail
# until sim/simulate.py (load_workload: name the workload field of a failed trace
# operation, and check is_file()) and sim/workload/laws.py (length_spec: hash `kind`
# only when it is a string) are fixed; they are not this module's to change.


def test_empty_synthetic_window_names_the_scenario(tmp_path: Path) -> None:
    doc = yaml.safe_load(BASE)
    doc["workload"] = {"synthetic": SYNTHETIC, "start_s": 5000}  # 20 requests end in ~4 s
    path = write(tmp_path, yaml.safe_dump(doc, sort_keys=False))
    err = str(error_of(path))
    assert err.startswith(f"{path}:") and "workload.start_s" in err, err


def test_output_scale_overflow_names_the_field(tmp_path: Path) -> None:
    doc = yaml.safe_load(BASE)
    doc["workload"] = {"synthetic": {**SYNTHETIC, "output_tokens": 5000}, "output_scale": 10000}
    path = write(tmp_path, yaml.safe_dump(doc, sort_keys=False))
    err = str(error_of(path))
    assert err.startswith(f"{path}:") and "workload.output_scale" in err, err


def test_trace_that_is_a_directory_names_the_scenario(tmp_path: Path) -> None:
    path = write(tmp_path, base_with(str(AZURE_HEAD), "."))
    err = str(error_of(path))
    assert err.startswith(f"{path}:4: workload.trace = '.': "), err


def test_unhashable_length_kind_is_an_error(tmp_path: Path) -> None:
    path = synthetic_scenario(tmp_path, {"rate_per_s": 5, "num_requests": 20,
                                         "input_tokens": "{kind: [], tokens: 5}",
                                         "output_tokens": 10})
    assert str(error_of(path)).startswith(f"{path}:7: workload.synthetic.input_tokens = ")


def test_empty_names_are_errors(tmp_path: Path) -> None:
    path = write(tmp_path, base_with(str(AZURE_HEAD), "''"))
    assert str(error_of(path)) == (
        f"{path}:4: workload.trace = '': must have at least 1 character. "
        "Fix: set workload.trace to text"
    )


# ------------------------------------------------------------ model, GPU, engine fit


def test_unknown_model_lists_the_bundled_ones(tmp_path: Path) -> None:
    path = write(tmp_path, base_with("meta-llama/Llama-3.1-8B", "meta-llama/Llama-9"))
    err = error_of(path)
    assert isinstance(err, ScenarioError)
    assert str(err).startswith(
        f"{path}:6: model = 'meta-llama/Llama-9': not a bundled model and no such file. "
        "Fix: use one of "
    )
    assert "meta-llama/Meta-Llama-3.1-8B" in err.fix and "Qwen/Qwen3-8B" in err.fix
    assert err.fix.endswith("or the path of a config.json")


def test_unknown_gpu_lists_the_bundled_ones(tmp_path: Path) -> None:
    path = write(tmp_path, base_with("gpu: H100-SXM", "gpu: H800"))
    err = error_of(path)
    assert str(err).startswith(
        f"{path}:7: gpu = 'H800': not a bundled GPU and no such file. Fix: use one of "
    )
    assert "H100-SXM" in err.fix and "A100-SXM-80GB" in err.fix


def test_bad_model_file_names_both_files(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    path = write(tmp_path, base_with("meta-llama/Llama-3.1-8B", str(bad)))
    assert str(error_of(path)).startswith(f"{path}:6: model = '{bad}': {bad}:1: not valid JSON")


def test_tp_must_divide_the_heads(tmp_path: Path) -> None:
    path = write(tmp_path, base_with("  max_num_seqs: 64\n", "  tensor_parallel_size: 3\n"))
    err = error_of(path)
    assert isinstance(err, ScenarioError)
    assert str(err).startswith(f"{path}:8: engine.tensor_parallel_size = 3: ")
    assert "32 attention heads" in str(err) and "Fix: choose a TP size" in str(err)


def test_model_that_does_not_fit_is_a_config_error_with_a_fix(tmp_path: Path) -> None:
    text = base_with("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-70B")
    path = write(tmp_path, text.replace("H100-SXM", "A100-SXM-80GB"))
    err = error_of(path)
    assert isinstance(err, ConfigError)
    assert str(err).startswith(
        f"{path}:8: no memory left for the KV cache on A100-SXM-80GB at TP 1 ("
    )
    assert str(err).endswith(
        "Fix: use more GPUs per worker (TP), a larger GPU, fp8 weights, or a higher "
        "gpu_memory_utilization"
    )


def test_max_model_len_beyond_the_kv_cache(tmp_path: Path) -> None:
    path = write(tmp_path, base_with("max_num_seqs: 64",
                                     "max_num_seqs: 64\n  num_gpu_blocks_override: 100\n"
                                     "  max_model_len: 4096"))
    err = error_of(path)
    assert isinstance(err, ConfigError)
    assert str(err).startswith(
        f"{path}:8: engine.max_model_len = 4096 needs 256 KV blocks but only 99 fit "
    )
    assert "Fix: lower max_model_len" in str(err)


def test_router_kind_and_parameters(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "  router: {kind: least_loaded}\n")
    assert str(error_of(path)) == (
        f"{path}:12: cluster.router.kind = 'least_loaded': unknown router kind "
        "'least_loaded'. Fix: use one of: kv_aware, least_outstanding_requests, "
        "least_outstanding_tokens, power_of_two, random, round_robin, session_affinity"
    )
    path = write(tmp_path, BASE + "  router: {kind: round_robin, overlap_weight: 1}\n")
    assert str(error_of(path)) == (
        f"{path}:12: cluster.router (round_robin): got an unexpected keyword argument "
        "'overlap_weight'. Fix: check the router's parameters"
    )


def test_timing_profile_coefficients(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "timing:\n  profile: {gemm_eff: 0.5}\n")
    err = error_of(path)
    assert str(err).startswith(f"{path}:13: timing.profile: unknown coefficient(s) gemm_eff.")


# ------------------------------------------------------------ malformed, generated

# Values that are wrong somewhere: wrong types, signs, magnitudes and spellings.
BAD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10_000, 10_000),
    st.sampled_from([0, -1, 2**31, 2**63, -(2**63), 10**30, 10_000_001, 0.0, -0.0, 1e308,
                     -1e-300, "auto", "", "1e9", "many", "-5", "null", "~", "0x10"]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(-3, 3), max_size=2),
)
KEYS = st.one_of(
    st.text(min_size=1, max_size=12),
    st.sampled_from(["max_num_seq", "num_worker", "Model", "trace ", "kind", "<<", "seed"]),
)


def base_doc(kind: str) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "h",
        "seed": 3,
        "workload": {"trace": str(AZURE_HEAD), "max_requests": 50, "start_s": 0.0,
                     "time_scale": 1.0, "output_scale": 1.0},
        "model": "Qwen/Qwen3-0.6B",
        "gpu": "H100-SXM",
        "dtype": "bf16",
        "engine": {"tensor_parallel_size": 1, "max_num_seqs": "auto", "block_size": 16,
                   "gpu_memory_utilization": 0.9, "enable_prefix_caching": True,
                   "num_gpu_blocks_override": None, "max_model_len": 8192},
        "timing": {"profile": {"gemm_compute_eff": 0.7}},
        "cluster": {"num_workers": 2, "router": {"kind": "round_robin"}},
        "simulation": {"fast_forward": True},
    }
    if kind == "synthetic":
        doc["workload"] = {"synthetic": copy.deepcopy(SYNTHETIC), "start_s": 0.0,
                           "closed_loop": {"concurrency": 4}}
    if kind == "sessions":
        doc["workload"] = {"synthetic": {
            "rate_per_s": 2.0, "arrival": "gamma", "burstiness": 0.5,
            "input_tokens": {"kind": "lognormal", "mean_tokens": 300, "sigma": 0.5},
            "output_tokens": 20,
            "prefix": {"num_groups": 3, "prefix_tokens": 1024, "distribution": "zipf",
                       "zipf_exponent": 1.2},
            "sessions": {"num_sessions": 5, "turns_per_session": 3, "user_tokens": 50,
                         "think_time_s": 2.0, "think_time_kind": "exponential"},
        }}
    return doc


def node_paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += node_paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += node_paths(v, (*path, i))
    return out


def mutate(draw: Any, doc: dict[str, Any]) -> None:
    """One random edit in place: replace a value, add an unknown key, or drop a key."""
    paths = [p for p in node_paths(doc) if p]
    path = draw(st.sampled_from(paths))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    op = draw(st.sampled_from(["replace", "add", "drop"]))
    if op == "replace":
        parent[path[-1]] = draw(BAD_VALUES)
    elif op == "add":
        sections = [p for p in node_paths(doc) if isinstance(_get(doc, p), dict)]
        _get(doc, draw(st.sampled_from(sections)))[draw(KEYS)] = draw(BAD_VALUES)
    elif isinstance(parent, dict):
        del parent[path[-1]]


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        doc = doc[k]
    return doc


@st.composite
def malformed_scenarios(draw: Any) -> tuple[bytes, list[str]]:
    """(file bytes, --set overrides): a valid scenario with 1-3 edits, maybe then
    truncated or spliced with junk; or plain random bytes."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=200)), []
    doc = base_doc(draw(st.sampled_from(["trace", "synthetic", "sessions"])))
    for _ in range(draw(st.integers(1, 3))):
        mutate(draw, doc)
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    edit = draw(st.sampled_from(["none", "none", "truncate", "junk_line"]))
    if edit == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif edit == "junk_line":
        lines = text.splitlines(keepends=True)
        i = draw(st.integers(0, len(lines)))
        lines.insert(i, draw(st.text(max_size=20)) + "\n")
        text = "".join(lines)
    overrides: list[str] = []
    if draw(st.integers(0, 4)) == 0:
        key = ".".join(draw(st.lists(st.sampled_from(["engine", "cluster", "workload",
                                                      "max_num_seqs", "num_workers", "x"]),
                                     min_size=1, max_size=3)))
        overrides.append(f"{key}={draw(st.text(max_size=8))}")
    return text.encode("utf-8", "surrogatepass"), overrides


def fails_cleanly(path: Path, data: bytes, overrides: list[str]) -> bool:
    """False if the scenario loads and resolves (the edits happened to be valid); True if
    it raises a one-line ServetwinError that says where (the scenario file, --set, or for
    a problem inside it the trace file) and the fix. Any other exception escapes."""
    path.write_bytes(data)
    try:
        resolve(load_scenario(path, overrides))
    except ServetwinError as e:
        text = str(e)
        assert text.startswith((f"{path}:", f"{path} ", "--set:", f"{AZURE_HEAD}")), text
        assert "Traceback" not in text and "\n" not in text.strip(), text
        assert "Fix: " in text, text
        return True
    return False


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scenario-fuzz")


# derandomize: CI sees the same 1,000 cases every run (32,000 random ones passed once
# the fixes named above were in)
def fuzz_settings(max_examples: int) -> settings:
    """Derandomized: CI sees the same malformed cases every run."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@fuzz_settings(1000)
@given(case=malformed_scenarios())
def test_malformed_scenarios_end_in_servetwin_errors(
    fuzz_dir: Path, case: tuple[bytes, list[str]]
) -> None:
    data, overrides = case
    # valid edits are skipped, so the 1,000 examples are 1,000 malformed scenarios
    assume(fails_cleanly(fuzz_dir / "fuzz.yaml", data, overrides))
