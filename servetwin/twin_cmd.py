"""`servetwin twin-serve`: the twin server (verify/twin_server.py) on a port."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from sim.errors import InputError


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text}: must be > 0")
        return value

    return parse


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 0")
    return value


def _fraction(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text}: must be in [0, 1]")
    return value


def add_parser(sub: Any) -> None:
    s = sub.add_parser(
        "twin-serve", help="an OpenAI-compatible server timed by the simulator (test tool)",
        description="Serve /v1/completions (streaming, token-id prompts), /health and a "
        "vLLM-named /metrics, with step timing from the simulator's vLLM engine run in wall "
        "time. A test instrument, not evidence of fidelity.")
    pos_int, pos_float = _positive(int), _positive(float)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    s.add_argument("--model", default="servetwin-twin", help="model name served")
    t = s.add_argument_group("timing (default: fixed step time)")
    t.add_argument("--sim-model", default=None,
                   help="catalog model for the roofline timing, e.g. Qwen/Qwen3-8B")
    t.add_argument("--gpu", default="H100-SXM", help="catalog GPU (with --sim-model)")
    t.add_argument("--tp", type=pos_int, default=1, help="tensor parallel size (--sim-model)")
    t.add_argument("--dtype", default="bf16", help="weight dtype (--sim-model)")
    t.add_argument("--step-ms", type=_non_negative_float, default=5.0,
                   help="fixed timing: milliseconds per step (default 5)")
    t.add_argument("--per-token-us", type=_non_negative_float, default=0.0,
                   help="fixed timing: microseconds per token in the step (default 0)")
    t.add_argument("--time-scale", type=pos_float, default=1.0,
                   help="wall seconds per simulated second (default 1)")
    t.add_argument("--tick-ms", type=_non_negative_float, default=1.0,
                   help="steps ending within one tick are streamed together (default 1)")
    e = s.add_argument_group("engine (vLLM knobs)")
    e.add_argument("--max-num-seqs", type=pos_int, default=None)
    e.add_argument("--max-num-batched-tokens", type=pos_int, default=None)
    e.add_argument("--num-gpu-blocks", type=pos_int, default=None,
                   help="KV blocks (default: from the catalog, or 65536 with fixed timing)")
    e.add_argument("--block-size", type=pos_int, default=16)
    e.add_argument("--max-model-len", type=pos_int, default=None)
    e.add_argument("--no-enable-prefix-caching", action="store_true")
    e.add_argument("--max-hash-ids", type=pos_int, default=1 << 18,
                   help="prompt blocks the prefix cache can name at once; least recently "
                   "used ones are reused beyond (default 2^18)")
    f = s.add_argument_group(
        "fault injection (a request with key k, its x-request-id or arrival number, is "
        "faulty iff floor((k+1)*F) > floor(k*F), F = --fault-fraction)")
    f.add_argument("--fault-reset-after-events", type=int, default=None, metavar="N",
                   help="abort the TCP connection after N events")
    f.add_argument("--fault-stall-after-events", type=int, default=None, metavar="N",
                   help="stop sending after N events, keep the connection open")
    f.add_argument("--fault-malformed-sse", action="store_true",
                   help="a broken SSE line after the first event")
    f.add_argument("--fault-status", type=int, default=None, metavar="CODE",
                   help="answer with this HTTP status (e.g. 503, 429)")
    f.add_argument("--fault-wrong-usage", action="store_true",
                   help="report one completion token less than streamed")
    f.add_argument("--fault-fraction", type=_fraction, default=0.5, metavar="F",
                   help="share of faulty requests (default 0.5: odd keys)")
    f.add_argument("--fault-never-healthy", action="store_true", help="/health always 503")
    s.set_defaults(func=cmd_twin_serve)


def build_config(args: argparse.Namespace) -> Any:
    from sim.engines.vllm import VllmConfig
    from verify.twin_server import Faults, FixedTiming, TwinConfig

    for name in ("fault_reset_after_events", "fault_stall_after_events"):
        v = getattr(args, name)
        if v is not None and v < 0:
            raise InputError(f"--{name.replace('_', '-')}", f"{v}: must be >= 0",
                             "give a number of events")
    if args.fault_status is not None and not 400 <= args.fault_status <= 599:
        raise InputError("--fault-status", f"{args.fault_status}: must be a 4xx or 5xx code",
                         "e.g. 503 or 429")
    caching = not args.no_enable_prefix_caching
    timing: Any
    if args.sim_model:
        from sim.catalog import load_gpu, load_model
        from sim.scenario import VllmEngineSpec
        from sim.simulate import kv_dtype_for, resolve_engine
        from sim.timing import RooflineTiming

        model, gpu = load_model(args.sim_model), load_gpu(args.gpu)
        spec = VllmEngineSpec(tensor_parallel_size=args.tp, max_num_seqs=args.max_num_seqs,
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              block_size=args.block_size,
                              num_gpu_blocks_override=args.num_gpu_blocks,
                              max_model_len=args.max_model_len,
                              enable_prefix_caching=caching)
        engine, kv_note = resolve_engine(spec, model, gpu, args.dtype, "twin-serve")
        timing = RooflineTiming(model, gpu, args.tp, args.dtype, kv_dtype=kv_dtype_for(args.dtype))
        note = f"roofline prior: {model.name} on {gpu.name}, TP {args.tp}, {args.dtype}; {kv_note}"
    else:
        if args.step_ms == 0 and args.per_token_us == 0:
            raise InputError("--step-ms", "0 with --per-token-us 0: steps would take no time",
                             "give a positive --step-ms or --per-token-us")
        engine = VllmConfig(max_num_seqs=args.max_num_seqs or 256,
                            max_num_batched_tokens=args.max_num_batched_tokens or 8192,
                            num_gpu_blocks=args.num_gpu_blocks or 65536,
                            block_size=args.block_size,
                            enable_prefix_caching=caching,
                            max_model_len=args.max_model_len or 32768)
        timing = FixedTiming(args.step_ms / 1e3, args.per_token_us / 1e6)
        note = (f"fixed: {args.step_ms:g} ms per step + {args.per_token_us:g} us per token; "
                f"{engine.num_gpu_blocks} KV blocks of {engine.block_size}")
    faults = Faults(reset_after_events=args.fault_reset_after_events,
                    stall_after_events=args.fault_stall_after_events,
                    malformed_sse=args.fault_malformed_sse, status=args.fault_status,
                    wrong_usage=args.fault_wrong_usage,
                    fraction=args.fault_fraction, never_healthy=args.fault_never_healthy)
    return TwinConfig(engine=engine, timing=timing, timing_note=note, model_name=args.model,
                      time_scale=args.time_scale, tick_s=args.tick_ms / 1e3,
                      max_hash_ids=args.max_hash_ids, faults=faults)


def cmd_twin_serve(args: argparse.Namespace) -> int:
    from verify.twin_server import NOTE, serve

    cfg = build_config(args)

    def announce(url: str) -> None:
        print(f"servetwin twin-serve: listening on {url} (model {cfg.model_name!r}; {NOTE})",
              flush=True)
        print(f"  timing: {cfg.timing_note}; time scale {cfg.time_scale:g}", flush=True)
        e = cfg.engine
        print(f"  engine: max_num_seqs {e.max_num_seqs}, max_num_batched_tokens "
              f"{e.max_num_batched_tokens}, block_size {e.block_size}, max_model_len "
              f"{e.max_model_len}, prefix caching {'on' if e.enable_prefix_caching else 'off'}",
              flush=True)
        if cfg.faults != type(cfg.faults)():
            print(f"  FAULT INJECTION: {cfg.faults}", flush=True)

    asyncio.run(serve(cfg, args.host, args.port, announce))
    print("servetwin twin-serve: stopped", file=sys.stderr, flush=True)
    return 0
