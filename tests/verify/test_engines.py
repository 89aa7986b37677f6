"""The launch commands rendered from a scenario: exact argument lists per engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from sim.errors import ConfigError, InputError
from sim.scenario import Scenario
from verify.engines import EngineInstall, render


def make_scenario(**engine: object) -> Scenario:
    return Scenario.model_validate({
        "workload": {"trace": "t.jsonl"}, "model": "servetwin/tiny-llama-4l", "gpu": "CPU",
        "engine": {"kind": "vllm", **engine}})


def test_vllm_command_carries_every_modelled_knob() -> None:
    sc = make_scenario(max_num_seqs=8, max_num_batched_tokens=512,
                       num_gpu_blocks_override=1024, enable_prefix_caching=False,
                       long_prefill_token_threshold=64,
                       max_model_len=2048, watermark=0.01, scheduler_reserve_full_isl=False)
    spec = render("vllm", sc, "/m", port=8123, install=EngineInstall(python="/venv/python"))
    assert spec.argv == [
        "/venv/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m",
        "--served-model-name", "servetwin", "--host", "127.0.0.1", "--port", "8123",
        "--tensor-parallel-size", "1", "--block-size", "16", "--enable-chunked-prefill",
        "--no-enable-prefix-caching", "--enable-prompt-tokens-details", "--dtype", "bfloat16",
        "--max-num-seqs", "8",
        "--max-num-batched-tokens", "512", "--max-model-len", "2048",
        "--num-gpu-blocks-override", "1024", "--long-prefill-token-threshold", "64",
        "--no-scheduler-reserve-full-isl", "--watermark", "0.01"]
    assert spec.env["VLLM_SERVER_DEV_MODE"] == "1"  # for POST /reset_prefix_cache
    assert spec.health_url == "http://127.0.0.1:8123/health"
    assert spec.metrics_url == "http://127.0.0.1:8123/metrics"


def test_vllm_auto_knobs_are_left_to_the_engine_and_memory_share_is_passed() -> None:
    spec = render("vllm", make_scenario(gpu_memory_utilization=0.5), "/m", port=1,
                  iteration_log=True)
    assert "--max-num-seqs" not in spec.argv and "--max-num-batched-tokens" not in spec.argv
    i = spec.argv.index("--gpu-memory-utilization")
    assert spec.argv[i + 1] == "0.5"
    assert spec.argv[-2:] == ["--enable-logging-iteration-details", "--no-async-scheduling"]


def test_sglang_command_maps_knobs_to_its_own_names() -> None:
    sc = make_scenario(max_num_seqs=32, max_num_batched_tokens=4096, num_gpu_blocks_override=100,
                       enable_prefix_caching=False, tensor_parallel_size=2, block_size=1)
    spec = render("sglang", sc, "/m", port=30000)
    a = spec.argv
    assert a[1:3] == ["-m", "sglang.launch_server"]
    pairs = {a[i]: a[i + 1] for i in range(len(a) - 1) if a[i].startswith("--")}
    assert pairs["--tp-size"] == "2"
    assert pairs["--max-running-requests"] == "32"
    assert pairs["--chunked-prefill-size"] == "4096"
    assert pairs["--max-prefill-tokens"] == "4096"
    assert pairs["--max-total-tokens"] == "100"  # 100 pages of 1 token
    assert pairs["--page-size"] == "1"
    assert "--disable-radix-cache" in a and "--enable-metrics" in a
    assert any("SGLang" in n for n in spec.notes)  # says the prediction uses vLLM's model


def test_sglang_without_chunked_prefill_passes_minus_one() -> None:
    spec = render("sglang", make_scenario(enable_chunked_prefill=False), "/m", port=1)
    assert spec.argv[spec.argv.index("--chunked-prefill-size") + 1] == "-1"


def test_llamacpp_command_sizes_slots_from_max_num_seqs_and_max_model_len() -> None:
    sc = make_scenario(max_num_seqs=8, max_model_len=1024, max_num_batched_tokens=256,
                       enable_prefix_caching=False, tensor_parallel_size=2)
    spec = render("llamacpp", sc, "/m.gguf", port=8090,
                  install=EngineInstall(llama_server="/bin/llama-server", threads=1))
    assert spec.argv == [
        "/bin/llama-server", "-m", "/m.gguf", "--host", "127.0.0.1", "--port", "8090",
        "-a", "servetwin", "--metrics", "--no-webui", "--parallel", "8", "--ctx-size", "8192",
        "--threads", "1", "--threads-batch", "1", "--batch-size", "256", "--ubatch-size", "256",
        "--no-cache-prompt"]
    assert any("tensor_parallel_size ignored" in n for n in spec.notes)
    assert any("block_size and num_gpu_blocks do not apply" in n for n in spec.notes)


def test_extra_args_and_env_are_appended() -> None:
    spec = render("vllm", make_scenario(), "/m", port=1,
                  install=EngineInstall(env={"A": "1"}, extra_args=("--enforce-eager",)))
    assert spec.argv[-1] == "--enforce-eager" and spec.env["A"] == "1"


def test_engine_core_processors_are_for_vllm_only() -> None:
    spec = render("vllm", make_scenario(), "/m", port=1,
                  install=EngineInstall(cpus=(0,), core_cpus=(1,)))
    assert spec.cpus == (0,) and spec.core_cpus == (1,)
    assert any("EngineCore pinned to CPU(s) 1" in n for n in spec.notes)
    with pytest.raises(InputError, match="llamacpp has no EngineCore"):
        render("llamacpp", make_scenario(max_model_len=2048), "/m", port=1,
               install=EngineInstall(core_cpus=(1,)))


def test_unknown_engine_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown engine.*vllm, sglang, llamacpp"):
        render("trtllm", make_scenario(), "/m", port=1)


def test_rendered_argv_is_a_list_of_strings_never_a_shell_line(tmp_path: Path) -> None:
    spec = render("vllm", make_scenario(), str(tmp_path / "a model; rm -rf /"), port=1)
    assert all(isinstance(a, str) for a in spec.argv)
    assert str(tmp_path / "a model; rm -rf /") in spec.argv  # one argument, not parsed


def make_sglang_scenario(**engine: object) -> Scenario:
    return Scenario.model_validate({
        "workload": {"trace": "t.jsonl"}, "model": "servetwin/tiny-llama-4l", "gpu": "CPU",
        "engine": {"kind": "sglang", **engine}})


def test_sglang_config_renders_its_own_knobs() -> None:
    """engine.kind sglang: SGLang's knobs go to its flags one to one, auto ones are left
    to the engine, and no note says the prediction falls back to vLLM's model."""
    sc = make_sglang_scenario(tensor_parallel_size=2, max_running_requests=48,
                              chunked_prefill_size=-1, max_prefill_tokens=8192,
                              schedule_policy="lpm", enable_mixed_chunk=True,
                              schedule_conservativeness=0.5, disable_radix_cache=True,
                              radix_eviction_policy="lfu", page_size=16,
                              max_total_tokens=65536, max_model_len=4096)
    spec = render("sglang", sc, "/m", port=30000, install=EngineInstall(python="/py"))
    assert spec.argv == [
        "/py", "-m", "sglang.launch_server", "--model-path", "/m",
        "--served-model-name", "servetwin", "--host", "127.0.0.1", "--port", "30000",
        "--tp-size", "2", "--page-size", "16", "--max-prefill-tokens", "8192",
        "--schedule-policy", "lpm", "--schedule-conservativeness", "0.5", "--enable-metrics",
        "--radix-eviction-policy", "lfu", "--dtype", "bfloat16",
        "--max-running-requests", "48", "--chunked-prefill-size", "-1",
        "--enable-mixed-chunk", "--disable-radix-cache", "--context-length", "4096",
        "--max-total-tokens", "65536"]
    assert spec.notes == ()
    auto = render("sglang", make_sglang_scenario(), "/m", port=1).argv
    for flag in ("--max-running-requests", "--chunked-prefill-size", "--max-total-tokens",
                 "--mem-fraction-static", "--context-length"):
        assert flag not in auto


@pytest.mark.parametrize("engine", ["vllm", "llamacpp"])
def test_sglang_config_on_another_engine_is_refused(engine: str) -> None:
    with pytest.raises(ConfigError, match=r"engine.kind is sglang .*--engine sglang"):
        render(engine, make_sglang_scenario(), "/m", port=1)


def test_eviction_policy_sglang_lacks_is_refused_for_deployment() -> None:
    with pytest.raises(ConfigError, match=r"radix_eviction_policy: 'fifo'.*lru, lfu"):
        render("sglang", make_sglang_scenario(radix_eviction_policy="fifo"), "/m", port=1)
