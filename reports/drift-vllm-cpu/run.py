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

from calibrate.profiling import default_plan, profile_engine
from sim.scenario import Scenario
from verify import testbed
from verify.deploy import Deployment
from verify.engines import EngineInstall, render

ROOT = Path(__file__).resolve().parents[2]
os.chdir(ROOT)  # the rows' source names the log relative to the repository
HERE = Path("reports/drift-vllm-cpu")

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("label")
p.add_argument("--engine-arg", action="append", default=[],
               help="appended to the launch command (the last of a repeated flag wins)")
args = p.parse_args()

vllm = testbed.ensure_vllm()
model = testbed.ensure_tiny_hf(vllm=vllm)
sc = Scenario.model_validate({
    "workload": {"synthetic": {}}, "model": "servetwin/tiny-llama-4l", "gpu": "CPU-1core-AVX512",
    "engine": {"max_num_seqs": 32, "max_num_batched_tokens": 1024, "max_model_len": 4096,
               "block_size": 32}})
spec = render("vllm", sc, str(model), port=18441, served_model_name="tiny",
              install=EngineInstall(python=str(vllm.python), env=vllm.env,
                                    extra_args=tuple(args.engine_arg)), iteration_log=True)
log = HERE / f"vllm-{args.label}.log"
log.unlink(missing_ok=True)
with Deployment(spec, log, ready_timeout_s=400) as d:
    print(f"engine ready in {d.ready_s:.0f} s: {' '.join(spec.argv[3:])}", flush=True)
    t0 = time.monotonic()
    res = profile_engine(spec.base_url, log, HERE / f"steps-{args.label}.csv", default_plan(),
                         seed=0)
    print(res.format())
    print(f"profiling wall {time.monotonic() - t0:.1f} s")
