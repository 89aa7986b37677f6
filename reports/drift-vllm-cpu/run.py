"""Profile the tiny random Llama on vLLM 0.32.0's CPU build again, as
reports/calibrate-tiny-vllm-cpu/run.py did for the reference profile, optionally with
one engine setting changed; writes steps-LABEL.csv and vllm-LABEL.log beside this file.

    python reports/drift-vllm-cpu/run.py control              # the same settings
    python reports/drift-vllm-cpu/run.py fp32 --engine-arg=--dtype --engine-arg=float32

Then, against the reference profile:

    servetwin calibrate --against reports/calibrate-tiny-vllm-cpu/profile.yaml \\
        reports/drift-vllm-cpu/steps-LABEL.csv --out reports/drift-vllm-cpu/LABEL
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from calibrate.profiling import default_plan, profile_engine, tiny_vllm_spec
from verify.deploy import Deployment

ROOT = Path(__file__).resolve().parents[2]
os.chdir(ROOT)  # the rows' source names the log relative to the repository
HERE = Path("reports/drift-vllm-cpu")

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("label")
p.add_argument("--engine-arg", action="append", default=[],
               help="appended to the launch command (the last of a repeated flag wins)")
args = p.parse_args()

spec = tiny_vllm_spec(18441, extra_args=args.engine_arg)
log = HERE / f"vllm-{args.label}.log"
log.unlink(missing_ok=True)
with Deployment(spec, log, ready_timeout_s=400) as d:
    print(f"engine ready in {d.ready_s:.0f} s: {' '.join(spec.argv[3:])}", flush=True)
    t0 = time.monotonic()
    res = profile_engine(spec.base_url, log, HERE / f"steps-{args.label}.csv", default_plan(),
                         seed=0)
    print(res.format())
    print(f"profiling wall {time.monotonic() - t0:.1f} s")
