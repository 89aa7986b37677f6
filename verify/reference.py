"""The reference verify run on this machine's real engines, in one command.

    python -m verify.reference [--engine vllm|llamacpp] [--out DIR] [--set KEY=VALUE ...]

Builds (or reuses) the test engines and the tiny random-weight model (verify.testbed), then
runs `servetwin verify` on scenarios/verify/tiny_<engine>_cpu.yaml. The committed report
under reports/verify-tiny-vllm-cpu/ came from this command; rerun it to reproduce it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {"vllm": ROOT / "scenarios" / "verify" / "tiny_vllm_cpu.yaml",
             "llamacpp": ROOT / "scenarios" / "verify" / "tiny_llamacpp_cpu.yaml"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m verify.reference")
    p.add_argument("--engine", choices=tuple(SCENARIOS), default="vllm")
    p.add_argument("--out", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--cache", default=None, help="testbed cache folder")
    p.add_argument("--force", action="store_true")
    p.add_argument("--profile", default=None, help="predict with this timing profile")
    args = p.parse_args(argv)

    from servetwin.cli import main as servetwin_main
    from verify import testbed

    out = args.out or str(ROOT / "reports" / f"verify-tiny-{args.engine}-cpu")
    # a small host: the engine's processes on core 0, the load generator on core 1
    # (sharing a core, even at nice 10 for the engine, cost p99 send lag 3.3 ms against
    # 1.0-1.5 ms pinned), and vLLM's EngineCore, which spins while its worker computes, on
    # core 1 too, off the worker's core
    two = len(os.sched_getaffinity(0)) >= 2
    pin = (["--engine-cpus", "0", "--loadgen-cpus", "1",
            *(["--engine-core-cpus", "1"] if args.engine == "vllm" else [])] if two
           else ["--engine-nice", "10"])
    common = [str(SCENARIOS[args.engine]), "--engine", args.engine, "--out", out, *pin,
              *[a for s in args.set for a in ("--set", s)], *(["--force"] if args.force else []),
              *(["--profile", args.profile] if args.profile else [])]
    if args.engine == "vllm":
        vllm = testbed.ensure_vllm(args.cache)
        model = testbed.ensure_tiny_hf(args.cache, vllm=vllm)
        extra = ["--engine-python", str(vllm.python), "--model-path", str(model),
                 "--served-model-name", "tiny",
                 *[a for k, v in vllm.env.items() for a in ("--engine-env", f"{k}={v}")]]
    else:
        llama = testbed.ensure_llamacpp(args.cache)
        gguf = testbed.ensure_tiny_gguf(args.cache)
        extra = ["--llama-server", str(llama.server), "--model-path", str(gguf),
                 "--served-model-name", "tiny"]
    return servetwin_main(["verify", *common, *extra])


if __name__ == "__main__":
    sys.exit(main())
