"""Replay speed: whole-process wall time of full-trace replays, as ratios.

    python benchmarks/replay_speed.py                      # fast-forward vs step-by-step
    python benchmarks/replay_speed.py --peer-python PY     # + NVIDIA's DynoSim replay
    python benchmarks/replay_speed.py --peer-python PY --router kv   # both KV-aware
    python benchmarks/replay_speed.py --growth             # output x10, two trace copies
    python benchmarks/replay_speed.py --peer-python PY --pure   # + servetwin, pure Python

servetwin runs with its compiled engine when `servetwin native build` has built it (the
first line printed says which); ``--pure`` adds the same replay with it switched off.

Each configuration is run as its own process (start-up, trace loading and the
output files included), ``--runs`` times, alternating between the commands
being compared so that a drift of the machine's speed hits them alike; ratios
are taken pair by pair. Reported per command: wall seconds (median, min, max),
simulated seconds, x real time, forward passes, Python-level events, peak RSS,
and the ITL / TTFT medians so the reader can see that the load is comparable.

The peer (ai-dynamo 1.6.1, a Rust core) is optional: install it into a scratch
venv with ``pip install --no-deps ai-dynamo==1.6.1 ai-dynamo-runtime==1.6.1
typing-extensions`` and pass that venv's python. It replays the same Mooncake
trace with 8 round-robin workers and its own vLLM-like engine defaults (block 64,
16,384 blocks, 256 sequences, 8,192 batched tokens, prefix caching on), which
``scenarios/dynamo_comparable.yaml`` mirrors.

This is a benchmark, never a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRACE_GZ = ROOT / "scenarios" / "traces" / "mooncake_conversation.jsonl.gz"

PEER_SCRIPT = """
import json, sys
from dynamo.replay import run_trace_replay
r = run_trace_replay(sys.argv[1], num_workers=8, router_mode=sys.argv[2],
                     replay_mode="offline", trace_format="mooncake", trace_block_size=512)
s = r.summary
print("PEER_RESULT " + json.dumps({
    "duration_s": s["duration_ms"] / 1000, "itl_p50_ms": s["median_itl_ms"],
    "ttft_p50_ms": s["median_ttft_ms"], "completed": s["completed_requests"],
    "prefix_reuse": s["prefix_cache_reused_ratio"]}))
"""


@dataclass
class Command:
    label: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    out_dir: Path | None = None  # servetwin's run folder (summary.json)
    walls: list[float] = field(default_factory=list)
    peaks_mb: list[float] = field(default_factory=list)
    info: dict[str, float] = field(default_factory=dict)


def run_once(cmd: Command) -> None:
    env = {**os.environ, **cmd.env}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out = proc.stdout.read() if proc.stdout else ""
    err = proc.stderr.read() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd.label} failed ({proc.returncode}):\n{err[-2000:]}")
    cmd.walls.append(wall)
    cmd.peaks_mb.append(usage.ru_maxrss / 1024)
    if cmd.out_dir is not None:
        summ = json.loads((cmd.out_dir / "summary.json").read_text())
        cmd.info = {"sim_s": summ["duration_s"],
                    "passes": summ["engine"]["num_forward_passes"],
                    "events": summ["engine"]["num_events"],
                    "itl_p50_ms": 1000 * summ["itl_s"]["p50"],
                    "ttft_p50_ms": 1000 * summ["ttft_s"]["p50"],
                    "prefix_reuse": summ["prefix_cache_hit_rate"]}
    else:
        line = next(x for x in out.splitlines() if x.startswith("PEER_RESULT "))
        peer = json.loads(line[len("PEER_RESULT "):])
        cmd.info = {"sim_s": peer["duration_s"], "itl_p50_ms": peer["itl_p50_ms"],
                    "ttft_p50_ms": peer["ttft_p50_ms"], "prefix_reuse": peer["prefix_reuse"]}


def servetwin(label: str, scenario: Path, work: Path, *extra: str) -> Command:
    out = work / label.replace(" ", "_")
    argv = [sys.executable, "-m", "servetwin", "simulate", str(scenario), "--out", str(out),
            *extra]
    return Command(label, argv, out_dir=out)


def compare(cmds: list[Command], runs: int, warmup: int) -> None:
    for _ in range(warmup):
        for c in cmds:
            run_once(c)
        for c in cmds:
            c.walls.clear()
            c.peaks_mb.clear()
    for i in range(runs):
        for c in cmds:
            run_once(c)
        print(f"  run {i + 1}/{runs}: " + ", ".join(f"{c.label} {c.walls[-1]:.2f} s"
                                                      for c in cmds), flush=True)
    report(cmds)


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):8.3f} {min(xs):8.3f} {max(xs):8.3f}"


def report(cmds: list[Command]) -> None:
    print(f"\n{'command':<16}{'median':>9}{'min':>9}{'max':>9}  wall s |{'sim s':>8}"
          f"{'x real':>8}{'passes':>11}{'events':>11}{'peak MB':>9}{'ITL p50':>11}"
          f"{'TTFT p50':>14}{'prefix reuse':>14}")
    for c in cmds:
        i = c.info
        med = statistics.median(c.walls)
        passes = f"{i['passes']:>11,.0f}" if "passes" in i else f"{'-':>11}"
        events = f"{i['events']:>11,.0f}" if "events" in i else f"{'-':>11}"
        print(f"{c.label:<16}{fmt(c.walls)}        |{i['sim_s']:8.1f}{i['sim_s'] / med:8.0f}"
              f"{passes}{events}{max(c.peaks_mb):9.0f}{i['itl_p50_ms']:8.2f} ms"
              f"{i['ttft_p50_ms']:11,.1f} ms{100 * i['prefix_reuse']:12.2f} %")
    base = cmds[-1]
    for c in cmds[:-1]:
        ratios = [a / b for a, b in zip(c.walls, base.walls, strict=True)]
        print(f"ratio {c.label} / {base.label}: median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} pairs)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--scenario", default=str(ROOT / "scenarios" / "dynamo_comparable.yaml"))
    p.add_argument("--peer-python", help="python of a venv with ai-dynamo 1.6.1 installed")
    p.add_argument("--router", choices=["round_robin", "kv"], default="round_robin",
                   help="kv: servetwin's kv_aware router against DynoSim's kv_router")
    p.add_argument("--step-by-step", action="store_true",
                   help="also time fast-forward against step-by-step (slow)")
    p.add_argument("--growth", action="store_true",
                   help="time output lengths x10 and two interleaved trace copies")
    p.add_argument("--pure", action="store_true",
                   help="with --peer-python: also time servetwin with its compiled engine "
                   "off (SERVETWIN_PURE_PYTHON=1), in the same alternation")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from sim._native import describe

    print(f"servetwin's {describe()}", flush=True)
    scenario = Path(args.scenario)
    work = Path(tempfile.mkdtemp(prefix="servetwin-bench-"))
    try:
        router = (["--set", "cluster.router.kind=kv_aware"] if args.router == "kv" else [])
        ff = servetwin("servetwin", scenario, work, *router)
        if args.peer_python:
            trace = work / "conversation.jsonl"
            with gzip.open(TRACE_GZ, "rb") as src, trace.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = "kv_router" if args.router == "kv" else "round_robin"
            peer = Command("dynamo replay", [args.peer_python, "-c", PEER_SCRIPT, str(trace),
                                             mode], env={"DYN_LOG": "warn"})
            print(f"servetwin vs NVIDIA DynoSim replay, {args.runs} alternating runs")
            pure = servetwin("servetwin pure", scenario, work, *router)
            pure.env["SERVETWIN_PURE_PYTHON"] = "1"
            compare([ff, *([pure] if args.pure else []), peer], args.runs, args.warmup)
        if args.step_by_step:
            print("\nfast-forward vs step-by-step")
            sbs = servetwin("step-by-step", scenario, work, "--step-by-step")
            compare([servetwin("fast-forward", scenario, work), sbs], args.runs, args.warmup)
        if args.growth:
            print("\ngrowth: output lengths x10, two interleaved copies (vs the trace as is)")
            x10 = servetwin("output x10", scenario, work, "--set", "workload.output_scale=10")
            two = servetwin("two copies", scenario, work, "--set", "workload.copies=2")
            compare([x10, two, servetwin("as is", scenario, work)], args.runs, args.warmup)
        if not (args.peer_python or args.step_by_step or args.growth):
            compare([ff], args.runs, args.warmup)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
