"""The serving-topology comparisons of issue 7, measured on the bundled scenarios.

    python benchmarks/topology_study.py                      # all three studies
    python benchmarks/topology_study.py --only engines pd --out reports/topology

* ``engines``: vLLM against SGLang engine models on the Mooncake conversation trace,
  same GPU, model and fleet (scenarios/default.yaml against sglang_conversation.yaml).
* ``pd``: aggregated (8 workers) against disaggregated prefill/decode at the same 8 GPUs
  (scenarios/disagg_conversation.yaml: 4 prefill + 4 decode; also 2 + 6), and the
  disaggregated run with the link bandwidth halved.
* ``planner``: scenarios/planner_bursty.yaml under two start-up delay distributions
  (fixed 30 s against lognormal median 120 s) and without a planner (2 and 4 fixed
  workers): scale events, SLO attainment and GPU-seconds.

SLO attainment is the share of requests with TTFT <= --ttft-slo and TPOT <= --tpot-slo
(requests with one output token are judged on TTFT). Every row is appended to
``<out>/topology.json`` as it finishes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sim.scenario import load_scenario  # noqa: E402
from sim.simulate import SimResult, resolve, simulate  # noqa: E402

SC = ROOT / "scenarios"


def slo_attainment(result: SimResult, ttft_s: float, tpot_s: float) -> float:
    c = result.records.columns
    ok = c["status"] == "ok"
    ttft = c["first_token_s"] - c["arrival_s"]
    n = c["num_output_tokens"]
    tpot = np.where(n > 1, (c["finish_s"] - c["first_token_s"]) / np.maximum(n - 1, 1), 0.0)
    met = ok & (ttft <= ttft_s) & (tpot <= tpot_s)
    return float(met.sum() / len(c["status"]))


def gpus(result: SimResult) -> int:
    sc = result.resolved.loaded.scenario
    d = result.summary.get("disaggregation")
    if d:
        return int(d["num_gpus"])
    return sc.cluster.num_workers * sc.engine.tensor_parallel_size


def row(study: str, label: str, scenario: Path, sets: list[str], args: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = simulate(resolve(load_scenario(scenario, sets)))
    wall = time.perf_counter() - t0
    s = res.summary
    out: dict[str, Any] = {
        "study": study, "label": label, "scenario": scenario.name, "overrides": sets,
        "gpus": gpus(res), "prefix_hit_rate": s["prefix_cache_hit_rate"],
        "ttft_p50_s": s["ttft_s"]["p50"], "ttft_p90_s": s["ttft_s"]["p90"],
        "ttft_p99_s": s["ttft_s"]["p99"], "tpot_p50_s": s["tpot_s"]["p50"],
        "tpot_p90_s": s["tpot_s"]["p90"], "tpot_p99_s": s["tpot_s"]["p99"],
        "output_tok_per_s": s["output_throughput_tokens_per_s"],
        "duration_s": s["duration_s"], "num_preemptions": s["num_preemptions"],
        "forward_passes": s["engine"]["num_forward_passes"],
        "slo_attainment": slo_attainment(res, args.ttft_slo, args.tpot_slo),
        "wall_s": wall,
    }
    if "sglang" in s["engine"]:
        out["sglang"] = s["engine"]["sglang"]
    if "disaggregation" in s:
        d = s["disaggregation"]
        busy = [v["busy_fraction"] for v in d["links"].values()]
        out["handoff_s_mean"] = d["handoff_s_mean"]
        out["handoff_gb"] = d["handoff_bytes"] / 1e9
        out["link_busy_mean"] = float(np.mean(busy)) if busy else 0.0
        out["link_busy_max"] = float(np.max(busy)) if busy else 0.0
    if "planner" in s:
        p = s["planner"]
        out.update(gpu_seconds=p["gpu_seconds"], scale_ups=p["num_scale_ups"],
                   scale_downs=p["num_scale_downs"], max_workers=p["max_workers_booked"])
    else:
        end = float(np.nanmax(res.records.columns["finish_s"]))
        out["gpu_seconds"] = gpus(res) * end  # a fixed fleet is booked for the whole run
    return out


def show(r: dict[str, Any]) -> None:
    extra = ""
    if "handoff_s_mean" in r:
        extra = (f"  handoff {1e3 * r['handoff_s_mean']:.1f} ms, link busy "
                 f"{100 * r['link_busy_mean']:.1f} % mean / {100 * r['link_busy_max']:.1f} % max")
    if "scale_ups" in r:
        extra = f"  {r['scale_ups']} up / {r['scale_downs']} down, max {r['max_workers']}"
    if "sglang" in r:
        extra = f"  retractions {r['sglang']['num_retractions']}"
    elif r["study"] == "engines":
        extra = f"  preemptions {r['num_preemptions']}"
    print(f"  {r['label']:<34}{r['gpus']:>4}{100 * r['prefix_hit_rate']:>7.2f}"
          f"{1e3 * r['ttft_p50_s']:>9.1f}{1e3 * r['ttft_p90_s']:>9.1f}"
          f"{1e3 * r['tpot_p50_s']:>8.2f}{1e3 * r['tpot_p90_s']:>8.2f}"
          f"{r['output_tok_per_s']:>9.0f}{100 * r['slo_attainment']:>7.1f}"
          f"{r['gpu_seconds']:>10.0f}{r['wall_s']:>7.1f}{extra}", flush=True)


STUDIES = {
    "engines": [
        ("vLLM, 8 workers, round-robin", SC / "default.yaml", []),
        ("SGLang, 8 workers, round-robin", SC / "sglang_conversation.yaml", []),
        ("vLLM, load x3", SC / "default.yaml", ["workload.time_scale=0.3333333333333333"]),
        ("SGLang, load x3", SC / "sglang_conversation.yaml",
         ["workload.time_scale=0.3333333333333333"]),
        # a small KV cache, the same 178k tokens per worker for both (22.4 GiB)
        ("vLLM, load x3, small KV", SC / "default.yaml",
         ["workload.time_scale=0.3333333333333333", "engine.gpu_memory_utilization=0.5"]),
        ("SGLang, load x3, small KV", SC / "sglang_conversation.yaml",
         ["workload.time_scale=0.3333333333333333", "engine.mem_fraction_static=0.4665"]),
    ],
    "pd": [
        ("aggregated 8 x TP1", SC / "default.yaml", []),
        ("disaggregated 4P + 4D, 50 GB/s", SC / "disagg_conversation.yaml", []),
        ("disaggregated 4P + 4D, 25 GB/s", SC / "disagg_conversation.yaml",
         ["disaggregation.link.bandwidth_gb_s=25"]),
        ("disaggregated 2P + 6D, 50 GB/s", SC / "disagg_conversation.yaml",
         ["disaggregation.prefill.num_workers=2", "disaggregation.decode.num_workers=6"]),
    ],
    "planner": [
        ("planner, start-up fixed 30 s", SC / "planner_bursty.yaml",
         ["cluster.planner.startup={kind: fixed, delay_s: 30}"]),
        ("planner, start-up lognormal 120 s", SC / "planner_bursty.yaml", []),
        ("no planner, 2 workers", SC / "planner_bursty.yaml", ["cluster.planner=null"]),
        ("no planner, 4 workers", SC / "planner_bursty.yaml",
         ["cluster.planner=null", "cluster.num_workers=4"]),
    ],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=sorted(STUDIES), default=list(STUDIES))
    p.add_argument("--ttft-slo", type=float, default=2.0, help="seconds (default 2)")
    p.add_argument("--tpot-slo", type=float, default=0.05, help="seconds (default 0.05)")
    p.add_argument("--out", default=str(ROOT / "reports" / "topology-study"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for study in args.only:
        print(f"\n{study}: (ms; SLO = TTFT <= {args.ttft_slo:g} s and TPOT <= "
              f"{1e3 * args.tpot_slo:g} ms)")
        print(f"  {'':<34}{'GPUs':>4}{'hit %':>7}{'TTFT50':>9}{'TTFT90':>9}{'TPOT50':>8}"
              f"{'TPOT90':>8}{'tok/s':>9}{'SLO %':>7}{'GPU-s':>10}{'wall':>7}")
        for label, scenario, sets in STUDIES[study]:
            r = row(study, label, scenario, sets, args)
            rows.append(r)
            (out / "topology.json").write_text(json.dumps(rows, indent=1) + "\n")
            show(r)
    print(f"\nwrote {out / 'topology.json'}")


if __name__ == "__main__":
    main()
