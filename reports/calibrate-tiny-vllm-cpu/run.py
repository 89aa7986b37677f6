"""Profile the tiny random Llama on vLLM 0.32.0's CPU build (verify.testbed) with
calibrate.profiling's default plan; writes steps.csv and vllm.log beside this file.

    python reports/calibrate-tiny-vllm-cpu/run.py
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from calibrate.profiling import default_plan, profile_engine, tiny_vllm_spec
from verify.deploy import Deployment

ROOT = Path(__file__).resolve().parents[2]
os.chdir(ROOT)  # the rows' source names the log relative to the repository
HERE = Path("reports/calibrate-tiny-vllm-cpu")

spec = tiny_vllm_spec(18441)
log = HERE / "vllm.log"
log.unlink(missing_ok=True)
with Deployment(spec, log, ready_timeout_s=400) as d:
    print(f"engine ready in {d.ready_s:.0f} s: {' '.join(spec.argv[3:])}", flush=True)
    t0 = time.monotonic()
    res = profile_engine(spec.base_url, log, HERE / "steps.csv", default_plan(), seed=0)
    print(res.format())
    print(f"profiling wall {time.monotonic() - t0:.1f} s")
